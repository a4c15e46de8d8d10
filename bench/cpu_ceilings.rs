//! What this machine's cores can do at most: the ceilings the CPU attention is measured against.
//!
//! - fp32 FMA peak: `vfmadd231ps` on 12 independent accumulators (zmm where the CPU has
//!   AVX-512, and ymm), no memory operands, so nothing but the FMA units limits it;
//! - bf16 dot-product peak: `vdpbf16ps` (zmm) the same way, where the CPU has AVX-512 BF16;
//! - AMX peak: bf16 tile products (`tdpbf16ps`) into four independent sums of tiles that
//!   nothing reloads, where the CPU has AMX and the OS grants the tile data (the `amx-bf16`
//!   family's products);
//! - clock: a chain of dependent integer adds (one cycle each) gives the core clock while the
//!   FMA loops would run (an estimate: turbo and the hypervisor can move it);
//! - read bandwidth: sums of f32 with 512-bit loads (256-bit without AVX-512) over a buffer far
//!   larger than the L3 (1 GiB by default), each thread over its own half, first touched by the
//!   thread that reads it.
//!
//! Each measurement runs on 1 and on `--threads` threads (pinned to CPUs 0..n when the OS lets
//! it), `--rounds` times; the table gives the median and the best round. x86-64 with AVX2 and
//! FMA (AMD Zen 1-3 and Intel client cores measure the ymm loops alone).
//!
//! Usage: cargo run --release -p ufa --example cpu_ceilings -- [--threads 2] [--rounds 7]
//!        [--mib 1024]
use std::sync::{Arc, Barrier};
use std::time::Instant;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

/// Pins the calling thread to `cpu` (best effort).
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET on an index < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % libc::CPU_SETSIZE as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_secs() -> f64 {
    // SAFETY: clock_gettime writes one timespec.
    unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
        ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
    }
}

/// A round in which some thread ran on its CPU for less than this share of its time, or the
/// threads' starts lay further apart than (1 - this) of the round, was disturbed (another
/// process took a core, or a thread ran alone for a while) and is not counted.
const MIN_ON_CPU: f64 = 0.97;

/// Runs `work(thread)` on `n` pinned threads started together; returns the seconds from the
/// first thread's start to the last thread's end, whether every thread stayed on its CPU for
/// that time, and the threads' results. The threads time themselves: the calling
/// thread, a third one on a two-core machine, may not run at once.
fn on_threads<T: Send + 'static>(
    n: usize,
    work: impl Fn(usize) -> T + Send + Sync + 'static,
) -> (f64, bool, Vec<T>) {
    let work = Arc::new(work);
    let go = Arc::new(Barrier::new(n));
    let origin = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (work, go) = (work.clone(), go.clone());
            std::thread::spawn(move || {
                pin(i);
                go.wait();
                let (t0, c0) = (origin.elapsed().as_secs_f64(), thread_cpu_secs());
                let out = work(i);
                let (t1, c1) = (origin.elapsed().as_secs_f64(), thread_cpu_secs());
                (t0, t1, c1 - c0, out)
            })
        })
        .collect();
    let done: Vec<(f64, f64, f64, T)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let start = done.iter().map(|d| d.0).fold(f64::INFINITY, f64::min);
    let end = done.iter().map(|d| d.1).fold(0.0, f64::max);
    let wall = end - start;
    let last_start = done.iter().map(|d| d.0).fold(0.0, f64::max);
    let on_cpu = done.iter().all(|d| d.2 >= MIN_ON_CPU * (d.1 - d.0))
        && last_start - start <= (1.0 - MIN_ON_CPU) * wall;
    (wall, on_cpu, done.into_iter().map(|d| d.3).collect())
}

/// Rates of `rounds` undisturbed rounds of `round` (at most 10 × `rounds` tries), and how many
/// tries were disturbed.
fn undisturbed(rounds: usize, mut round: impl FnMut() -> Option<f64>) -> (Vec<f64>, usize) {
    let (mut rates, mut dropped) = (Vec::new(), 0);
    while rates.len() < rounds && dropped < 10 * rounds {
        match round() {
            Some(r) => rates.push(r),
            None => dropped += 1,
        }
    }
    (rates, dropped)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;

    // The multiply-add loops are the library's own (cpu/rates.rs), so that the ceilings
    // reported here are measured as the kernel family is chosen.
    pub use ufa::internals::{amx_bf16_tiles, dpbf16_zmm, fma_ymm, fma_zmm};

    /// 8 × `iters` dependent one-cycle integer adds: the time per add is one clock cycle.
    /// Register operands, not immediates: Intel's Golden Cove cores (Sapphire and Emerald
    /// Rapids) fold chains of immediate adds at renaming, which ran 3.2 of them a cycle and
    /// reported an 11.8 GHz clock.
    pub fn add_chain(iters: u64) {
        // SAFETY: register-only integer instructions.
        unsafe {
            asm!(
                "xor {x}, {x}",
                "mov {y}, 1",
                "2:",
                "add {x}, {y}", "add {x}, {y}", "add {x}, {y}", "add {x}, {y}",
                "add {x}, {y}", "add {x}, {y}", "add {x}, {y}", "add {x}, {y}",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) iters => _,
                x = out(reg) _,
                y = out(reg) _,
                options(nostack, nomem),
            );
        }
    }

    /// Σ of `x` (a multiple of 128 × `streams` elements), read as `streams` equal parts side by
    /// side (each a sequential stream for the hardware prefetchers), with 512-bit loads where
    /// `zmm`, else 256-bit ones.
    ///
    /// # Safety
    /// avx512f where `zmm`, else avx2.
    pub unsafe fn sum_streams(x: &[f32], streams: usize, zmm: bool) -> f32 {
        let part = x.len() / streams;
        let mut total = 0.0;
        for i in (0..part).step_by(1024) {
            for s in 0..streams {
                let chunk = &x[s * part + i..][..1024.min(part - i)];
                total += if zmm { sum(chunk) } else { sum_ymm(chunk) };
            }
        }
        total
    }

    /// Σ of `x` (a multiple of 128 elements) with 256-bit loads into 8 independent sums (the
    /// AVX2 machines' widest loads).
    #[target_feature(enable = "avx2")]
    pub unsafe fn sum_ymm(x: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        let mut acc = [_mm256_setzero_ps(); 8];
        let p = x.as_ptr();
        for i in (0..x.len()).step_by(64) {
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_loadu_ps(p.add(i + 8 * j)));
            }
        }
        let mut s = _mm256_setzero_ps();
        for a in acc {
            s = _mm256_add_ps(s, a);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), s);
        lanes.iter().sum()
    }

    /// Σ of `x` (a multiple of 128 elements) with 512-bit loads into 8 independent sums.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sum(x: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        let mut acc = [_mm512_setzero_ps(); 8];
        let p = x.as_ptr();
        for i in (0..x.len()).step_by(128) {
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm512_add_ps(*a, _mm512_loadu_ps(p.add(i + 16 * j)));
            }
        }
        let mut s = _mm512_setzero_ps();
        for a in acc {
            s = _mm512_add_ps(s, a);
        }
        _mm512_reduce_add_ps(s)
    }
}

/// A compute loop: name, body (run `iters` times), units of work an iteration, unit.
/// (name, loop, units per iteration, unit); each loop's instructions were checked for in main.
type Loop = (&'static str, unsafe fn(u64), f64, &'static str);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn report(name: &str, n: usize, rates: &[f64], dropped: usize, unit: &str) {
    if rates.is_empty() {
        println!("| {name} | {n} | - | - | {unit} | 0 of {dropped} |");
        return;
    }
    println!(
        "| {name} | {n} | {:.1} | {:.1} | {unit} | {} of {} |",
        median(rates.to_vec()),
        best(rates),
        rates.len(),
        rates.len() + dropped
    );
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

#[cfg(target_arch = "x86_64")]
fn main() {
    let threads = arg("--threads", 2);
    let rounds = arg("--rounds", 7);
    let mib = arg("--mib", 1024);
    if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
    {
        eprintln!("cpu_ceilings needs AVX2 and FMA");
        std::process::exit(1);
    }
    // AVX2 machines (AMD Zen 1-3, Intel client cores) measure the ymm loops alone.
    let zmm = std::arch::is_x86_feature_detected!("avx512f");
    let bf16 = zmm && std::arch::is_x86_feature_detected!("avx512bf16");
    println!("load average at start: {}", loadavg());
    println!(
        "| measure | threads | median | best | unit | rounds kept |\n|---|---|---|---|---|---|"
    );

    // Compute loops: 2.4e8 instructions a thread, ~0.1 s a round at one FMA a cycle.
    const ITERS: u64 = 20_000_000;
    let compute: Vec<Loop> = {
        let mut v: Vec<Loop> = vec![("clock (dependent adds)", x86::add_chain, 8.0 / 1e9, "GHz")];
        if zmm {
            v.push(("fp32 FMA, zmm", x86::fma_zmm, 12.0 * 32.0 / 1e9, "GFLOP/s"));
        }
        v.push(("fp32 FMA, ymm", x86::fma_ymm, 12.0 * 16.0 / 1e9, "GFLOP/s"));
        if bf16 {
            v.push((
                "bf16 dot (vdpbf16ps), zmm",
                x86::dpbf16_zmm,
                12.0 * 64.0 / 1e9,
                "GFLOP/s",
            ));
        }
        if ufa::amx().granted {
            // Four products an iteration, each 16 × 16 sums of 32 bf16 pairs.
            v.push((
                "bf16 AMX tile products (tdpbf16ps)",
                x86::amx_bf16_tiles,
                4.0 * 16.0 * 16.0 * 32.0 * 2.0 / 1e9,
                "GFLOP/s",
            ));
        }
        v
    };
    for (name, f, per_iter, unit) in compute {
        // A tile product takes 16 cycles or more where a vector instruction takes one: fewer
        // iterations keep the round near 0.1 s.
        let iters = if name.contains("AMX") {
            ITERS / 16
        } else {
            ITERS
        };
        for n in [1, threads] {
            // SAFETY: main checked each loop's instructions before listing it.
            unsafe { f(iters / 10) }; // warm up (clock ramp, AVX-512 power state)
            let (rates, dropped) = undisturbed(rounds, || {
                // SAFETY: as above.
                let (secs, on_cpu, _) = on_threads(n, move |_| unsafe { f(iters) });
                on_cpu.then_some(())?;
                // The clock is per core: report it per thread, not summed.
                let total = if unit == "GHz" { 1.0 } else { n as f64 };
                Some(iters as f64 * per_iter * total / secs)
            });
            report(name, n, &rates, dropped, unit);
        }
    }

    // Read bandwidth: each thread owns (and first touches) 1/n of the buffer, so its pages are
    // its own; a round is one pass over the whole buffer, each thread's part read as one
    // sequential stream or as 4 side by side.
    for streams in [1, 4] {
        for n in [1, threads] {
            let per = (mib << 20) / 4 / n / (1024 * streams) * (1024 * streams);
            let (_, _, bufs) = on_threads(n, move |i| {
                (0..per).map(|j| (j % 7 + i) as f32).collect::<Vec<f32>>()
            });
            let bufs: Arc<Vec<Vec<f32>>> = Arc::new(bufs);
            let pass = |bufs: &Arc<Vec<Vec<f32>>>| {
                let bufs = bufs.clone();
                // SAFETY: avx512f (zmm) or avx2 was detected above.
                on_threads(n, move |i| unsafe {
                    x86::sum_streams(&bufs[i], streams, zmm)
                })
            };
            pass(&bufs); // warm up
            let (rates, dropped) = undisturbed(rounds, || {
                let (secs, on_cpu, sums) = pass(&bufs);
                std::hint::black_box(sums);
                on_cpu.then_some(())?;
                Some((n * per * 4) as f64 / secs / 1e9)
            });
            let name = format!(
                "read {} MiB, f32 sum, {} loads, {streams} stream(s) a thread",
                (n * per * 4) >> 20,
                if zmm { "zmm" } else { "ymm" }
            );
            report(&name, n, &rates, dropped, "GB/s");
        }
    }
    println!("load average at end: {}", loadavg());
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("cpu_ceilings measures x86-64 (AVX2 and AVX-512) ceilings only");
}
