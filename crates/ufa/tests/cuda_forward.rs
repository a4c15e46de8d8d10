//! The CUDA forward pass against the f64 reference: every feature and dtype, odd sizes, GQA,
//! causal with seqlen_q != seqlen_kv, strided views, outputs poisoned first. On a machine with
//! no GPU these tests check the "no CUDA" error and pass; `UFA_REQUIRE_GPU=1` (set by
//! scripts/gpu-check) makes a missing GPU a failure instead.

use ufa::{
    AttentionParams, Context, DType, Device, ErrorKind, Fp32Precision, TensorView, TensorViewMut,
};
use ufa_testkit::cuda::{check_case_cuda, gpu_present, loaded_kernels, run_suite, run_suite_in};
use ufa_testkit::{standard_cases, Alibi, Case, Comparison, MaskSpec, Placement};

/// Runs every case's forward on the GPU against the f64 reference (see `run_suite`).
fn run_cases(cases: &[Case]) {
    run_suite(
        cases,
        |ctx, c, seed| check_case_cuda(ctx, c, seed, 0),
        Comparison::passed,
        Comparison::summary,
    );
}

#[test]
fn standard_cases_match_the_reference() {
    run_cases(&standard_cases());
}

/// Each tensor-core head dim and dtype, plain and with every feature, at sizes that are not
/// multiples of any tile.
#[test]
fn tensor_core_variants_match_the_reference() {
    let cases = ufa_testkit::tensor_core_cases(false);
    run_cases(&cases);
}

/// fp32 on the TF32 tensor cores at every head dim they take, in both precisions (the fp32
/// bound by default, TF32's documented one in its mode).
#[test]
fn fp32_tensor_core_variants_match_the_reference() {
    run_cases(&ufa_testkit::fp32_tensor_core_cases());
}

/// What an fp32 user gets: the tensor-core kernel in the precision asked for, not the
/// CUDA-core fallback (the modules a context loaded name the kernels that ran).
#[test]
fn fp32_takes_the_tensor_cores() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    let mut c = Case::new(2, 100, 130, 4, 64, DType::F32);
    c.causal = true;
    for precision in [Fp32Precision::Ieee, Fp32Precision::Tf32] {
        c.fp32_precision = precision;
        let r = check_case_cuda(&ctx, &c, 3, 0).unwrap();
        assert!(r.passed(), "{}: {}", c.describe(), r.summary());
    }
    // Hopper's wgmma kernel (fwd_sm90_f32.cu), mma.sync's elsewhere.
    let kernels = loaded_kernels(&ctx);
    let arch = if kernels.iter().any(|k| k.starts_with("ufa_fwd_sm90")) {
        "sm90"
    } else {
        "sm80"
    };
    assert!(
        kernels
            .iter()
            .any(|k| k.starts_with(&format!("ufa_fwd_{arch}_f32_d64")))
            && kernels
                .iter()
                .any(|k| k.starts_with(&format!("ufa_fwd_{arch}_tf32_d64")))
            && !kernels.iter().any(|k| k.starts_with("ufa_fwd_simple")),
        "{kernels:?}"
    );
}

/// Thousands of keys a row in fp32: tensor cores add into their accumulators truncating, so a
/// sum that ran long in them would drift from the f64 reference with the key count (5.6e-5 at
/// 8k keys on mma.sync before its sums were kept short, five times the bound).
#[test]
fn fp32_long_key_rows_stay_at_the_fp32_bound() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    for d in [64, 128] {
        let mut c = Case::new(1, 80, 8192, 2, d, DType::F32);
        c.heads_kv = 1;
        let r = check_case_cuda(&ctx, &c, 11, 0).unwrap();
        eprintln!("{}: {}", c.describe(), r.summary());
        assert!(r.passed(), "{}: {}", c.describe(), r.summary());
    }
}

/// Q/K and V of different head dims (MLA's 192 and 128, and the other way round) run on the
/// tensor cores, on the tile of the larger one with the other zero-padded: plain, causal with
/// GQA, with every score modifier, PyTorch's layout, fp32 in both precisions; no case takes the
/// CUDA-core kernel.
#[test]
fn different_qk_and_v_head_dims_take_the_tensor_cores() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    run_suite_in(
        &ctx,
        &ufa_testkit::unequal_head_dim_cases(),
        |ctx, c, seed| check_case_cuda(ctx, c, seed, 0),
        Comparison::passed,
        Comparison::summary,
    );
    let kernels = loaded_kernels(&ctx);
    // On Hopper, with off-tile head dims on (UFA_CUDA_OFF_TILE), the 16-bit pairs take the
    // warp-specialised wgmma forward, each operand on its own tile width (MLA's 192/128 among
    // them); elsewhere mma.sync's tile of the larger dim.
    let hopper = kernels.iter().any(|k| k.starts_with("ufa_fwd_sm90"));
    let mla = if hopper && ufa::internals::tma_fwd_enabled() && ufa::internals::off_tile_enabled() {
        "ufa_fwd_sm90_tma_bf16_d192_v128_"
    } else {
        "ufa_fwd_sm80_bf16_d192"
    };
    assert!(
        kernels.iter().any(|k| k.starts_with(mla))
            && kernels
                .iter()
                .any(|k| k.starts_with("ufa_fwd_sm80_f32_d128"))
            && !kernels.iter().any(|k| k.starts_with("ufa_fwd_simple")),
        "{kernels:?}"
    );
}

/// On Hopper, with the warp-specialised kernel on (UFA_CUDA_TMA_FWD, or its default), dense
/// batches take it (a head dim between its tiles too: the tensor maps fill the padding with
/// zeros); elsewhere this checks the results alone.
#[test]
fn hopper_dense_calls_take_the_warp_specialised_kernel() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    for (d, causal) in [(128, true), (80, false), (256, true)] {
        let mut c = Case::new(2, 300, 333, 4, d, DType::BF16);
        c.heads_kv = 2;
        c.causal = causal;
        let r = check_case_cuda(&ctx, &c, 5, 0).unwrap();
        assert!(r.passed(), "{}: {}", c.describe(), r.summary());
    }
    let kernels = loaded_kernels(&ctx);
    let hopper = kernels.iter().any(|k| k.starts_with("ufa_fwd_sm90"));
    if hopper && ufa::internals::tma_fwd_enabled() {
        let forward: Vec<&String> = kernels
            .iter()
            .filter(|k| k.starts_with("ufa_fwd_"))
            .collect();
        assert!(
            forward
                .iter()
                .all(|k| k.starts_with("ufa_fwd_sm90_tma_bf16_d")),
            "{kernels:?}"
        );
        // Causality is a run-time argument. d80 on the d128 tile has MMAs of its own width
        // (a variant of its own) where head dims off the tile widths are (UFA_CUDA_OFF_TILE),
        // else it shares d128's; d256 has its own.
        let expected = if ufa::internals::off_tile_enabled() {
            3
        } else {
            2
        };
        assert_eq!(forward.len(), expected, "d128, d80 and d256: {kernels:?}");
    }
}

/// Banded problems with more query tiles than an H100 or H200 has SMs: the persistent
/// warp-specialised forward walks them in pairs of equal causal weight (query block i with
/// block m - 1 - i, the middle one alone where m is odd), which smaller cases never reach.
#[test]
fn banded_problems_over_a_wave_of_tiles() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    // (batch, seqlen_q, seqlen_kv, head_dim, head_dim_v, window): 160 tiles of 128 query
    // rows, 5 a head (odd: a middle tile alone); 192, 4 a head, more keys than queries (the
    // bottom-right diagonal); 192, 6 a head, under a sliding window; MLA's 192/128 pair, 160
    // tiles (V's ring and O of their own width, carried from tile to tile).
    let cases = [
        (2, 600, 600, 128, 128, None),
        (3, 500, 700, 64, 64, None),
        (2, 700, 700, 256, 256, Some((200, 0))),
        (2, 560, 600, 192, 128, None),
    ];
    for (batch, sq, skv, d, dv, window) in cases {
        let mut c = Case::new(batch, sq, skv, 16, d, DType::BF16);
        c.head_dim_v = dv;
        c.heads_kv = 4;
        match window {
            Some(w) => c.window = w,
            None => c.causal = true,
        }
        let r = check_case_cuda(&ctx, &c, 17, 0).unwrap();
        println!(
            "{} {}: {}",
            if r.passed() { "ok  " } else { "FAIL" },
            c.describe(),
            r.summary()
        );
        assert!(r.passed(), "{}: {}", c.describe(), r.summary());
    }
}

/// Head dims between the instantiated ones run on the next larger tensor-core tile (zeros in
/// the padding), not on the CUDA-core kernel.
#[test]
fn padded_head_dims_take_the_tensor_cores() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    let mut failed = Vec::new();
    for c in ufa_testkit::padded_head_dim_cases() {
        let r = check_case_cuda(&ctx, &c, 11, 0).unwrap();
        println!(
            "{} {}: {}",
            if r.passed() { "ok  " } else { "FAIL" },
            c.describe(),
            r.summary()
        );
        if !r.passed() {
            failed.push(c.describe());
        }
    }
    let kernels = loaded_kernels(&ctx);
    println!("{kernels:?}");
    assert!(failed.is_empty(), "{failed:?}");
    assert!(
        !kernels.iter().any(|k| k.starts_with("ufa_fwd_simple")),
        "{kernels:?}"
    );
}

/// Head dims above 256 (to 512, 16-bit) run on the wide mma.sync tiles, where pairs of warps
/// share the rows and exchange partial scores, not on the CUDA-core kernel.
#[test]
fn wide_head_dims_take_the_tensor_cores() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    run_suite_in(
        &ctx,
        &ufa_testkit::wide_head_dim_cases(),
        |ctx, c, seed| check_case_cuda(ctx, c, seed, 0),
        Comparison::passed,
        Comparison::summary,
    );
    let kernels = loaded_kernels(&ctx);
    for tile in ["d320", "d384", "d512"] {
        assert!(
            kernels
                .iter()
                .any(|k| k.starts_with(&format!("ufa_fwd_sm80_bf16_{tile}_"))
                    || k.starts_with(&format!("ufa_fwd_sm80_f16_{tile}_"))),
            "{tile}: {kernels:?}"
        );
    }
    assert!(
        !kernels.iter().any(|k| k.starts_with("ufa_fwd_simple")),
        "{kernels:?}"
    );
}

#[test]
fn features_and_layouts_match_the_reference() {
    run_cases(&ufa_testkit::feature_cases());
}

/// Batch 0, seqlen_q 0, seqlen_kv 0: empty outputs, or the fully-masked rule (device memsets).
#[test]
fn empty_problems_match_the_reference() {
    run_cases(&ufa_testkit::empty_cases());
}

/// A host pointer passed as a CUDA tensor is an error naming the tensor, never a crash; on a
/// machine without CUDA every CUDA call says so.
#[test]
fn bad_cuda_inputs_are_errors() {
    let ctx = Context::new().unwrap();
    let host = vec![half::bf16::from_f32(0.5); 2 * 16 * 2 * 64];
    let shape = [2, 16, 2, 64];
    let strides = [2048, 128, 64, 1];
    let view = |dev| unsafe {
        TensorView::from_raw_parts(
            host.as_ptr() as *const _,
            DType::BF16,
            dev,
            &shape,
            &strides,
        )
        .unwrap()
    };
    let mut out_host = host.clone();
    let mut out = unsafe {
        TensorViewMut::from_raw_parts(
            out_host.as_mut_ptr() as *mut _,
            DType::BF16,
            Device::Cuda(0),
            &shape,
            &strides,
        )
        .unwrap()
    };
    let q = view(Device::Cuda(0));
    let e = ctx
        .forward(&q, &q, &q, &mut out, &AttentionParams::default())
        .unwrap_err();
    if gpu_present(&ctx) {
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert!(
            e.message().starts_with("q is on cuda:0")
                && e.message().contains("not CUDA device memory"),
            "{e}"
        );
        let q9 = view(Device::Cuda(99));
        let mut out9 = unsafe {
            TensorViewMut::from_raw_parts(
                out_host.as_mut_ptr() as *mut _,
                DType::BF16,
                Device::Cuda(99),
                &shape,
                &strides,
            )
            .unwrap()
        };
        let e = ctx
            .forward(&q9, &q9, &q9, &mut out9, &AttentionParams::default())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DeviceUnavailable, "{e}");
        assert!(e.message().contains("cuda:99 does not exist"), "{e}");
    } else {
        assert_eq!(e.kind(), ErrorKind::DeviceUnavailable, "{e}");
        assert!(
            e.message().contains("no CUDA driver found") || e.message().contains("cuInit"),
            "{e}"
        );
        // The CPU path is unaffected.
        let c = ufa_testkit::check_case(&ctx, &Case::new(1, 5, 7, 2, 32, DType::F32), 1).unwrap();
        assert!(c.passed());
    }
    assert!(
        out_host.iter().all(|x| x.to_f32() == 0.5),
        "nothing is written on error"
    );
}

/// A second process finds the cubins the first one compiled and loads them without NVRTC.
#[test]
fn second_process_loads_from_the_disk_cache() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ufa-cache-{}", std::process::id()));
    let case = Case::new(1, 100, 100, 2, 96, DType::F16);
    let run_child = || {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "cache_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ufa_testkit::cuda::CACHE_DIR_ENV, &dir)
            .output()
            .unwrap()
    };
    let first = run_child();
    let second = run_child();
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    println!(
        "first process:\n{}second process:\n{}",
        text(&first),
        text(&second)
    );
    assert!(first.status.success() && second.status.success());
    assert!(
        text(&first).contains("cached false"),
        "the first process compiles"
    );
    assert!(
        text(&second).contains("cached true"),
        "the second process loads from disk"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = case;
}

#[test]
#[ignore = "run by second_process_loads_from_the_disk_cache in a child process"]
fn cache_child() {
    let ctx = Context::new().unwrap();
    let case = Case::new(1, 100, 100, 2, 96, DType::F16);
    let r = check_case_cuda(&ctx, &case, 7, 0).unwrap();
    assert!(r.passed(), "{r:?}");
    for m in ctx.cuda_module_reports() {
        println!(
            "module {} compile {:.3}s load {:.2}ms cached {}",
            m.kernel,
            m.compile_s,
            m.load_s * 1e3,
            m.from_cache
        );
        if m.from_cache {
            assert!(m.load_s < 0.05, "cached load took {:.1} ms", m.load_s * 1e3);
        } else {
            assert!(
                m.compile_s < 5.0,
                "first-use compile took {:.2} s",
                m.compile_s
            );
        }
    }
}

/// A small problem for compute-sanitizer (memcheck, racecheck): every feature on, odd sizes,
/// the tensor-core kernel and the CUDA-core one.
#[test]
#[ignore = "run under compute-sanitizer by scripts/gpu-check"]
fn sanitizer_case() {
    let mut a = Case::new(1, 70, 99, 4, 64, DType::BF16);
    a.heads_kv = 2;
    a.causal = true;
    let mut b = a.clone();
    b.alibi = Some(Alibi::PerHead);
    b.softcap = 5.0;
    b.mask = Some(MaskSpec {
        dtype: DType::Bool,
        full: [false, true, true, true],
        ndim: 3,
    });
    let mut c = a.clone();
    c.placement = [Placement::Padded; 4];
    let mut d = Case::new(1, 9, 40, 2, 80, DType::F32);
    d.causal = true;
    // fp32 on tensor cores, score modifiers on.
    let mut e = b.clone();
    e.dtype = DType::F32;
    e.out_dtype = DType::F32;
    // Head dims on a larger tile: the padding columns are neither read nor written.
    let mut f = a.clone();
    (f.head_dim, f.head_dim_v) = (40, 40);
    let mut g = c.clone();
    (g.head_dim, g.head_dim_v, g.dtype, g.out_dtype) = (20, 20, DType::F32, DType::F32);
    // V's head dim below Q's and K's (MLA's 192/128; on Hopper V's ring of its own width,
    // over three key tiles so that it wraps).
    let mut h = a.clone();
    (h.head_dim, h.head_dim_v, h.seqlen_kv) = (192, 128, 300);
    // A wide head dim (512 on mma.sync): pairs of warps exchange partial scores through
    // shared memory between two barriers (racecheck's case), over several key tiles.
    let mut i = b.clone();
    (i.head_dim, i.head_dim_v) = (512, 512);
    // fp32 at head dim 128 in the TF32 mode (on Hopper the wgmma kernel, whose tiles are
    // rewritten in shared memory between barriers), over four key tiles.
    let mut j = a.clone();
    (j.head_dim, j.head_dim_v, j.dtype, j.out_dtype) = (128, 128, DType::F32, DType::F32);
    j.fp32_precision = Fp32Precision::Tf32;
    run_cases(&[a, b, c, d, e, f, g, h, i, j]);
}
