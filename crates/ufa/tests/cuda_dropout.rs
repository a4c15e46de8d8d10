//! Dropout on CUDA against the f64 reference, which draws the same generator (crate::dropout):
//! the forward and the gradients of every kernel that drops (the wgmma and mma.sync prefill and
//! backward at each head dim and dtype, fp32 on TF32 tensor cores, the CUDA-core kernels), packed
//! batches, the exact mask read back through an identity V, which kernels a call with dropout
//! takes, and bitwise repeatability for a seed and different masks for different offsets.
//! Without a GPU these tests say so and pass, unless `UFA_REQUIRE_GPU=1` (scripts/gpu-check).

use ufa::{Context, DType, Dropout, Fp32Precision};
use ufa_testkit::cuda::{
    check_case_cuda, check_grads_cuda, gpu_present, loaded_kernels, run_suite,
};
use ufa_testkit::{
    check_varlen_cuda, check_varlen_grads_cuda, tensor_core_cases, Alibi, Case, Comparison,
    Features, GradComparison, Instance, MaskSpec, VarlenCase,
};

/// Rates and generator states the cases cycle through: low and high rates, seeds and offsets
/// with both halves set (the key mixes the offset's high word in).
const DROPOUTS: [Dropout; 4] = [
    Dropout {
        p: 0.1,
        seed: 1,
        offset: 0,
    },
    Dropout {
        p: 0.5,
        seed: 0xdead_beef_1234,
        offset: 77,
    },
    Dropout {
        p: 0.9,
        seed: u64::MAX,
        offset: u64::MAX,
    },
    Dropout {
        p: 0.25,
        seed: 42,
        offset: 1 << 40,
    },
];

fn with_dropout(cases: Vec<Case>) -> Vec<Case> {
    cases
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            c.dropout = Some(DROPOUTS[i % DROPOUTS.len()]);
            c
        })
        .collect()
}

/// Other dtypes and what the tensor-core kernels do not take, shapes the dropping kernels must
/// still serve: fp32 in both precisions (TF32 tensor cores), a padded head dim, K and V of
/// different head dims (on Hopper's warp-specialised forward each on its own tile width, on
/// mma.sync the larger one's tile), an fp32 output from bf16 inputs (CUDA-core kernels), one
/// query row (a decoding shape, which the prefill kernel serves with dropout), and a
/// boolean mask with softcap.
fn other_cases() -> Vec<Case> {
    let mut out = Vec::new();
    for precision in [Fp32Precision::Ieee, Fp32Precision::Tf32] {
        let mut c = Case::new(2, 77, 131, 4, 64, DType::F32);
        c.heads_kv = 2;
        c.causal = true;
        c.fp32_precision = precision;
        out.push(c);
    }
    let mut c = Case::new(1, 90, 70, 4, 40, DType::BF16);
    c.window = (20, 5);
    out.push(c);
    let mut c = Case::new(2, 33, 45, 2, 32, DType::F16);
    c.head_dim_v = 48;
    out.push(c);
    // MLA's pair (the warp-specialised forward on Hopper, V of its own width).
    let mut c = Case::new(2, 150, 290, 4, 192, DType::BF16);
    c.head_dim_v = 128;
    c.heads_kv = 2;
    c.causal = true;
    out.push(c);
    let mut c = Case::new(2, 50, 64, 2, 64, DType::BF16);
    c.out_dtype = DType::F32;
    out.push(c);
    let mut c = Case::new(3, 1, 700, 8, 128, DType::BF16);
    c.heads_kv = 1;
    out.push(c);
    let mut c = Case::new(2, 65, 97, 4, 128, DType::F16);
    c.softcap = 20.0;
    c.alibi = Some(Alibi::PerHead);
    c.mask = Some(MaskSpec {
        dtype: DType::Bool,
        full: [false, true, true, true],
        ndim: 4,
    });
    out.push(c);
    with_dropout(out)
}

#[test]
fn forward_matches_the_reference() {
    let mut cases = with_dropout(tensor_core_cases(false));
    cases.extend(other_cases());
    run_suite(
        &cases,
        |ctx, c, seed| check_case_cuda(ctx, c, seed, 0),
        Comparison::passed,
        Comparison::summary,
    );
}

#[test]
fn gradients_match_the_reference() {
    let mut cases = with_dropout(tensor_core_cases(true));
    cases.extend(other_cases().into_iter().filter(|c| c.seqlen_q > 1));
    run_suite(
        &cases,
        |ctx, c, seed| check_grads_cuda(ctx, c, seed, 0),
        GradComparison::passed,
        GradComparison::summary,
    );
}

/// Packed batches draw sequence b as batch entry b, rows and keys counted within it: packed,
/// counted (seqused_kv) and paged keys forward, packed gradients.
#[test]
fn varlen_matches_the_reference() {
    let mut cases = Vec::new();
    for (i, (d, dtype)) in [(64, DType::BF16), (128, DType::F16), (96, DType::BF16)]
        .into_iter()
        .enumerate()
    {
        let mut f = Features::new(8, 2, d, dtype);
        f.causal = i != 1;
        f.dropout = Some(DROPOUTS[i]);
        cases.push(VarlenCase::new(
            &[300, 1, 129, 0, 64],
            &[257, 40, 129, 7, 500],
            f.clone(),
        ));
        let mut used = VarlenCase::new(&[70, 12], &[150, 333], f.clone());
        used.used_kv = Some(vec![111, 333]);
        cases.push(used);
        let mut paged = VarlenCase::new(&[150, 70], &[600, 90], f);
        paged.page_size = Some(16);
        cases.push(paged);
    }
    run_suite(
        &cases,
        |ctx, c, seed| check_varlen_cuda(ctx, c, seed, 0),
        Comparison::passed,
        Comparison::summary,
    );
    // The backward takes packed keys (no block table, no seqused_kv).
    let grads: Vec<VarlenCase> = cases
        .into_iter()
        .filter(|c| c.page_size.is_none() && c.used_kv.is_none())
        .collect();
    run_suite(
        &grads,
        |ctx, c, seed| check_varlen_grads_cuda(ctx, c, seed, 0),
        GradComparison::passed,
        GradComparison::summary,
    );
}

/// With V the identity, output row i is row i of the probabilities after dropout: exactly 0
/// where the generator drops, and nonzero where it keeps (every key is visible and no
/// probability underflows). Checked against `Dropout::scale`, the reference's own rule, for
/// every forward kernel that drops: the tensor-core prefill in f16 and bf16 (wgmma on Hopper,
/// mma.sync elsewhere; scripts/gpu-check also runs the suite with UFA_CUDA_WGMMA=0), fp32 in
/// both modes, and K and V of different head dims (V's own tile width on Hopper).
#[test]
fn the_mask_is_exactly_the_generators() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    let mut cases = Vec::new();
    for (dtype, precision) in [
        (DType::F16, Fp32Precision::Ieee),
        (DType::BF16, Fp32Precision::Ieee),
        (DType::F32, Fp32Precision::Ieee),
        (DType::F32, Fp32Precision::Tf32),
    ] {
        let mut c = Case::new(2, 77, 64, 4, 64, dtype);
        c.heads_kv = 2;
        c.fp32_precision = precision;
        cases.push(c);
    }
    let mut c = Case::new(2, 40, 60, 3, 32, DType::BF16);
    c.head_dim_v = 64;
    cases.push(c);
    for (n, mut c) in cases.into_iter().enumerate() {
        let d = DROPOUTS[n % DROPOUTS.len()];
        c.dropout = Some(d);
        let mut inst = Instance::new(&c, 17);
        inst.set_v_identity();
        inst.run_cuda(&ctx, 0).unwrap();
        let (out, _) = inst.outputs();
        let (mut kept, mut wrong) = (0usize, Vec::new());
        for b in 0..c.batch {
            for i in 0..c.seqlen_q {
                for h in 0..c.heads_q {
                    let row = &out[((b * c.seqlen_q + i) * c.heads_q + h) * c.head_dim_v..];
                    for (j, &x) in row[..c.seqlen_kv].iter().enumerate() {
                        let keep = d.scale(b * c.heads_q + h, i, j) != 0.0;
                        kept += keep as usize;
                        if keep != (x != 0.0) || !x.is_finite() {
                            wrong.push((b, i, h, j, x));
                        }
                    }
                }
            }
        }
        let total = c.batch * c.seqlen_q * c.heads_q * c.seqlen_kv;
        assert!(
            wrong.is_empty(),
            "{}: {} of {total} probabilities disagree with the generator, first {:?}",
            c.describe(),
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
        println!(
            "ok   mask exact, {kept} of {total} kept (p = {}): {}",
            d.p,
            c.describe()
        );
    }
}

/// A call with dropout takes the dropping variants (on Hopper the wgmma forward and backward),
/// never a kernel that would ignore it.
#[test]
fn dropout_takes_the_dropping_kernels() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    let mut c = Case::new(2, 300, 300, 8, 128, DType::BF16);
    c.causal = true;
    c.dropout = Some(DROPOUTS[1]);
    let r = check_grads_cuda(&ctx, &c, 3, 0).unwrap();
    assert!(r.passed(), "{}: {}", c.describe(), r.summary());
    let mut one_row = Case::new(4, 1, 900, 8, 128, DType::BF16);
    one_row.heads_kv = 2;
    one_row.dropout = Some(DROPOUTS[0]);
    let r = check_case_cuda(&ctx, &one_row, 3, 0).unwrap();
    assert!(r.passed(), "{}: {}", one_row.describe(), r.summary());
    let kernels = loaded_kernels(&ctx);
    let attention: Vec<&String> = kernels
        .iter()
        .filter(|k| k.starts_with("ufa_fwd_") || k.starts_with("ufa_bwd_sm"))
        .collect();
    assert!(
        !attention.is_empty() && attention.iter().all(|k| k.ends_with("_drop")),
        "{attention:?}"
    );
}

/// The same seed and offset give bitwise the same output and (deterministic) gradients; another
/// offset, or another seed, gives another mask.
#[test]
fn a_seed_repeats_bitwise_and_offsets_differ() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    let mut c = Case::new(2, 513, 700, 8, 64, DType::BF16);
    c.heads_kv = 2;
    c.causal = true;
    c.deterministic = true;
    let run = |d: Dropout| {
        let mut c = c.clone();
        c.dropout = Some(d);
        let mut inst = Instance::new(&c, 9);
        inst.run_backward_cuda(&ctx, 0).unwrap();
        let (out, _) = inst.outputs();
        let g = inst.grads().unwrap();
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<u64>>();
        (bits(&out), g.map(|v| bits(&v)))
    };
    let d = Dropout {
        p: 0.2,
        seed: 1234,
        offset: 8,
    };
    let first = run(d);
    assert_eq!(first, run(d), "two runs of one seed and offset differ");
    let other_offset = run(Dropout { offset: 9, ..d });
    let other_seed = run(Dropout { seed: 1235, ..d });
    for (what, other) in [("offset", other_offset), ("seed", other_seed)] {
        assert_ne!(first.0, other.0, "another {what} gave the same output");
        for (n, (a, b)) in ["dq", "dk", "dv"].iter().zip(first.1.iter().zip(&other.1)) {
            assert_ne!(a, b, "another {what} gave the same {n}");
        }
    }
    println!(
        "ok   bitwise repeatable; other offsets and seeds differ: {}",
        c.describe()
    );
}
