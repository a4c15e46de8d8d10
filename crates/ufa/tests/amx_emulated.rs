//! The amx-bf16 kernel family end to end with the tile unit emulated (`UFA_AMX_EMULATE=1`),
//! so that its code (the forward's bf16 tiles through `cpu/amx.rs`, partial tiles handed to
//! vdpbf16ps) is tested on CPUs without AMX, CI's included: bf16 cases with whole and
//! partial tiles, head dims that fill whole tiles and one that does not, GQA, causal and
//! windowed tiles, the backward (on the family's FMAs), then planted NaN and ±inf, whose
//! reach must stay what the f64 reference says. Where AMX exists, the standard suites take
//! the family for real (`ufa_testkit::run_on_every_isa`); `cpu::amx`'s ignored test checks
//! the products on the hardware.
//!
//! The variable is read once a process, so this binary holds this one test.

use ufa::{Context, DType, Isa};
use ufa_testkit::{
    check_case, check_grads, check_nonfinite, nonfinite_cases, seed, Alibi, Case, Comparison,
    MaskSpec, NonFiniteReport,
};

#[test]
fn amx_family_with_emulated_tiles_matches_the_reference() {
    // SAFETY: the only test of this binary, and no other thread has started yet.
    unsafe { std::env::set_var("UFA_AMX_EMULATE", "1") };
    if !Isa::Avx512Bf16.is_supported() {
        // The family's other products take vdpbf16ps: without it the family is refused,
        // emulated tiles or not, and that refusal is what is checked here.
        let err = Context::builder().cpu_isa(Isa::AmxBf16).build().err();
        let err = err.expect("amx-bf16 taken on a CPU without avx512bf16");
        assert!(err.to_string().contains("amx-bf16"), "{err}");
        eprintln!("no avx512bf16 on this CPU: the amx-bf16 family is refused, not run");
        return;
    }
    assert!(Isa::AmxBf16.is_supported());
    assert_ne!(
        Isa::detect(),
        Isa::AmxBf16,
        "emulation must never be the default"
    );
    let ctx = Context::builder()
        .cpu_isa(Isa::AmxBf16)
        .num_threads(2)
        .build()
        .unwrap();
    let seed = seed();
    let mut cases = Vec::new();
    // (batch, seqlen_q, seqlen_kv, heads_q, heads_kv, head_dim, causal)
    for (b, sq, skv, hq, hkv, d, causal) in [
        (1, 128, 128, 2, 2, 64, false),
        (2, 100, 203, 4, 2, 128, true),
        (1, 77, 45, 2, 1, 64, false),
        (1, 64, 300, 2, 2, 80, true),
        (1, 33, 131, 3, 3, 256, false),
        (2, 3, 70, 8, 2, 128, false),
        // V of one vector's columns or fewer: probabilities split in two bf16 parts.
        (1, 123, 129, 4, 1, 1, false),
        (1, 70, 333, 4, 1, 16, true),
        // Several items a KV head over several key tiles (a partial last one): each thread
        // packs a head's K and V once and keeps them for its next items of that head (the
        // tiles are tagged by batch entry and KV head), split probabilities included.
        (2, 300, 1100, 4, 2, 64, false),
        (2, 200, 300, 4, 1, 8, true),
        // A few rows a KV head (decoding): the transposed-scores path, a partial last tile
        // of keys, and rows of two query positions (their causal bands differ).
        (2, 1, 333, 16, 2, 128, false),
        (1, 2, 150, 32, 4, 64, true),
    ] {
        let mut c = Case::new(b, sq, skv, hq, d, DType::BF16);
        c.heads_kv = hkv;
        c.causal = causal;
        cases.push(c);
    }
    let mut c = Case::new(1, 90, 150, 2, 64, DType::BF16);
    c.window = (37, 5);
    cases.push(c);
    // Bands whose edges fall inside later key tiles: a chunk computes only the keys from the
    // first whole tile of pairs its rows see to the last one it sees.
    let mut c = Case::new(1, 700, 1300, 2, 64, DType::BF16);
    c.window = (300, 40);
    cases.push(c);
    let mut c = Case::new(1, 1100, 1100, 2, 128, DType::BF16);
    c.causal = true;
    cases.push(c);
    // Masks: a bool one only hides keys, so the rows' softmax takes the scores unscaled (the
    // scale inside the exponentials); a float one adds to scaled scores, as do ALiBi and
    // soft-capping, so those rows are scaled first. Also a negative scale (the maximum does
    // not commute with it).
    let mut c = Case::new(2, 70, 150, 4, 64, DType::BF16);
    c.mask = Some(MaskSpec {
        dtype: DType::Bool,
        full: [true, false, true, true],
        ndim: 4,
    });
    cases.push(c.clone());
    c.mask = Some(MaskSpec {
        dtype: DType::F32,
        full: [false, true, true, true],
        ndim: 3,
    });
    c.alibi = Some(Alibi::PerHead);
    c.softcap = 25.0;
    c.causal = true;
    cases.push(c);
    let mut c = Case::new(1, 64, 100, 2, 128, DType::BF16);
    c.scale = Some(-0.05);
    cases.push(c);
    let mut failed = Vec::new();
    for c in &cases {
        let r: Comparison = check_case(&ctx, c, seed).unwrap();
        if !r.passed() {
            failed.push(format!("{c:?}: {}", r.summary()));
        }
        let r = check_grads(&ctx, c, seed).unwrap();
        if !r.passed() {
            failed.push(format!("backward {c:?}: {r:?}"));
        }
    }
    for c in nonfinite_cases()
        .into_iter()
        .filter(|c| c.case.dtype == DType::BF16)
    {
        let r: NonFiniteReport = check_nonfinite(&ctx, &c, seed).unwrap();
        if !r.passed() {
            failed.push(r.summary());
        }
    }
    assert!(failed.is_empty(), "seed {seed}: {failed:#?}");
}
