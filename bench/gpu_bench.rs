//! Times ufa's CUDA forward or backward pass on one problem and prints one JSON line;
//! bench/gpu_sweep.py runs it beside PyTorch. Usage:
//!   gpu_bench BATCH SEQLEN HEADS HEAD_DIM CAUSAL(0|1) [DTYPE=bf16] [ITERS=20] [PASS=fwd|bwd|bwd-det]
//! `bwd` times the backward call alone (dQ, dK, dV from a saved forward); its TFLOP/s count
//! 2.5 times the forward's flops (five matrix products to the forward's two), as
//! FlashAttention reports them.

use ufa::{forward_flops, Context, DType};
use ufa_testkit::Case;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        eprintln!(
            "usage: gpu_bench BATCH SEQLEN HEADS HEAD_DIM CAUSAL(0|1) [DTYPE] [ITERS] [PASS]"
        );
        std::process::exit(2);
    }
    let n = |i: usize| -> usize {
        args[i]
            .parse()
            .unwrap_or_else(|_| panic!("argument {} must be a number", i + 1))
    };
    let (batch, seqlen, heads, head_dim, causal) = (n(0), n(1), n(2), n(3), n(4) == 1);
    let dtype: DType = args
        .get(5)
        .map_or(Ok(DType::BF16), |s| s.parse())
        .unwrap_or_else(|e| panic!("{e}"));
    let iters = args
        .get(6)
        .map_or(20, |s| s.parse().expect("ITERS must be a number"));
    let pass = args.get(7).map_or("fwd", |s| s.as_str());
    let backward = match pass {
        "fwd" => false,
        "bwd" | "bwd-det" => true,
        other => {
            eprintln!("PASS must be fwd, bwd or bwd-det, not {other}");
            std::process::exit(2);
        }
    };
    let mut case = Case::new(batch, seqlen, seqlen, heads, head_dim, dtype);
    case.causal = causal;
    case.with_lse = backward;
    case.deterministic = pass == "bwd-det";
    let ctx = Context::new().expect("context");
    let mut inst = ufa_testkit::Instance::new(&case, 1);
    let timed = if backward {
        inst.time_cuda_backward(&ctx, 0, 3, iters)
    } else {
        inst.time_cuda(&ctx, 0, 3, iters)
    };
    match timed {
        Ok(ms) => {
            let fwd = forward_flops(batch, heads, seqlen, seqlen, head_dim, head_dim, causal);
            let flops = if backward { 2.5 * fwd } else { fwd };
            // The main kernel: the forward's, or the backward's tensor-core (or first) kernel
            // (ufa_fwd_*, ufa_fwd90_*, ufa_bwd_*, ufa_bwd90_*), with its registers and spills.
            let pass_prefix = if backward { "ufa_bwd" } else { "ufa_fwd" };
            let reports = ctx.cuda_module_reports();
            let main = reports
                .iter()
                .find(|r| {
                    r.kernel.starts_with(pass_prefix) && r.kernel.contains(&format!("_{dtype}_"))
                })
                .or(reports.first());
            let (kernel, registers, spill) = main
                .map(|r| (r.kernel.clone(), r.registers, r.spill_bytes))
                .unwrap_or_default();
            println!(
                "{{\"batch\":{batch},\"seqlen\":{seqlen},\"heads\":{heads},\"head_dim\":{head_dim},\"causal\":{causal},\
                 \"ms\":{ms:.5},\"tflops\":{:.2},\"kernel\":\"{kernel}\",\"registers\":{registers},\
                 \"spill_bytes\":{spill}}}",
                flops / (ms * 1e-3) / 1e12
            );
        }
        Err(e) => {
            eprintln!("ufa failed: {e}");
            std::process::exit(1);
        }
    }
}
