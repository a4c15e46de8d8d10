//! The CUDA backward pass against the f64 reference gradients: every feature and dtype, the
//! tensor-core kernel at each head dim and the CUDA-core one, odd sizes, GQA, causal with
//! seqlen_q != seqlen_kv, strided views, gradients poisoned first; and the deterministic mode's
//! bitwise reproducibility. Without a GPU these tests say so and pass, unless
//! `UFA_REQUIRE_GPU=1` (scripts/gpu-check).

use ufa::{Context, DType, Fp32Precision};
use ufa_testkit::cuda::{check_grads_cuda, gpu_present, loaded_kernels, run_suite, run_suite_in};
use ufa_testkit::{feature_cases, standard_grad_cases, Alibi, Case, GradComparison, Instance};

/// Runs every case's forward and backward on the GPU against the f64 reference gradients
/// (see `run_suite`).
fn run_grad_cases(cases: &[Case]) {
    run_suite(
        cases,
        |ctx, c, seed| check_grads_cuda(ctx, c, seed, 0),
        GradComparison::passed,
        GradComparison::summary,
    );
}

#[test]
fn standard_grad_cases_match_the_reference() {
    let mut cases = standard_grad_cases();
    cases.extend(standard_grad_cases().into_iter().map(|mut c| {
        c.deterministic = true;
        c
    }));
    run_grad_cases(&cases);
}

/// Each tensor-core head dim and dtype, plain and with every feature, at sizes that are not
/// multiples of any tile, both modes.
#[test]
fn tensor_core_backward_matches_the_reference() {
    let cases = ufa_testkit::tensor_core_cases(true);
    run_grad_cases(&cases);
}

/// fp32 on TF32 tensor cores in both precisions, each at its bound (the default one at the
/// CPU's fp32 bound), every tensor-core head dim, plain and with every feature, every other
/// case in deterministic mode.
#[test]
fn fp32_tensor_core_backward_matches_the_reference() {
    let mut cases = ufa_testkit::fp32_tensor_core_cases();
    for (i, c) in cases.iter_mut().enumerate() {
        c.deterministic = i % 2 == 1;
    }
    run_grad_cases(&cases);
}

/// fp32 gradients come from the tensor-core kernel in the forward's precision, not from the
/// CUDA-core row kernels.
#[test]
fn fp32_backward_takes_the_tensor_core_kernel() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    for precision in [Fp32Precision::Ieee, Fp32Precision::Tf32] {
        let mut c = Case::new(2, 300, 300, 4, 128, DType::F32);
        c.heads_kv = 2;
        c.causal = true;
        c.fp32_precision = precision;
        let r = check_grads_cuda(&ctx, &c, 3, 0).unwrap();
        assert!(r.passed(), "{}: {}", c.describe(), r.summary());
    }
    let kernels = loaded_kernels(&ctx);
    let backward: Vec<&String> = kernels
        .iter()
        .filter(|k| {
            k.starts_with("ufa_bwd_") && !k.contains("preprocess") && !k.contains("convert")
        })
        .collect();
    assert!(
        backward.len() == 2
            && backward.iter().any(|k| k.starts_with("ufa_bwd_sm80_f32_"))
            && backward.iter().any(|k| k.starts_with("ufa_bwd_sm80_tf32_")),
        "{backward:?}"
    );
}

/// Runs the cases' gradients on `ctx` against the reference, every other case (those of index
/// parity `parity`) in deterministic mode.
fn run_grads_every_other_deterministic(ctx: &Context, cases: &mut [Case], parity: usize) {
    for (i, c) in cases.iter_mut().enumerate() {
        c.deterministic = i % 2 == parity;
    }
    run_suite_in(
        ctx,
        cases,
        |ctx, c, seed| check_grads_cuda(ctx, c, seed, 0),
        GradComparison::passed,
        GradComparison::summary,
    );
}

/// Head dims between the tensor-core tiles and Q/K and V of different head dims (MLA's 192
/// and 128) against the reference, every other case deterministic; the 16-bit ones, and fp32
/// head dims that are multiples of 8, come from the tensor-core kernel (on the tile of the
/// larger head dim), not from the CUDA-core row kernels.
#[test]
fn padded_and_unequal_head_dims_backward_take_the_tensor_cores() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    let mut cases = ufa_testkit::unequal_head_dim_cases();
    cases.extend(
        ufa_testkit::padded_head_dim_cases()
            .into_iter()
            .filter(|c| c.dtype != DType::F32),
    );
    run_grads_every_other_deterministic(&ctx, &mut cases, 1);
    let kernels = loaded_kernels(&ctx);
    // MLA's 192/128 on Hopper with off-tile head dims on (UFA_CUDA_OFF_TILE): the wgmma
    // backward's d256 tile (both zero-padded); elsewhere mma.sync's d192.
    let hopper = kernels.iter().any(|k| k.starts_with("ufa_bwd_sm90"));
    let mla = if hopper && ufa::internals::off_tile_enabled() {
        "ufa_bwd_sm90_bf16_d256"
    } else {
        "ufa_bwd_sm80_bf16_d192"
    };
    assert!(
        kernels.iter().any(|k| k.starts_with(mla))
            && kernels
                .iter()
                .any(|k| k.starts_with("ufa_bwd_sm80_f32_d128"))
            && !kernels.iter().any(|k| k.starts_with("ufa_bwd_rows")),
        "{kernels:?}"
    );
    // fp32 head dims that are not multiples of 8 stay on the row kernels, and are right.
    run_grad_cases(
        &ufa_testkit::padded_head_dim_cases()
            .into_iter()
            .filter(|c| c.dtype == DType::F32)
            .collect::<Vec<_>>(),
    );
}

/// Head dims above 256 (to 512, 16-bit): the mma.sync backward with two key blocks a key range,
/// each half of the gradients' columns, against the reference, every other case deterministic
/// (the second half's dQ turns count on from the first's); none on the CUDA-core row kernels.
#[test]
fn wide_head_dims_backward_take_the_tensor_cores() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    let mut cases = ufa_testkit::wide_head_dim_cases();
    run_grads_every_other_deterministic(&ctx, &mut cases, 0);
    let kernels = loaded_kernels(&ctx);
    assert!(
        ["d320", "d384", "d512"].iter().all(|tile| kernels
            .iter()
            .any(|k| k.starts_with("ufa_bwd_sm80_") && k.contains(&format!("_{tile}_"))))
            && !kernels.iter().any(|k| k.starts_with("ufa_bwd_rows")),
        "{kernels:?}"
    );
}

/// The forward suite's features and layouts, every other case in deterministic mode.
#[test]
fn features_and_layouts_backward_match_the_reference() {
    let cases: Vec<Case> = feature_cases()
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            c.deterministic = i % 2 == 1;
            c
        })
        .collect();
    run_grad_cases(&cases);
}

/// Batch 0, seqlen_q 0, seqlen_kv 0: zero gradients where no term reaches them.
#[test]
fn empty_problems_backward_match_the_reference() {
    run_grad_cases(&ufa_testkit::empty_cases());
}

/// Ten deterministic runs give bitwise-identical dQ, dK and dV, at sizes where many key blocks
/// add into each dQ row (which atomics would reorder): causal bands (turns in descending key
/// block order) and full ones (rotated walks), at each Hopper layout.
#[test]
fn deterministic_backward_is_bitwise_reproducible() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    for (d, causal) in [
        (128, false),
        (64, true),
        (64, false),
        (256, false),
        (256, true),
        // Two key blocks a key range (each half of the columns): turns in both orders.
        (512, false),
        (512, true),
    ] {
        let mut c = Case::new(2, 1024, 1024, 8, d, DType::BF16);
        c.heads_kv = 2;
        c.causal = causal;
        c.deterministic = true;
        let mut first = None;
        for run in 0..10 {
            let mut inst = Instance::new(&c, 5);
            inst.run_backward_cuda(&ctx, 0).unwrap();
            let g = inst.grads().unwrap();
            assert!(g.iter().flatten().all(|x| x.is_finite()));
            match &first {
                None => first = Some(g),
                Some(f) => {
                    for (n, (a, b)) in ["dq", "dk", "dv"].iter().zip(f.iter().zip(&g)) {
                        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(
                            same,
                            "{n} of run {run} differs from run 0 ({})",
                            c.describe()
                        );
                    }
                }
            }
        }
        println!("ok   10 deterministic runs bitwise equal: {}", c.describe());
    }
}

/// Small backward problems for compute-sanitizer (memcheck, racecheck): the tensor-core
/// kernels in both modes, with and without score modifiers, at head dims 64, 128 and 256 (each
/// layout of the Hopper kernel), fp32 on TF32 tensor cores, unequal head dims on a padded
/// tile, and the CUDA-core one.
#[test]
#[ignore = "run under compute-sanitizer by scripts/gpu-check"]
fn sanitizer_backward_case() {
    let mut a = Case::new(1, 70, 150, 4, 64, DType::BF16);
    a.heads_kv = 2;
    a.causal = true;
    let mut b = a.clone();
    b.alibi = Some(Alibi::PerHead);
    b.softcap = 5.0;
    b.deterministic = true;
    let mut c = Case::new(1, 9, 40, 2, 80, DType::F32);
    c.causal = true;
    // On Hopper: two consumers with the dQ writer (d128), and the split head dim (d256).
    let mut d = a.clone();
    d.head_dim = 128;
    d.head_dim_v = 128;
    let mut e = Case::new(1, 70, 150, 2, 256, DType::F16);
    e.deterministic = true;
    // fp32 on TF32 tensor cores (its own shared-memory layout, bwd_tf32.cuh).
    let mut f = a.clone();
    f.dtype = DType::F32;
    let mut g = b.clone();
    g.dtype = DType::F32;
    g.head_dim = 128;
    g.head_dim_v = 128;
    // Q/K and V of different head dims on the tile of the larger one (MLA's 192/128; on
    // Hopper the wgmma d256 tile), and a head dim between the tiles (on Hopper the wgmma d128
    // tile): the padding columns are neither read nor written.
    let mut h = a.clone();
    h.head_dim = 192;
    h.head_dim_v = 128;
    h.deterministic = true;
    let mut i = a.clone();
    (i.head_dim, i.head_dim_v) = (80, 80);
    // A wide head dim (512): two key blocks a key range, each half of the columns, in
    // deterministic mode with score modifiers.
    let mut j = b.clone();
    (j.head_dim, j.head_dim_v) = (512, 512);
    run_grad_cases(&[a, b, c, d, e, f, g, h, i, j]);
}

/// NaN and ±inf planted in q, k, v, an additive mask, ALiBi slopes or dO reach exactly the
/// outputs and gradients they reach in the f64 reference, on every CUDA kernel the cases
/// select (wgmma and mma.sync tensor-core kernels, the CUDA-core one for fp32 and odd head
/// dims, few query rows over many keys), forward alone and with the backward.
#[test]
fn nonfinite_values_propagate_as_in_the_reference() {
    run_suite(
        &ufa_testkit::nonfinite_cases(),
        |ctx, c, seed| ufa_testkit::check_nonfinite_cuda(ctx, c, seed, 0),
        ufa_testkit::NonFiniteReport::passed,
        ufa_testkit::NonFiniteReport::summary,
    );
}
