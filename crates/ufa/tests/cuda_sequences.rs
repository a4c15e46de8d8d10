//! Packed variable-length batches, KV caches and merging on CUDA, against the f64 reference:
//! the CPU suite's cases plus sizes that take every tensor-core path (several query and key
//! blocks, paged prefill), the backward's gradients and its deterministic mode, the checked mode
//! and a rejected append that leaves the cache as it was. Without a GPU these tests say so and
//! pass, unless `UFA_REQUIRE_GPU=1` (scripts/gpu-check).

use ufa::{Context, DType, ErrorKind, Fp32Precision};
use ufa_testkit::cuda::{gpu_present, run_suite};
use ufa_testkit::{
    check_kvcache_cuda, check_merge_cuda, check_varlen_cuda, check_varlen_grads_cuda,
    kvcache_cases, merge_cases, varlen_cases, varlen_grad_cases, Alibi, Comparison, Features,
    GradComparison, KvCacheCase, KvCacheInstance, VarlenCase, VarlenInstance,
};

/// Long enough for several 128-row query blocks and key tiles, at the tensor-core head dims
/// (64 and 128 run wgmma on Hopper, 96 the mma.sync kernel), GQA, every dtype; and short
/// queries, which take the decoding kernel.
fn tensor_core_varlen_cases() -> Vec<VarlenCase> {
    let mut cases = Vec::new();
    for (d, dtype) in [(64, DType::BF16), (128, DType::F16), (96, DType::BF16)] {
        let mut f = Features::new(8, 2, d, dtype);
        f.causal = true;
        cases.push(VarlenCase::new(
            &[300, 1, 129, 0, 64],
            &[257, 40, 129, 7, 1000],
            f,
        ));
        let mut f = Features::new(4, 4, d, dtype);
        f.softcap = 30.0;
        f.alibi = Some(Alibi::PerHead);
        let mut c = VarlenCase::new(&[200, 33], &[150, 333], f);
        c.max_slack = 70;
        cases.push(c);
    }
    // Packed batches of short queries (continuous batching's decode steps), which the
    // decoding kernel serves: sequences with no query, no key, one key, and many keys split
    // across blocks; dense and paged keys.
    for page in [None, Some(16)] {
        let mut f = Features::new(16, 4, 128, DType::BF16);
        f.causal = true;
        let mut c = VarlenCase::new(&[1, 2, 0, 1, 3], &[5000, 33, 700, 1, 0], f);
        c.page_size = page;
        cases.push(c);
    }
    // The decoding kernel's lanes copy 16 rows at a time, each found through its own page:
    // pages smaller than that (1 and 8 rows), one with a head dim padded to the next tile
    // (80 on the 96 tile).
    for (page, d) in [(1, 128), (8, 80)] {
        let mut f = Features::new(16, 4, d, DType::BF16);
        f.causal = true;
        let mut c = VarlenCase::new(&[1, 2, 1], &[777, 40, 3001], f);
        c.page_size = Some(page);
        cases.push(c);
    }
    // Whole key tiles within one page take the decoding kernel's short copy path, tiles across
    // a page boundary (a window that starts mid-page) and the last partial tile the general
    // one: head dim 64 (32-key tiles) over pages of 64, 256 (16-key tiles) over pages of 32.
    for (page, d) in [(64, 64), (32, 256)] {
        let mut f = Features::new(8, 2, d, DType::BF16);
        f.causal = true;
        f.window = (1000, 0);
        let mut c = VarlenCase::new(&[1, 2], &[3001, 1500], f);
        c.page_size = Some(page);
        cases.push(c);
    }
    // Paged keys read by the tensor-core kernels (several queries a sequence).
    for (page, d) in [(16, 128), (1, 64), (256, 64)] {
        let mut f = Features::new(8, 2, d, DType::BF16);
        f.causal = true;
        let mut c = VarlenCase::new(&[150, 70], &[600, 90], f);
        c.page_size = Some(page);
        c.used_kv = Some(vec![555, 90]);
        cases.push(c);
    }
    // Head dims above 256 (the wide mma.sync tiles, pairs of warps sharing the rows): packed
    // and paged, with a one-query sequence (the decoding kernel stops at 256 and leaves such
    // calls to them).
    for (d, page) in [(512, None), (320, Some(16))] {
        let mut f = Features::new(4, 2, d, DType::BF16);
        f.causal = true;
        let mut c = VarlenCase::new(&[150, 1, 70], &[600, 300, 90], f);
        c.page_size = page;
        cases.push(c);
    }
    // fp32 on TF32 tensor cores over paged keys, in both precisions, one with score modifiers;
    // and packed.
    for (precision, d) in [(Fp32Precision::Tf32, 128), (Fp32Precision::Ieee, 64)] {
        let mut f = Features::new(8, 2, d, DType::F32);
        f.causal = true;
        f.fp32_precision = precision;
        f.softcap = if d == 64 { 20.0 } else { 0.0 };
        let mut c = VarlenCase::new(&[150, 70], &[600, 90], f);
        c.page_size = Some(16);
        c.used_kv = Some(vec![555, 90]);
        cases.push(c);
        let mut f = Features::new(8, 2, 192 - d, DType::F32);
        f.fp32_precision = precision;
        f.softcap = if d == 64 { 0.0 } else { 20.0 };
        cases.push(VarlenCase::new(&[150, 1, 70], &[200, 333, 90], f));
    }
    cases
}

fn tensor_core_kvcache_cases() -> Vec<KvCacheCase> {
    let mut cases = Vec::new();
    // Chunked prefill over a paged cache with rotary embedding.
    let mut f = Features::new(8, 2, 128, DType::BF16);
    f.causal = true;
    let mut c = KvCacheCase::new(70, &[100, 0, 257], 70, f);
    c.page_size = Some(16);
    c.rotary = Some((128, false));
    cases.push(c);
    // Speculative decoding over a gathered dense cache.
    let mut f = Features::new(32, 8, 64, DType::F16);
    f.causal = true;
    let mut c = KvCacheCase::new(4, &[1000, 3, 77], 4, f);
    c.gathered = true;
    c.rotary = Some((64, true));
    cases.push(c);
    // Decoding one token over pages of 256.
    let mut f = Features::new(16, 2, 128, DType::BF16);
    f.causal = true;
    let mut c = KvCacheCase::new(1, &[2000, 513], 1, f);
    c.page_size = Some(256);
    cases.push(c);
    // The decoding kernel's own append (one launch): 100 new keys over several key tiles and
    // splits of one sequence, rotated (q too) and read back in the same launch.
    let mut f = Features::new(8, 2, 128, DType::BF16);
    f.causal = true;
    let mut c = KvCacheCase::new(1, &[3000, 5], 100, f);
    c.rotary = Some((128, false));
    cases.push(c);
    // Every key new (a prompt appended by a one-row call): each warp writes new rows in the
    // tiles of its ring's first fill and in later ones.
    let mut f = Features::new(8, 2, 128, DType::BF16);
    f.causal = true;
    let mut c = KvCacheCase::new(1, &[0, 40], 300, f);
    c.page_size = Some(64);
    c.rotary = Some((64, true));
    cases.push(c);
    // New keys that no block reads (the window ends before them): the first row block's
    // splits still write each once; pages of 16, a partial rotary dim, interleaved.
    let mut f = Features::new(4, 1, 64, DType::F16);
    f.window = (10, -1);
    let mut c = KvCacheCase::new(1, &[500, 0, 37], 60, f);
    c.page_size = Some(16);
    c.rotary = Some((32, true));
    cases.push(c);
    // Two row blocks of packed rows (6 queries x 8 heads) both reading the new keys, over a
    // gathered cache, q rotated at each row's own position (causal).
    let mut f = Features::new(16, 2, 64, DType::BF16);
    f.causal = true;
    let mut c = KvCacheCase::new(6, &[700, 2], 6, f);
    c.gathered = true;
    c.rotary = Some((64, false));
    cases.push(c);
    cases
}

#[test]
fn varlen_forward_matches_the_reference() {
    let mut cases = varlen_cases();
    cases.extend(tensor_core_varlen_cases());
    run_suite(
        &cases,
        |ctx, c, seed| check_varlen_cuda(ctx, c, seed, 0),
        Comparison::passed,
        Comparison::summary,
    );
}

#[test]
fn varlen_backward_matches_the_reference() {
    let mut cases = varlen_grad_cases();
    // 512: the wide backward, two key blocks a key range (each half of the columns).
    for (d, dtype) in [
        (64, DType::BF16),
        (128, DType::F16),
        (96, DType::BF16),
        (512, DType::BF16),
    ] {
        for deterministic in [false, true] {
            let mut f = Features::new(8, 2, d, dtype);
            f.causal = true;
            f.deterministic = deterministic;
            cases.push(VarlenCase::new(
                &[300, 1, 129, 0, 64],
                &[257, 40, 129, 7, 500],
                f,
            ));
        }
    }
    run_suite(
        &cases,
        |ctx, c, seed| check_varlen_grads_cuda(ctx, c, seed, 0),
        GradComparison::passed,
        GradComparison::summary,
    );
}

#[test]
fn kvcache_matches_the_reference_and_appends_exactly() {
    let mut cases = kvcache_cases();
    cases.extend(tensor_core_kvcache_cases());
    run_suite(
        &cases,
        |ctx, c, seed| check_kvcache_cuda(ctx, c, seed, 0),
        Comparison::passed,
        Comparison::summary,
    );
}

/// A decoding KV-cache call that appends, with rotary embedding, is the decoding kernel alone:
/// the append kernels are never loaded (and on sm_90+, with a short cache, the combine neither).
/// The modules a fresh context loaded name the kernels that ran.
#[test]
fn decoding_kvcache_call_appends_in_its_one_launch() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    let mut f = Features::new(32, 8, 128, DType::BF16);
    f.causal = true;
    let mut c = KvCacheCase::new(1, &[1000, 37], 1, f);
    c.page_size = Some(16);
    c.rotary = Some((128, false));
    let cmp = check_kvcache_cuda(&ctx, &c, 4, 0).unwrap();
    assert!(cmp.passed(), "{}: {}", c.describe(), cmp.summary());
    let reports = ctx.cuda_module_reports();
    let names: Vec<&str> = reports.iter().map(|m| m.kernel.as_str()).collect();
    assert!(
        names.iter().any(|k| k.starts_with("ufa_fwd_decode_")),
        "{names:?}"
    );
    assert!(!names.iter().any(|k| k.starts_with("ufa_kv_")), "{names:?}");
    let arch_number = |arch: &str| -> u32 {
        let digits: String = arch[3..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap()
    };
    if reports.iter().all(|m| arch_number(&m.arch) >= 90) {
        assert!(!names.contains(&"ufa_decode_combine"), "{reports:?}");
    }
}

#[test]
fn merged_states_match_the_reference() {
    let mut cases = merge_cases();
    let mut many = cases[0].clone();
    many.states = 19; // three rounds of the merge kernel
    cases.push(many);
    run_suite(
        &cases,
        |ctx, c, seed| check_merge_cuda(ctx, c, seed, 0),
        Comparison::passed,
        Comparison::summary,
    );
}

/// Deterministic varlen gradients are bitwise equal over runs.
#[test]
fn deterministic_varlen_backward_is_bitwise_reproducible() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    let mut f = Features::new(8, 2, 128, DType::BF16);
    f.causal = true;
    f.deterministic = true;
    let case = VarlenCase::new(&[700, 1, 300], &[900, 60, 300], f);
    let run = || {
        let mut inst = VarlenInstance::new(&case, 3);
        inst.run_backward_cuda(&ctx, 0).unwrap();
        inst.grad_bits()
    };
    let first = run();
    for _ in 0..4 {
        assert!(run() == first, "{}", case.describe());
    }
}

/// Device metadata that breaks a rule: checked mode reports it and writes nothing (the cache
/// included); unchecked, the kernels skip the slots outside the cache instead of following
/// them, and the call completes.
#[test]
fn checked_mode_reports_bad_device_metadata() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    let f = Features::new(4, 2, 64, DType::BF16);
    let mut c = KvCacheCase::new(1, &[5, 9], 1, f);
    c.page_size = Some(4);
    let mut inst = KvCacheInstance::new(&c, 1);
    // More keys than the sequence's pages hold, plus the one appended.
    inst.set_cache_len(1, 40);
    let err = inst.run_cuda(&ctx, 0, true).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.message().contains("cache_seqlens[1]=40"), "{err}");
    assert!(inst.cache_untouched(), "a checked call wrote the cache");
    inst.run_cuda(&ctx, 0, false).unwrap();
    let mut v = VarlenInstance::new(
        &VarlenCase::new(&[3, 4], &[5, 6], Features::new(2, 2, 64, DType::BF16)),
        2,
    );
    v.run_cuda(&ctx, 0, true).unwrap();
    assert!(v.compare().unwrap().passed());
}

/// A small problem of each new kernel for compute-sanitizer (memcheck, racecheck): varlen
/// forward and backward on tensor cores, a paged append with rotary embedding and the
/// attention over it, decoding over pages and over a dense cache (each appending in the
/// decoding kernel), and a merge.
#[test]
#[ignore = "run under compute-sanitizer by scripts/gpu-check"]
fn sanitizer_sequences_case() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    let mut f = Features::new(4, 2, 64, DType::BF16);
    f.causal = true;
    let v = VarlenCase::new(&[70, 0, 3], &[99, 5, 130], f);
    let cmp = check_varlen_grads_cuda(&ctx, &v, 1, 0).unwrap();
    assert!(cmp.passed(), "{cmp:?}");
    let mut f = Features::new(4, 2, 64, DType::BF16);
    f.causal = true;
    let mut c = KvCacheCase::new(9, &[20, 0], 9, f);
    c.page_size = Some(8);
    c.rotary = Some((64, false));
    let cmp = check_kvcache_cuda(&ctx, &c, 1, 0).unwrap();
    assert!(cmp.passed(), "{cmp:?}");
    // Decoding over pages of 32 rows at head dim 128: 16-key tiles within a page take the
    // decoding kernel's whole-tile copies, the last partial one the general path.
    let mut f = Features::new(8, 2, 128, DType::BF16);
    f.causal = true;
    let mut c = KvCacheCase::new(1, &[100, 40], 1, f);
    c.page_size = Some(32);
    let cmp = check_kvcache_cuda(&ctx, &c, 1, 0).unwrap();
    assert!(cmp.passed(), "{cmp:?}");
    // A decoding step over 3000 keys: the new key is in a split's late tile, written by its
    // warp while the warp's ring fills (the cases above write theirs before).
    let mut f = Features::new(8, 2, 128, DType::BF16);
    f.causal = true;
    let mut c = KvCacheCase::new(1, &[3000], 1, f);
    c.rotary = Some((128, false));
    let cmp = check_kvcache_cuda(&ctx, &c, 1, 0).unwrap();
    assert!(cmp.passed(), "{cmp:?}");
    let cmp = check_merge_cuda(&ctx, &merge_cases()[1], 1, 0).unwrap();
    assert!(cmp.passed(), "{cmp:?}");
}
