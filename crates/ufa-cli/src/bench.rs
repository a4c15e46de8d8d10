//! `ufa bench`: forward-pass timings on standard shapes.

use crate::ComputeOpts;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use ufa::testing::{Case, Instance, Placement};
use ufa::DType;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    compute: ComputeOpts,
    /// Input and output dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// Timed runs per shape (the median is reported).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Only workloads whose name contains this text (e.g. W3 runs W3 and W3-causal).
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
    name: &'static str,
    batch: usize,
    heads: usize,
    seqlen_q: usize,
    seqlen_kv: usize,
    head_dim: usize,
    causal: bool,
}

/// DESIGN.md's CPU workloads W1-W4 (W3 causal and not).
const WORKLOADS: &[Workload] = &[
    Workload {
        name: "W1",
        batch: 1,
        heads: 8,
        seqlen_q: 1024,
        seqlen_kv: 1024,
        head_dim: 64,
        causal: false,
    },
    Workload {
        name: "W2",
        batch: 1,
        heads: 8,
        seqlen_q: 4096,
        seqlen_kv: 4096,
        head_dim: 64,
        causal: false,
    },
    Workload {
        name: "W2-causal",
        batch: 1,
        heads: 8,
        seqlen_q: 4096,
        seqlen_kv: 4096,
        head_dim: 64,
        causal: true,
    },
    Workload {
        name: "W3",
        batch: 1,
        heads: 16,
        seqlen_q: 2048,
        seqlen_kv: 2048,
        head_dim: 128,
        causal: false,
    },
    Workload {
        name: "W3-causal",
        batch: 1,
        heads: 16,
        seqlen_q: 2048,
        seqlen_kv: 2048,
        head_dim: 128,
        causal: true,
    },
    Workload {
        name: "W4-decode",
        batch: 1,
        heads: 32,
        seqlen_q: 1,
        seqlen_kv: 4096,
        head_dim: 128,
        causal: false,
    },
];

#[derive(Serialize)]
struct Row {
    name: &'static str,
    pass: &'static str,
    layout: String,
    shape: String,
    dtype: String,
    causal: bool,
    threads: usize,
    kernels: String,
    median_ms: f64,
    min_ms: f64,
    gflops: f64,
    /// Bytes of Q, K, V and O moved per second at the median (what bounds decoding).
    gbytes_per_s: f64,
}

pub fn run(args: &Args) -> ufa::Result<ExitCode> {
    if !args.dtype.is_float() {
        return Err(ufa::Error::invalid(format!(
            "--dtype {} must be f32, bf16 or f16",
            args.dtype
        )));
    }
    let iters = args.iters.max(1);
    let ctx = args.compute.context(None)?;
    let chosen: Vec<&Workload> = WORKLOADS
        .iter()
        .filter(|w| {
            args.filter
                .as_ref()
                .is_none_or(|f| w.name.contains(f.as_str()))
        })
        .filter(|w| args.workload.as_ref().is_none_or(|n| w.name == n))
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
        return Err(ufa::Error::invalid(format!(
            "no workload matches --filter/--workload; workloads are {}",
            names.join(", ")
        )));
    }
    let bar = ProgressBar::new((chosen.len() * (iters + 1)) as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let mut rows = Vec::new();
    for w in chosen {
        bar.set_message(w.name);
        let mut case = Case::new(
            w.batch,
            w.seqlen_q,
            w.seqlen_kv,
            w.heads,
            w.head_dim,
            args.dtype,
        );
        case.causal = w.causal;
        case.with_lse = args.backward;
        if args.layout == Layout::Bhsd {
            case.placement = [Placement::HeadsFirst; 4];
        }
        let mut inst = Instance::new(&case, 1);
        // Warm-up (page faults, thread start-up); the backward needs the forward's outputs.
        inst.run(&ctx)?;
        if args.backward {
            inst.run_backward(&ctx)?;
        }
        bar.inc(1);
        let mut times: Vec<Duration> = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            if args.backward {
                inst.run_backward(&ctx)?;
            } else {
                inst.run(&ctx)?;
            }
            times.push(t.elapsed());
            bar.inc(1);
        }
        times.sort();
        let median = times[times.len() / 2].as_secs_f64();
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
        rows.push(Row {
            name: w.name,
            pass: if args.backward { "backward" } else { "forward" },
            layout: format!("{:?}", args.layout).to_lowercase(),
            shape: format!(
                "B{} H{} Sq{} Skv{} D{}",
                w.batch, w.heads, w.seqlen_q, w.seqlen_kv, w.head_dim
            ),
            dtype: args.dtype.to_string(),
            causal: w.causal,
            threads: ctx.num_threads(),
            kernels: format!("cpu/{}", ctx.cpu_isa()),
            median_ms: median * 1e3,
            min_ms: times[0].as_secs_f64() * 1e3,
            gflops: flops / median / 1e9,
            gbytes_per_s: (elems * args.dtype.size_in_bytes()) as f64 / median / 1e9,
        });
    }
    bar.finish_and_clear();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("rows serialise")
        );
    } else {
        println!(
            "{:<10} {:<8} {:<32} {:>5} {:>7} {:>11} {:>10} {:>9} {:>8}",
            "workload",
            "pass",
            "shape",
            "dtype",
            "threads",
            "kernels",
            "median ms",
            "GFLOP/s",
            "GB/s"
        );
        for r in &rows {
            println!(
                "{:<10} {:<8} {:<32} {:>5} {:>7} {:>11} {:>10.3} {:>9.1} {:>8.2}",
                r.name,
                r.pass,
                r.shape,
                r.dtype,
                r.threads,
                r.kernels,
                r.median_ms,
                r.gflops,
                r.gbytes_per_s
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
