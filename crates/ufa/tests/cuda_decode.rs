//! The CUDA decoding kernel (kernels/fwd_decode.cu) against the f64 reference: dense decoding
//! shapes (`testing::decode_cases`), split boundaries, splits with no visible key and every
//! score modifier; KV caches and packed batches reach it through the sequence suites. Outputs
//! are poisoned first. Without a GPU these tests say so and pass, unless `UFA_REQUIRE_GPU=1`.

use ufa_testkit::cuda::{check_case_cuda, loaded_kernels, run_suite};
use ufa_testkit::{decode_cases, Comparison};

#[test]
fn decoding_matches_the_reference() {
    run_suite(
        &decode_cases(),
        |ctx, c, seed| check_case_cuda(ctx, c, seed, 0),
        Comparison::passed,
        Comparison::summary,
    );
}

/// One decoding call split across blocks, with a window (splits that see no key) and GQA, for
/// compute-sanitizer (scripts/gpu-check runs it under memcheck and racecheck).
#[test]
#[ignore = "run by scripts/gpu-check under compute-sanitizer"]
fn sanitizer_decode_case() {
    let mut c = ufa_testkit::Case::new(1, 2, 3000, 8, 128, ufa::DType::BF16);
    c.heads_kv = 2;
    c.causal = true;
    c.window = (700, 0);
    // A head dim on a larger tile (zero padding), split too.
    let mut d = c.clone();
    (d.head_dim, d.head_dim_v) = (80, 80);
    run_suite(
        &[c, d],
        |ctx, c, seed| check_case_cuda(ctx, c, seed, 0),
        Comparison::passed,
        Comparison::summary,
    );
}

/// Head dims between the built tiles decode on the decoding kernel (next larger tile), not on
/// the prefill one: the modules a context loaded name the kernels that ran.
#[test]
fn padded_head_dims_decode_on_the_decoding_kernel() {
    let ctx = ufa::Context::new().unwrap();
    if !ufa_testkit::cuda::gpu_present(&ctx) {
        return;
    }
    let mut c = ufa_testkit::Case::new(2, 1, 4000, 16, 80, ufa::DType::BF16);
    c.heads_kv = 2;
    let r = check_case_cuda(&ctx, &c, 5, 0).unwrap();
    assert!(r.passed(), "{}: {}", c.describe(), r.summary());
    let kernels = loaded_kernels(&ctx);
    assert!(
        kernels
            .iter()
            .any(|k| k.starts_with("ufa_fwd_decode_bf16_d96"))
            && !kernels.iter().any(|k| k.starts_with("ufa_fwd_sm80_")),
        "{kernels:?}"
    );
}

/// A short split call is one launch on sm_90+: its splits merge within their thread-block
/// cluster, and the combine kernel is never loaded (before sm_90 it is the second launch). The
/// modules a fresh context loaded name the kernels that ran.
#[test]
fn short_split_decoding_merges_in_clusters() {
    let ctx = ufa::Context::new().unwrap();
    if !ufa_testkit::cuda::gpu_present(&ctx) {
        return;
    }
    // One sequence of 8 KV heads: 8 blocks, split to fill the device.
    let mut c = ufa_testkit::Case::new(1, 1, 4000, 32, 128, ufa::DType::BF16);
    c.heads_kv = 8;
    let r = check_case_cuda(&ctx, &c, 3, 0).unwrap();
    assert!(r.passed(), "{}: {}", c.describe(), r.summary());
    let reports = ctx.cuda_module_reports();
    // "sm_90a", "sm_100": the number, not the text, orders architectures.
    let arch_number = |arch: &str| -> u32 {
        let digits: String = arch[3..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap()
    };
    let hopper_or_later = reports.iter().all(|m| arch_number(&m.arch) >= 90);
    let names: Vec<&str> = reports.iter().map(|m| m.kernel.as_str()).collect();
    assert!(
        names.iter().any(|k| k.starts_with("ufa_fwd_decode_")),
        "{names:?}"
    );
    assert_eq!(
        names.contains(&"ufa_decode_combine"),
        !hopper_or_later,
        "{reports:?}"
    );
}

/// The split count and the merge order depend only on the problem and the device: ten runs of
/// split decoding calls (one sequence, many splits; GQA over a paged-size cache; splits merged
/// within a cluster on sm_90+) are bitwise equal.
#[test]
fn split_decoding_is_bitwise_reproducible() {
    let ctx = ufa::Context::new().unwrap();
    if !ufa_testkit::cuda::gpu_present(&ctx) {
        return;
    }
    for (batch, heads_kv, skv) in [(1, 1, 30011), (2, 4, 8193), (1, 2, 4097)] {
        let mut c = ufa_testkit::Case::new(batch, 1, skv, 32, 128, ufa::DType::BF16);
        c.heads_kv = heads_kv;
        let mut first = None;
        for run in 0..10 {
            let mut inst = ufa_testkit::Instance::new(&c, 9);
            inst.run_cuda(&ctx, 0).unwrap();
            let (out, lse) = inst.outputs();
            assert!(out.iter().all(|x| x.is_finite()));
            let bits: Vec<u64> = out
                .iter()
                .chain(lse.iter().flatten())
                .map(|x| x.to_bits())
                .collect();
            match &first {
                None => first = Some(bits),
                Some(f) => assert!(
                    *f == bits,
                    "run {run} differs from run 0 ({})",
                    c.describe()
                ),
            }
        }
        println!("ok   10 runs bitwise equal: {}", c.describe());
    }
}
