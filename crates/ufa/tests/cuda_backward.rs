//! The CUDA backward pass against the f64 reference gradients: every feature and dtype, the
//! tensor-core kernel at each head dim and the CUDA-core one, odd sizes, GQA, causal with
//! seqlen_q != seqlen_kv, strided views, gradients poisoned first; and the deterministic mode's
//! bitwise reproducibility. Without a GPU these tests say so and pass, unless
//! `UFA_REQUIRE_GPU=1` (scripts/gpu-check).

use ufa::testing::cuda::{check_grads_cuda, gpu_present};
use ufa::testing::{standard_grad_cases, Alibi, Case, Instance, MaskSpec, Placement};
use ufa::{CausalAlignment, Context, DType};

/// Runs every case's forward and backward on the GPU, prints one line each, and fails listing
/// every case that missed.
fn run_grad_cases(cases: &[Case]) {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    let seed = ufa::testing::seed();
    println!("seed {seed} (UFA_TEST_SEED={seed} replays)");
    let mut failed = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let s = seed.wrapping_add(i as u64);
        match check_grads_cuda(&ctx, c, s, 0) {
            Ok(r) => {
                let ok = r.passed();
                println!(
                    "{} {:<64} dq {:.2e} dk {:.2e} dv {:.2e} (bounds {:.0e} {:.0e} {:.0e}) unwritten {}",
                    if ok { "ok  " } else { "FAIL" },
                    describe(c),
                    r.dq,
                    r.dk,
                    r.dv,
                    r.tolerance[0],
                    r.tolerance[1],
                    r.tolerance[2],
                    r.unwritten
                );
                if !ok {
                    failed.push(format!("{} (seed {s}): {r:?}", describe(c)));
                }
            }
            Err(e) => {
                println!("ERR  {:<64} {e}", describe(c));
                failed.push(format!("{} (seed {s}): {e}", describe(c)));
            }
        }
    }
    for r in ctx.cuda_module_reports() {
        println!(
            "module {:<44} {} compile {:.2}s load {:.1}ms cached {} regs {} spill {}B",
            r.kernel,
            r.arch,
            r.compile_s,
            r.load_s * 1e3,
            r.from_cache,
            r.registers,
            r.spill_bytes
        );
    }
    assert!(
        failed.is_empty(),
        "{} case(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

fn describe(c: &Case) -> String {
    format!(
        "{}{}",
        c.describe(),
        if c.deterministic { " det" } else { "" }
    )
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
    let mut cases = Vec::new();
    for dtype in [DType::BF16, DType::F16] {
        for (i, d) in [32, 64, 96, 128, 160, 192, 256].into_iter().enumerate() {
            let mut c = Case::new(2, 129 + 7 * i, 257 - 11 * i, 4, d, dtype);
            c.heads_kv = [1, 2, 4][i % 3];
            c.deterministic = i % 2 == 0;
            cases.push(c.clone());
            c.causal = true;
            cases.push(c.clone());
            c.seqlen_q = 300;
            c.seqlen_kv = 77;
            c.deterministic = !c.deterministic;
            cases.push(c.clone());
            let mut m = Case::new(1, 70, 150, 4, d, dtype);
            m.softcap = 20.0;
            m.alibi = Some(Alibi::PerHead);
            m.window = (40, 9);
            cases.push(m);
        }
    }
    run_grad_cases(&cases);
}

#[test]
fn features_and_layouts_backward_match_the_reference() {
    use DType::*;
    let mut cases = Vec::new();
    for (sq, skv) in [(1, 1), (1, 700), (17, 17), (700, 129), (129, 700)] {
        let mut c = Case::new(1, sq, skv, 8, 128, BF16);
        c.heads_kv = 1; // MQA
        c.causal = true;
        cases.push(c.clone());
        c.alignment = CausalAlignment::TopLeft;
        c.heads_kv = 2; // GQA 4
        c.deterministic = true;
        cases.push(c);
    }
    let mut c = Case::new(2, 200, 300, 8, 64, F16);
    c.window = (32, 8);
    cases.push(c.clone());
    c.window = (0, 0);
    cases.push(c.clone());
    c.window = (-1, 5);
    cases.push(c);
    for mask in [
        MaskSpec {
            dtype: Bool,
            full: [true, false, true, true],
            ndim: 4,
        },
        MaskSpec {
            dtype: F32,
            full: [false, true, true, true],
            ndim: 3,
        },
        MaskSpec {
            dtype: BF16,
            full: [false, false, false, true],
            ndim: 1,
        },
    ] {
        let mut c = Case::new(2, 45, 77, 4, 64, BF16);
        c.mask = Some(mask);
        cases.push(c.clone());
        c.causal = true;
        c.dtype = F16;
        c.out_dtype = F16;
        cases.push(c);
    }
    let mut c = Case::new(2, 33, 70, 4, 128, F16);
    c.alibi = Some(Alibi::PerBatchHead);
    c.causal = true;
    cases.push(c);
    for placement in [Placement::HeadsFirst, Placement::Padded] {
        let mut c = Case::new(2, 100, 130, 4, 128, BF16);
        c.placement = [placement; 4];
        cases.push(c.clone());
        c.placement = [
            Placement::Contiguous,
            placement,
            Placement::HeadsFirst,
            placement,
        ];
        c.causal = true;
        cases.push(c);
    }
    for scale in [-0.2, 0.0] {
        let mut c = Case::new(1, 40, 50, 2, 64, BF16);
        c.scale = Some(scale);
        c.causal = true;
        cases.push(c);
    }
    // The CUDA-core path: fp32, head dims off the tensor-core list, mixed dtypes.
    for (d, dv, dtype, out) in [
        (80, 80, F32, F32),
        (48, 48, BF16, BF16),
        (512, 48, F32, BF16),
        (64, 32, F16, F32),
        (128, 128, BF16, F32),
    ] {
        let mut c = Case::new(2, 37, 300, 4, d, dtype);
        c.head_dim_v = dv;
        c.out_dtype = out;
        c.heads_kv = 2;
        c.causal = true;
        c.softcap = 10.0;
        cases.push(c);
    }
    // Many key blocks skipped by the band, rows that see hundreds of keys.
    let mut c = Case::new(1, 1024, 1024, 4, 128, BF16);
    c.causal = true;
    cases.push(c.clone());
    c.deterministic = true;
    cases.push(c);
    let mut c = Case::new(1, 512, 1536, 2, 64, F16);
    c.window = (256, 0);
    cases.push(c);
    run_grad_cases(&cases);
}

/// Ten deterministic runs give bitwise-identical dQ, dK and dV, at sizes where many key blocks
/// add into each dQ row (which atomics would reorder).
#[test]
fn deterministic_backward_is_bitwise_reproducible() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    for (d, causal) in [(128, false), (64, true), (256, false)] {
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

/// A small backward problem for compute-sanitizer (memcheck, racecheck): the tensor-core
/// kernel in both modes, with and without score modifiers, and the CUDA-core one.
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
    run_grad_cases(&[a, b, c]);
}
