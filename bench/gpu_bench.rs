//! Times ufa's CUDA forward pass on one problem and prints one JSON line; bench/gpu_sweep.py
//! runs it beside PyTorch. Usage:
//!   gpu_bench BATCH SEQLEN HEADS HEAD_DIM CAUSAL(0|1) [DTYPE=bf16] [ITERS=20]

use ufa::testing::Case;
use ufa::{forward_flops, Context, DType};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        eprintln!("usage: gpu_bench BATCH SEQLEN HEADS HEAD_DIM CAUSAL(0|1) [DTYPE] [ITERS]");
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
    let mut case = Case::new(batch, seqlen, seqlen, heads, head_dim, dtype);
    case.causal = causal;
    case.with_lse = false;
    let ctx = Context::new().expect("context");
    let inst = ufa::testing::Instance::new(&case, 1);
    match inst.time_cuda(&ctx, 0, 3, iters) {
        Ok(ms) => {
            let flops = forward_flops(batch, heads, seqlen, seqlen, head_dim, head_dim, causal);
            let kernel = ctx
                .cuda_module_reports()
                .first()
                .map(|r| r.kernel.clone())
                .unwrap_or_default();
            println!(
                "{{\"batch\":{batch},\"seqlen\":{seqlen},\"heads\":{heads},\"head_dim\":{head_dim},\"causal\":{causal},\
                 \"ms\":{ms:.5},\"tflops\":{:.2},\"kernel\":\"{kernel}\"}}",
                flops / (ms * 1e-3) / 1e12
            );
        }
        Err(e) => {
            eprintln!("ufa failed: {e}");
            std::process::exit(1);
        }
    }
}
