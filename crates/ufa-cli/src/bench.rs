//! `ufa bench`: forward-pass timings on standard shapes.

use crate::device::{cuda_ordinals, DeviceArg};
use crate::ComputeOpts;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use ufa::testing::{Case, Instance, Placement};
use ufa::{Context, DType};

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
    seqlen_q: usize,
    seqlen_kv: usize,
    head_dim: usize,
    causal: bool,
}

/// DESIGN.md's CPU workloads W1-W4 (W2 and W3 causal and not), and on CUDA also its standard GPU
/// sweep: 16k tokens in total, hidden 2048 (heads = 2048 / head_dim), named like
/// `S-d128-s4096` and `S-d128-s4096-causal`, in bench/gpu_sweep.py's order.
fn workloads(target: Target) -> Vec<Workload> {
    let w = |name: String, batch, heads, seqlen_q, seqlen_kv, head_dim, causal| Workload {
        name,
        batch,
        heads,
        seqlen_q,
        seqlen_kv,
        head_dim,
        causal,
    };
    let mut v = vec![
        w("W1".into(), 1, 8, 1024, 1024, 64, false),
        w("W2".into(), 1, 8, 4096, 4096, 64, false),
        w("W2-causal".into(), 1, 8, 4096, 4096, 64, true),
        w("W3".into(), 1, 16, 2048, 2048, 128, false),
        w("W3-causal".into(), 1, 16, 2048, 2048, 128, true),
        w("W4-decode".into(), 1, 32, 1, 4096, 128, false),
    ];
    if let Target::Cuda(_) = target {
        for head_dim in [64, 128, 256] {
            for causal in [false, true] {
                for seqlen in [512, 1024, 2048, 4096, 8192, 16384] {
                    let name = format!(
                        "S-d{head_dim}-s{seqlen}{}",
                        if causal { "-causal" } else { "" }
                    );
                    let batch = 16384 / seqlen;
                    v.push(w(
                        name,
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
    v
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
        inst: &mut Instance,
        backward: bool,
        iters: usize,
        bar: &ProgressBar,
    ) -> ufa::Result<(f64, Option<f64>)> {
        match (self, backward) {
            (Target::Cpu, false) => wall_ms(iters, bar, || inst.run(ctx)),
            (Target::Cpu, true) => {
                inst.run(ctx)?;
                wall_ms(iters, bar, || inst.run_backward(ctx))
            }
            (Target::Cuda(n), false) => {
                // Several warm-up calls: the first also compiles or loads the kernel.
                let ms = inst.time_cuda(ctx, n, 3, iters)?;
                bar.inc(iters as u64 + 1);
                Ok((ms, None))
            }
            (Target::Cuda(n), true) => {
                let ms = inst.time_cuda_backward(ctx, n, 3, iters)?;
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
        let mut case = Case::new(w.batch, w.seqlen_q, w.seqlen_kv, w.heads, w.head_dim, dtype);
        case.causal = w.causal;
        case.with_lse = args.backward;
        if args.layout == Layout::Bhsd {
            case.placement = [Placement::HeadsFirst; 4];
        }
        let mut inst = Instance::new(&case, 1);
        let (median_ms, min_ms) = target.time(&ctx, &mut inst, args.backward, iters, &bar)?;
        let median = median_ms / 1e3;
        // FlashAttention's convention: the backward counts 2.5 forwards.
        let pass_factor = if args.backward { 2.5 } else { 1.0 };
        let flops = pass_factor
            * ufa::forward_flops(
                w.batch,
                w.heads,
                w.seqlen_q,
                w.seqlen_kv,
                w.head_dim,
                w.head_dim,
                w.causal,
            );
        let elems = w.batch * w.heads * (2 * w.seqlen_q + 2 * w.seqlen_kv) * w.head_dim;
        Ok(Row {
            name: w.name.clone(),
            pass: if args.backward { "backward" } else { "forward" },
            layout: format!("{:?}", args.layout).to_lowercase(),
            shape: format!(
                "B{} H{} Sq{} Skv{} D{}",
                w.batch, w.heads, w.seqlen_q, w.seqlen_kv, w.head_dim
            ),
            dtype: dtype.to_string(),
            causal: w.causal,
            threads: (target == Target::Cpu).then(|| ctx.num_threads()),
            kernels: kernels.clone(),
            median_ms,
            min_ms,
            gflops: flops / median / 1e9,
            gbytes_per_s: (elems * dtype.size_in_bytes()) as f64 / median / 1e9,
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
        "{:<20} {:<8} {:<34} {:>5} {:>7} {:>14} {:>10} {:>9} {:>8}",
        "workload", "pass", "shape", "dtype", "threads", "kernels", "median ms", rate, "GB/s"
    );
    for r in &rows {
        println!(
            "{:<20} {:<8} {:<34} {:>5} {:>7} {:>14} {:>10.3} {:>9.1} {:>8.2}",
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
        assert_eq!(cpu.len(), 6);
        assert_eq!(cuda.len(), 6 + 3 * 2 * 6);
        for (a, b) in cpu.iter().zip(&cuda) {
            assert_eq!(a.name, b.name);
        }
        for w in &cuda[6..] {
            assert_eq!(w.batch * w.seqlen_q, 16384, "{}", w.name);
            assert_eq!(w.heads * w.head_dim, 2048, "{}", w.name);
            assert_eq!(w.seqlen_q, w.seqlen_kv);
            assert_eq!(w.causal, w.name.ends_with("-causal"));
            assert!(w
                .name
                .starts_with(&format!("S-d{}-s{}", w.head_dim, w.seqlen_q)));
        }
        let mut names: Vec<&str> = cuda.iter().map(|w| w.name.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), cuda.len(), "workload names are unique");
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
