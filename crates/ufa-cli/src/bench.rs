//! `ufa bench`: timings on standard shapes: dense batches, packed batches beside their padded
//! twins, and decoding steps over dense and paged KV caches.

use crate::device::{cuda_ordinals, DeviceArg};
use crate::ComputeOpts;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use ufa::{Context, DType};
use ufa_testkit::{
    Case, Features, Instance, KvCacheCase, KvCacheInstance, Placement, VarlenCase, VarlenInstance,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    compute: ComputeOpts,
    /// Where to run: cpu, cuda (cuda:0) or cuda:N (default: the best backend here, cuda:0 when
    /// a CUDA device is usable, else cpu).
    #[arg(long)]
    device: Option<DeviceArg>,
    /// Input and output dtype: f32, bf16 or f16 (default: f32 on the CPU, bf16 on CUDA).
    #[arg(long)]
    dtype: Option<DType>,
    /// Timed runs per shape; the median is reported (default: 5 on the CPU, 20 on CUDA).
    #[arg(long)]
    iters: Option<usize>,
    /// Only workloads whose name contains this text (e.g. W3 runs W3 and W3-causal). On CUDA the
    /// workloads also include DESIGN.md's GPU sweep, S-d64-s512 to S-d256-s16384-causal
    /// (e.g. S-d128 runs its head_dim 128 shapes, causal and not).
    #[arg(long)]
    filter: Option<String>,
    /// Only the workload with exactly this name (e.g. W3).
    #[arg(long)]
    workload: Option<String>,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    json: bool,
    /// Time the backward pass (dQ, dK, dV from a saved forward) instead of the forward.
    #[arg(long)]
    backward: bool,
    /// Memory layout of q, k, v and out: bshd ([batch, seq, heads, dim], FlashAttention's) or
    /// bhsd ([batch, heads, seq, dim], PyTorch's), read in place either way.
    #[arg(long, default_value = "bshd")]
    layout: Layout,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    Bshd,
    Bhsd,
}

/// A named benchmark shape.
struct Workload {
    name: String,
    batch: usize,
    heads: usize,
    heads_kv: usize,
    seqlen_q: usize,
    seqlen_kv: usize,
    head_dim: usize,
    causal: bool,
    kind: Kind,
}

/// How a workload's batch is laid out.
#[derive(Clone, Debug, PartialEq)]
enum Kind {
    /// `batch` sequences of `seqlen_q` queries and `seqlen_kv` keys.
    Dense,
    /// A packed batch of these sequence lengths (queries and keys alike); `batch`, `seqlen_q`
    /// and `seqlen_kv` give its padded twin (the longest length).
    Varlen(Vec<usize>),
    /// A decoding step over a KV cache: each of `batch` sequences appends one key and value at
    /// `seqlen_kv - 1` and attends to all `seqlen_kv`; dense or paged (page size).
    KvCache(Option<usize>),
}

impl Workload {
    /// FLOPs of the pass (FlashAttention's convention: a backward counts 2.5 forwards).
    fn flops(&self, backward: bool) -> f64 {
        let pass = if backward { 2.5 } else { 1.0 };
        let d = self.head_dim;
        let f = |batch, sq, skv| ufa::forward_flops(batch, self.heads, sq, skv, d, d, self.causal);
        pass * match &self.kind {
            Kind::Varlen(lens) => lens.iter().map(|&l| f(1, l, l)).sum(),
            _ => f(self.batch, self.seqlen_q, self.seqlen_kv),
        }
    }

    /// Bytes of q, k, v and out each call must move at least (what bounds decoding): a KV
    /// cache's keys and values are read once per KV head, not per query head.
    fn bytes(&self, dtype: DType) -> f64 {
        let d = self.head_dim;
        let (q_rows, kv_rows) = match &self.kind {
            Kind::Varlen(lens) => {
                let n: usize = lens.iter().sum();
                (n, n)
            }
            _ => (self.batch * self.seqlen_q, self.batch * self.seqlen_kv),
        };
        let elems = 2 * q_rows * self.heads * d + 2 * kv_rows * self.heads_kv * d;
        (elems * dtype.size_in_bytes()) as f64
    }

    fn shape(&self) -> String {
        let heads = if self.heads_kv == self.heads {
            format!("H{}", self.heads)
        } else {
            format!("H{}/{}", self.heads, self.heads_kv)
        };
        let (b, sq, skv, d) = (self.batch, self.seqlen_q, self.seqlen_kv, self.head_dim);
        match &self.kind {
            Kind::Dense => format!("B{b} {heads} Sq{sq} Skv{skv} D{d}"),
            Kind::Varlen(lens) => {
                let n: usize = lens.iter().sum();
                format!("packed {b} seqs {n} tokens {heads} D{d}")
            }
            Kind::KvCache(page) => {
                let cache = page.map_or("dense".to_string(), |p| format!("page{p}"));
                format!("B{b} {heads} cache{skv} {cache} D{d}")
            }
        }
    }
}

/// DESIGN.md's CPU workloads W1-W4 (W2 and W3 causal and not); packed batches beside their
/// padded twins (V1 and V2 of mixed lengths, V3 of equal ones, where both do the same work;
/// on CUDA V3 is S-d128-s4096 packed); decoding
/// steps over dense and paged KV caches (D1 on the CPU, D2 on CUDA); and on CUDA DESIGN.md's
/// standard GPU sweep: 16k tokens in total, hidden 2048 (heads = 2048 / head_dim), named like
/// `S-d128-s4096` and `S-d128-s4096-causal`, in bench/gpu_sweep.py's order.
fn workloads(target: Target) -> Vec<Workload> {
    let w = |name: &str, batch, heads, seqlen_q, seqlen_kv, head_dim, causal| Workload {
        name: name.to_string(),
        batch,
        heads,
        heads_kv: heads,
        seqlen_q,
        seqlen_kv,
        head_dim,
        causal,
        kind: Kind::Dense,
    };
    // A packed batch and its padded twin.
    let varlen = |name: &str, lens: &[usize], heads, head_dim, causal| {
        let longest = lens.iter().copied().max().unwrap_or(0);
        let dense = w(name, lens.len(), heads, longest, longest, head_dim, causal);
        let suffix = if causal { "-causal" } else { "" };
        [
            Workload {
                name: format!("{name}-varlen{suffix}"),
                kind: Kind::Varlen(lens.to_vec()),
                ..w(name, lens.len(), heads, longest, longest, head_dim, causal)
            },
            Workload {
                name: format!("{name}-padded{suffix}"),
                ..dense
            },
        ]
    };
    // Decoding steps over one cache in each layout.
    let decode = |name: &str, batch, heads, heads_kv, cache, head_dim, pages: &[usize]| {
        std::iter::once(None)
            .chain(pages.iter().map(|&p| Some(p)))
            .map(|page| Workload {
                name: match page {
                    None => format!("{name}-kvcache-dense"),
                    Some(p) => format!("{name}-kvcache-page{p}"),
                },
                heads_kv,
                kind: Kind::KvCache(page),
                ..w(name, batch, heads, 1, cache, head_dim, false)
            })
            .collect::<Vec<_>>()
    };
    let mut v = vec![
        w("W1", 1, 8, 1024, 1024, 64, false),
        w("W2", 1, 8, 4096, 4096, 64, false),
        w("W2-causal", 1, 8, 4096, 4096, 64, true),
        w("W3", 1, 16, 2048, 2048, 128, false),
        w("W3-causal", 1, 16, 2048, 2048, 128, true),
        w("W4-decode", 1, 32, 1, 4096, 128, false),
    ];
    let v1 = [256, 1024, 64, 512, 128, 1, 2048, 96];
    match target {
        Target::Cpu => {
            v.extend(varlen("V1", &v1, 8, 64, true));
            v.extend(varlen("V3", &[1024; 4], 8, 64, true));
            v.extend(decode("D1", 4, 32, 8, 4096, 128, &[16, 256]));
            // Grouped-query decoding with 8 and 16 query heads a KV head (batch 1).
            v.extend(decode("D2", 1, 16, 2, 8192, 128, &[16]));
            v.extend(decode("D3", 1, 32, 2, 8192, 128, &[16]));
        }
        Target::Cuda(_) => {
            v.extend(varlen("V1", &v1, 8, 64, true));
            // 16k tokens of mixed lengths (2x when padded), and four equal ones.
            let v2 = [3072, 512, 1536, 4096, 1024, 2560, 768, 2816];
            for causal in [false, true] {
                v.extend(varlen("V2", &v2, 16, 128, causal));
                v.extend(varlen("V3", &[4096; 4], 16, 128, causal));
            }
            v.extend(decode("D2", 16, 32, 8, 8192, 128, &[1, 16, 256]));
            // The decoding sweep (DS): one token over a cache of 1k to 32k keys, 1 to 32
            // sequences, dense and in pages of 16 (bench/decode.py adds PyTorch beside it).
            for batch in [1, 8, 32] {
                for cache in [1024, 8192, 32768] {
                    let name = format!("DS-b{batch}-kv{}k", cache / 1024);
                    v.extend(decode(&name, batch, 32, 8, cache, 128, &[16]));
                }
            }
            for head_dim in [64, 128, 256] {
                for causal in [false, true] {
                    for seqlen in [512, 1024, 2048, 4096, 8192, 16384] {
                        let name = format!(
                            "S-d{head_dim}-s{seqlen}{}",
                            if causal { "-causal" } else { "" }
                        );
                        let batch = 16384 / seqlen;
                        v.push(w(
                            &name,
                            batch,
                            2048 / head_dim,
                            seqlen,
                            seqlen,
                            head_dim,
                            causal,
                        ));
                    }
                }
            }
        }
    }
    v
}

/// One workload's inputs, ready to run.
enum Prepared {
    Dense(Instance),
    Varlen(VarlenInstance),
    KvCache(KvCacheInstance),
}

impl Prepared {
    fn new(w: &Workload, dtype: DType, backward: bool, layout: Layout) -> ufa::Result<Prepared> {
        let mut f = Features::new(w.heads, w.heads_kv, w.head_dim, dtype);
        f.causal = w.causal;
        Ok(match &w.kind {
            Kind::Dense => {
                let mut case =
                    Case::new(w.batch, w.seqlen_q, w.seqlen_kv, w.heads, w.head_dim, dtype);
                case.heads_kv = w.heads_kv;
                case.causal = w.causal;
                case.with_lse = backward;
                if layout == Layout::Bhsd {
                    case.placement = [Placement::HeadsFirst; 4];
                }
                Prepared::Dense(Instance::new(&case, 1))
            }
            Kind::Varlen(lens) => {
                Prepared::Varlen(VarlenInstance::new(&VarlenCase::new(lens, lens, f), 1))
            }
            Kind::KvCache(page) => {
                if backward {
                    return Err(ufa::Error::invalid(format!(
                        "--backward: {} is a decoding step, which has no backward",
                        w.name
                    )));
                }
                let cached = vec![w.seqlen_kv - 1; w.batch];
                let mut case = KvCacheCase::new(1, &cached, 1, f);
                case.page_size = *page;
                Prepared::KvCache(KvCacheInstance::new(&case, 1))
            }
        })
    }
}

/// Where the timed calls run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Cpu,
    Cuda(u32),
}

impl Target {
    /// What each device is usually run at: f32 is the CPU's reference dtype, bf16 the GPU's
    /// (DESIGN.md's sweep).
    fn default_dtype(self) -> DType {
        match self {
            Target::Cpu => DType::F32,
            Target::Cuda(_) => DType::BF16,
        }
    }

    /// GPU calls are short and their timer noisier per call, so it takes more of them.
    fn default_iters(self) -> usize {
        match self {
            Target::Cpu => 5,
            Target::Cuda(_) => 20,
        }
    }

    /// Median and, where the timer keeps it, fastest milliseconds of `iters` timed calls of the
    /// forward (or the backward, from a saved forward), after untimed warm-up calls.
    fn time(
        self,
        ctx: &Context,
        prepared: &mut Prepared,
        backward: bool,
        iters: usize,
        bar: &ProgressBar,
    ) -> ufa::Result<(f64, Option<f64>)> {
        match self {
            Target::Cpu => match (prepared, backward) {
                (Prepared::Dense(inst), false) => wall_ms(iters, bar, || inst.run(ctx)),
                (Prepared::Dense(inst), true) => {
                    inst.run(ctx)?;
                    wall_ms(iters, bar, || inst.run_backward(ctx))
                }
                (Prepared::Varlen(inst), false) => wall_ms(iters, bar, || inst.run(ctx)),
                (Prepared::Varlen(inst), true) => {
                    inst.run(ctx)?;
                    wall_ms(iters, bar, || inst.run_backward(ctx))
                }
                (Prepared::KvCache(inst), _) => wall_ms(iters, bar, || inst.run(ctx)),
            },
            Target::Cuda(n) => {
                // Several warm-up calls: the first also compiles or loads the kernel.
                let ms = match (prepared, backward) {
                    (Prepared::Dense(inst), false) => inst.time_cuda(ctx, n, 3, iters)?,
                    (Prepared::Dense(inst), true) => inst.time_cuda_backward(ctx, n, 3, iters)?,
                    (Prepared::Varlen(inst), false) => inst.time_cuda(ctx, n, 3, iters)?,
                    (Prepared::Varlen(inst), true) => inst.time_cuda_backward(ctx, n, 3, iters)?,
                    (Prepared::KvCache(inst), _) => inst.time_cuda(ctx, n, 3, iters)?,
                };
                bar.inc(iters as u64 + 1);
                Ok((ms, None))
            }
        }
    }
}

/// Wall-clock median and minimum milliseconds of `iters` calls of `f`, after one warm-up call
/// (page faults, thread start-up).
fn wall_ms(
    iters: usize,
    bar: &ProgressBar,
    mut f: impl FnMut() -> ufa::Result<()>,
) -> ufa::Result<(f64, Option<f64>)> {
    f()?;
    bar.inc(1);
    let mut times: Vec<Duration> = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
        bar.inc(1);
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok((ms(times[times.len() / 2]), Some(ms(times[0]))))
}

#[derive(Serialize)]
struct Row {
    name: String,
    pass: &'static str,
    layout: String,
    shape: String,
    dtype: String,
    causal: bool,
    /// CPU threads; null on CUDA.
    threads: Option<usize>,
    kernels: String,
    median_ms: f64,
    /// Null on CUDA, whose timer reports the median only.
    min_ms: Option<f64>,
    gflops: f64,
    /// Bytes of Q, K, V and O moved per second at the median (what bounds decoding).
    gbytes_per_s: f64,
}

/// The device `--device` names (None: the best one here); a CUDA device that is not there is
/// an error naming the option.
fn target(ctx: &Context, device: Option<DeviceArg>) -> ufa::Result<Target> {
    let Some(device) = device else {
        let gpu = ctx.cuda_devices().is_ok_and(|d| !d.is_empty());
        return Ok(if gpu { Target::Cuda(0) } else { Target::Cpu });
    };
    match device {
        DeviceArg::Cpu => Ok(Target::Cpu),
        DeviceArg::All => Err(ufa::Error::invalid(
            "--device all: ufa bench times one device; use cpu, cuda or cuda:N",
        )),
        DeviceArg::Cuda(_) => Ok(Target::Cuda(cuda_ordinals(ctx, device)?.ordinals[0])),
    }
}

pub fn run(args: &Args) -> ufa::Result<ExitCode> {
    let ctx = args.compute.context(None)?;
    let target = target(&ctx, args.device)?;
    let dtype = args.dtype.unwrap_or(target.default_dtype());
    if !dtype.is_float() {
        return Err(ufa::Error::invalid(format!(
            "--dtype {dtype} must be f32, bf16 or f16"
        )));
    }
    let iters = args.iters.unwrap_or(target.default_iters()).max(1);
    let all = workloads(target);
    let chosen: Vec<&Workload> = all
        .iter()
        .filter(|w| {
            args.filter
                .as_ref()
                .is_none_or(|f| w.name.contains(f.as_str()))
        })
        .filter(|w| args.workload.as_ref().is_none_or(|n| &w.name == n))
        // A decoding step has no backward; asked for by name, it is an error that says so.
        .filter(|w| {
            !(args.backward && args.workload.is_none() && matches!(w.kind, Kind::KvCache(_)))
        })
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = all.iter().map(|w| w.name.as_str()).collect();
        return Err(ufa::Error::invalid(format!(
            "no workload matches --filter/--workload; workloads are {}",
            names.join(", ")
        )));
    }
    let kernels = match target {
        Target::Cpu => format!("cpu/{}", ctx.cpu_isa()),
        Target::Cuda(n) => format!("cuda:{n}"),
    };
    let bar = ProgressBar::new((chosen.len() * (iters + 1)) as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let mut measure = |w: &Workload| -> ufa::Result<Row> {
        bar.set_message(w.name.clone());
        let mut prepared = Prepared::new(w, dtype, args.backward, args.layout)?;
        let (median_ms, min_ms) = target.time(&ctx, &mut prepared, args.backward, iters, &bar)?;
        let median = median_ms / 1e3;
        Ok(Row {
            name: w.name.clone(),
            pass: if args.backward { "backward" } else { "forward" },
            layout: format!("{:?}", args.layout).to_lowercase(),
            shape: w.shape(),
            dtype: dtype.to_string(),
            causal: w.causal,
            threads: (target == Target::Cpu).then(|| ctx.num_threads()),
            kernels: kernels.clone(),
            median_ms,
            min_ms,
            gflops: w.flops(args.backward) / median / 1e9,
            gbytes_per_s: w.bytes(dtype) / median / 1e9,
        })
    };
    let rows: ufa::Result<Vec<Row>> = chosen.into_iter().map(&mut measure).collect();
    // Cleared before any error is printed, so the message is not drawn over.
    bar.finish_and_clear();
    let rows = rows?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("rows serialise")
        );
        return Ok(ExitCode::SUCCESS);
    }
    if let Target::Cuda(n) = target {
        if let Some(name) = ctx
            .cuda_devices()
            .ok()
            .and_then(|d| d.get(n as usize).cloned())
        {
            println!("cuda:{n}  {name}");
        }
    }
    // GPU rates read best in TFLOP/s, CPU ones in GFLOP/s.
    let (rate, scale) = match target {
        Target::Cpu => ("GFLOP/s", 1.0),
        Target::Cuda(_) => ("TFLOP/s", 1e-3),
    };
    println!(
        "{:<24} {:<8} {:<38} {:>5} {:>7} {:>21} {:>10} {:>9} {:>8}",
        "workload", "pass", "shape", "dtype", "threads", "kernels", "median ms", rate, "GB/s"
    );
    for r in &rows {
        println!(
            "{:<24} {:<8} {:<38} {:>5} {:>7} {:>21} {:>10.3} {:>9.1} {:>8.2}",
            r.name,
            r.pass,
            r.shape,
            r.dtype,
            r.threads.map_or("-".into(), |t| t.to_string()),
            r.kernels,
            r.median_ms,
            r.gflops * scale,
            r.gbytes_per_s
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_adds_the_standard_gpu_sweep() {
        let cpu = workloads(Target::Cpu);
        let cuda = workloads(Target::Cuda(0));
        for name in ["W1", "W2", "W2-causal", "W3", "W3-causal", "W4-decode"] {
            assert!(cpu.iter().any(|w| w.name == name), "{name}");
            assert!(cuda.iter().any(|w| w.name == name), "{name}");
        }
        let sweep: Vec<&Workload> = cuda.iter().filter(|w| w.name.starts_with("S-")).collect();
        assert_eq!(sweep.len(), 3 * 2 * 6);
        for w in sweep {
            assert_eq!(w.batch * w.seqlen_q, 16384, "{}", w.name);
            assert_eq!(w.heads * w.head_dim, 2048, "{}", w.name);
            assert_eq!(w.seqlen_q, w.seqlen_kv);
            assert_eq!(w.causal, w.name.ends_with("-causal"));
            assert!(w
                .name
                .starts_with(&format!("S-d{}-s{}", w.head_dim, w.seqlen_q)));
        }
        for list in [&cpu, &cuda] {
            let mut names: Vec<&str> = list.iter().map(|w| w.name.as_str()).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), list.len(), "workload names are unique");
        }
    }

    #[test]
    fn packed_batches_come_with_their_padded_twin() {
        for w in workloads(Target::Cuda(0)) {
            let Kind::Varlen(lens) = &w.kind else {
                continue;
            };
            let twin = w.name.replace("-varlen", "-padded");
            let all = workloads(Target::Cuda(0));
            let dense = all.iter().find(|d| d.name == twin).expect("a padded twin");
            assert_eq!(dense.kind, Kind::Dense);
            assert_eq!(dense.batch, lens.len());
            assert_eq!(dense.seqlen_q, *lens.iter().max().unwrap());
            assert_eq!(
                (dense.heads, dense.head_dim, dense.causal),
                (w.heads, w.head_dim, w.causal)
            );
            // Equal lengths: the same FLOPs as the dense batch.
            if lens.iter().all(|&l| l == lens[0]) {
                assert_eq!(w.flops(false), dense.flops(false));
            } else {
                assert!(w.flops(false) < dense.flops(false));
            }
        }
    }

    #[test]
    fn a_decoding_step_reads_the_cache_once_per_kv_head() {
        let all = workloads(Target::Cpu);
        let d = all.iter().find(|w| w.name == "D1-kvcache-page16").unwrap();
        assert_eq!(d.kind, Kind::KvCache(Some(16)));
        let cache = 2 * d.batch * d.seqlen_kv * d.heads_kv * d.head_dim * 4;
        let q_out = 2 * d.batch * d.heads * d.head_dim * 4;
        assert_eq!(d.bytes(DType::F32), (cache + q_out) as f64);
    }

    #[test]
    fn cuda_has_a_decoding_sweep() {
        let all = workloads(Target::Cuda(0));
        let sweep: Vec<_> = all.iter().filter(|w| w.name.starts_with("DS-")).collect();
        assert_eq!(sweep.len(), 3 * 3 * 2);
        assert!(sweep
            .iter()
            .all(|w| w.seqlen_q == 1 && w.heads == 4 * w.heads_kv));
        assert!(all.iter().any(|w| w.name == "DS-b32-kv32k-kvcache-page16"));
    }

    #[test]
    fn defaults_follow_the_device() {
        assert_eq!(Target::Cpu.default_dtype(), DType::F32);
        assert_eq!(Target::Cuda(1).default_dtype(), DType::BF16);
        assert!(Target::Cuda(0).default_iters() > Target::Cpu.default_iters());
    }

    #[test]
    fn bench_times_one_device() {
        let ctx = Context::new().unwrap();
        assert_eq!(target(&ctx, Some(DeviceArg::Cpu)).unwrap(), Target::Cpu);
        // The default is the best backend here: CUDA where a device is usable.
        let best = if ctx.cuda_devices().is_ok_and(|d| !d.is_empty()) {
            Target::Cuda(0)
        } else {
            Target::Cpu
        };
        assert_eq!(target(&ctx, None).unwrap(), best);
        let e = target(&ctx, Some(DeviceArg::All)).unwrap_err();
        assert!(e.message().contains("--device all"), "{e}");
    }
}
