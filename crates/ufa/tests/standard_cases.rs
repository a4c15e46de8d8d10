//! `ufa check`'s spread of problems, on every CPU kernel family this machine runs.

use ufa::DType;
use ufa_testkit::{check_case, run_on_every_isa, standard_cases, Comparison};

#[test]
fn standard_cases_match_reference_on_every_isa() {
    run_on_every_isa(
        &standard_cases(),
        check_case,
        Comparison::passed,
        Comparison::summary,
    );
}

/// V with one to sixteen columns and one KV head: every output column a weighted mean of one
/// column of V, which can nearly cancel. Probabilities rounded to bf16 for P·V missed the
/// error bound there (up to 2.3e-2 at head_dim 1, bound 1e-2) in about one draw of a hundred,
/// until the bf16 families took them to 16 bits for such V (`cpu::tile::few_columns`): so
/// many small draws, each on every kernel family against one reference; a line for each
/// failure and the worst error of each family.
#[test]
fn few_value_columns_match_reference_on_every_isa() {
    use ufa::{Context, Isa};
    use ufa_testkit::{seed, Case, Instance, SEED_ENV};
    const DRAWS: u64 = 500;
    let seed = seed();
    println!("seed {seed} (replay with {SEED_ENV}={seed})");
    let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.is_supported()).collect();
    let ctxs: Vec<Context> = isas
        .iter()
        .map(|&isa| {
            Context::builder()
                .cpu_isa(isa)
                .num_threads(2)
                .build()
                .unwrap()
        })
        .collect();
    let mut worst = vec![0.0f64; isas.len()];
    let mut failed = Vec::new();
    for i in 0..DRAWS {
        let (d, dv) = [(1, 1), (1, 1), (2, 2), (8, 1), (16, 16)][i as usize % 5];
        let mut c = Case::new(1, 32, 129, 4, d, DType::BF16);
        c.heads_kv = 1;
        c.head_dim_v = dv;
        c.causal = i % 7 == 6;
        let s = seed.wrapping_add(i);
        let reference = Instance::new(&c, s).reference().unwrap();
        for (j, ctx) in ctxs.iter().enumerate() {
            let mut inst = Instance::new(&c, s);
            inst.run(ctx).unwrap();
            let r = inst.compare(&reference);
            worst[j] = worst[j].max(r.out_error);
            if !r.passed() {
                let isa = isas[j];
                failed.push(format!(
                    "{isa:?} {} (seed {s}): {}",
                    c.describe(),
                    r.summary()
                ));
            }
        }
    }
    for (isa, w) in isas.iter().zip(worst) {
        println!("{isa:?}: {DRAWS} draws, worst error {w:.2e}");
    }
    assert!(failed.is_empty(), "seed {seed}: {failed:#?}");
}

/// The decoding shapes CUDA serves with its split-KV kernel (`testing::decode_cases`), on the
/// CPU's own split decoding, on every kernel family.
#[test]
fn decode_cases_match_reference_on_every_isa() {
    run_on_every_isa(
        &ufa_testkit::decode_cases(),
        check_case,
        Comparison::passed,
        Comparison::summary,
    );
}

/// The few-rows decoding paths of the CPU (cpu/few_rows.rs, cpu/tile.rs): one to eight rows a
/// KV head; head dims of whole 32-value steps, an odd number of 16-value halves (48, 80: the
/// bf16 pairs' half step and the 4 + 1 accumulator blocks) and none (72: the portable path);
/// key counts that leave partial steps of 2 and 4 keys and partial tiles; K and V in
/// [B, S, H, D] (a job takes all its KV heads key by key), [B, H, S, D] and padded rows.
#[test]
fn few_rows_match_reference_on_every_isa() {
    use ufa::DType::{BF16, F16, F32};
    use ufa_testkit::{Alibi, Case, MaskSpec, Placement};
    let mut cases = Vec::new();
    let shapes = [
        // (batch, seqlen_q, seqlen_kv, heads_q, heads_kv, head_dim, head_dim_v)
        (4, 1, 67, 8, 8, 128, 128),
        (4, 1, 131, 8, 2, 64, 64),
        (3, 2, 70, 12, 4, 48, 48),
        (4, 1, 2053, 4, 4, 80, 80),
        (2, 2, 129, 16, 4, 96, 32),
        (4, 1, 5, 5, 1, 16, 16),
        (2, 1, 3, 8, 1, 72, 72),
        (1, 1, 4099, 32, 32, 128, 128),
    ];
    for (i, &(b, sq, skv, hq, hkv, d, dv)) in shapes.iter().enumerate() {
        for (j, dtype) in [F32, BF16, F16].into_iter().enumerate() {
            let mut c = Case::new(b, sq, skv, hq, d, dtype);
            c.heads_kv = hkv;
            c.head_dim_v = dv;
            c.causal = (i + j) % 2 == 1;
            c.placement = match (i + j) % 3 {
                0 => [Placement::Contiguous; 4],
                1 => [Placement::HeadsFirst; 4],
                _ => [Placement::Padded; 4],
            };
            cases.push(c);
        }
    }
    // Grouped-query rows of a job of KV heads ([B, S, H, D]) whose bf16 V is added in bf16
    // pairs where the family's tiles take dot products (cpu/value_pairs.rs): 3 to 8 rows,
    // whole 64-column steps and a 32-column rest, an odd last key of a 32-key step and of a
    // tile.
    let pair_shapes = [
        (2, 1, 97, 12, 4, 128, 128),
        (4, 1, 77, 16, 4, 128, 96),
        (4, 1, 151, 32, 4, 64, 96),
        (4, 1, 45, 28, 4, 256, 256),
        (2, 2, 163, 9, 3, 64, 64),
        (2, 1, 70, 20, 4, 64, 64),
    ];
    for (i, &(b, sq, skv, hq, hkv, d, dv)) in pair_shapes.iter().enumerate() {
        let mut c = Case::new(b, sq, skv, hq, d, BF16);
        c.heads_kv = hkv;
        c.head_dim_v = dv;
        c.causal = i % 2 == 1;
        c.placement = [[Placement::Contiguous, Placement::Padded][i % 2]; 4];
        cases.push(c);
    }
    // Score modifiers on the path: a window, softcap with ALiBi, a boolean mask.
    let mut c = Case::new(4, 1, 300, 8, 64, BF16);
    c.heads_kv = 2;
    c.window = (40, 0);
    c.causal = true;
    cases.push(c);
    let mut c = Case::new(4, 1, 200, 8, 128, F32);
    c.softcap = 20.0;
    c.alibi = Some(Alibi::PerHead);
    cases.push(c);
    let mut c = Case::new(4, 2, 150, 8, 64, F16);
    c.heads_kv = 4;
    c.mask = Some(MaskSpec {
        dtype: DType::Bool,
        full: [true, false, true, true],
        ndim: 4,
    });
    cases.push(c);
    run_on_every_isa(&cases, check_case, Comparison::passed, Comparison::summary);
}
