//! Bad arguments of packed-batch, KV-cache and merge calls: each rule returns the right kind of
//! error with a message naming the argument and the values, and writes nothing — the outputs,
//! and for KV-cache calls the cache, keep their contents.

use ufa::{
    AttentionParams, AttentionState, BackwardInputs, Context, ErrorKind, Gradients, KvAppend,
    KvCache, Rotary, TensorView, TensorViewMut, Varlen,
};

const POISON: f32 = 12345.0;

fn ctx() -> Context {
    Context::builder().num_threads(2).build().unwrap()
}

fn data(n: usize, f: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * f).sin()).collect()
}

fn check(err: ufa::Error, kind: ErrorKind, needles: &[&str]) {
    assert_eq!(err.kind(), kind, "{err}");
    for n in needles {
        assert!(
            err.message().contains(n),
            "message {:?} lacks {n:?}",
            err.message()
        );
    }
}

/// A packed batch: 3 sequences of 2, 0 and 3 query rows (total 5, plus a spare row) over 4, 1
/// and 3 keys (total 8); 4 query heads over 2 KV heads, head dim 8.
struct Packed {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    out: Vec<f32>,
    lse: Vec<f32>,
    cu_q: Vec<i32>,
    cu_kv: Vec<i32>,
    used: Vec<i32>,
}

fn packed() -> Packed {
    Packed {
        q: data(6 * 4 * 8, 0.1),
        k: data(8 * 2 * 8, 0.2),
        v: data(8 * 2 * 8, 0.3),
        out: vec![POISON; 6 * 4 * 8],
        lse: vec![POISON; 4 * 6],
        cu_q: vec![0, 2, 2, 5],
        cu_kv: vec![0, 4, 5, 8],
        used: vec![4, 1, 2],
    }
}

/// Runs a varlen forward on `b` after `change` edits it and the metadata; must fail with
/// `kind` and the needles, leaving out and lse untouched.
fn varlen_err(
    kind: ErrorKind,
    needles: &[&str],
    change: impl FnOnce(&mut Packed),
    call: impl FnOnce(&Context, &mut Packed) -> ufa::Result<()>,
) {
    let mut b = packed();
    change(&mut b);
    let err = call(&ctx(), &mut b).expect_err("call must fail");
    check(err, kind, needles);
    assert!(
        b.out.iter().chain(&b.lse).all(|&x| x == POISON),
        "written on error"
    );
}

fn forward(c: &Context, b: &mut Packed, max_q: usize, used: bool) -> ufa::Result<()> {
    let q = TensorView::new(&b.q, &[6, 4, 8])?;
    let k = TensorView::new(&b.k, &[8, 2, 8])?;
    let v = TensorView::new(&b.v, &[8, 2, 8])?;
    let mut s = Varlen::new(
        TensorView::new(&b.cu_q, &[b.cu_q.len()])?,
        TensorView::new(&b.cu_kv, &[b.cu_kv.len()])?,
        max_q,
        4,
    );
    if used {
        s = s.seqused_kv(TensorView::new(&b.used, &[3])?);
    }
    let mut out = TensorViewMut::new(&mut b.out, &[6, 4, 8])?;
    let mut lse = TensorViewMut::new(&mut b.lse, &[4, 6])?;
    c.forward_varlen(
        &q,
        &k,
        &v,
        &mut out,
        Some(&mut lse),
        &s,
        &AttentionParams::default(),
    )
}

#[test]
fn valid_varlen_call_writes_the_sequences_rows_only() {
    let mut b = packed();
    forward(&ctx(), &mut b, 3, true).unwrap();
    assert!(b.out[..5 * 32]
        .iter()
        .all(|x| x.is_finite() && *x != POISON));
    assert!(
        b.out[5 * 32..].iter().all(|&x| x == POISON),
        "spare row written"
    );
    assert!((0..4).all(|h| b.lse[h * 6 + 5] == POISON));
}

#[test]
fn varlen_metadata_rules() {
    let inv = ErrorKind::InvalidArgument;
    let run = |c: &Context, b: &mut Packed| forward(c, b, 3, false);
    varlen_err(
        inv,
        &["cu_seqlens_q[0]=1 but must be 0"],
        |b| b.cu_q[0] = 1,
        run,
    );
    varlen_err(
        inv,
        &["cu_seqlens_q[2]=1 is less than cu_seqlens_q[1]=2"],
        |b| b.cu_q[2] = 1,
        run,
    );
    varlen_err(
        inv,
        &["cu_seqlens_q[3]=7 but q has only 6 rows"],
        |b| b.cu_q[3] = 7,
        run,
    );
    varlen_err(
        inv,
        &["cu_seqlens_kv[3]=9 but k has only 8 rows"],
        |b| b.cu_kv[3] = 9,
        run,
    );
    varlen_err(
        inv,
        &["sequence 2 has 3 rows", "max_seqlen_q=2"],
        |_| {},
        |c, b| forward(c, b, 2, false),
    );
    varlen_err(
        inv,
        &["cu_seqlens_kv.shape[0]=3 but must equal cu_seqlens_q.shape[0]=4"],
        |b| b.cu_kv.truncate(3),
        run,
    );
    varlen_err(
        inv,
        &["seqused_kv[1]=2 exceeds", "=1"],
        |b| b.used[1] = 2,
        |c, b| forward(c, b, 3, true),
    );
    varlen_err(
        inv,
        &["seqused_kv[0]=-1 is negative"],
        |b| b.used[0] = -1,
        |c, b| forward(c, b, 3, true),
    );
    varlen_err(
        inv,
        &["max_seqlen_q=", "must be less than"],
        |_| {},
        |c, b| forward(c, b, 1 << 30, false),
    );
}

#[test]
fn varlen_tensor_rules() {
    let inv = ErrorKind::InvalidArgument;
    varlen_err(
        inv,
        &["cu_seqlens_q.dtype=f32 but must be i32"],
        |_| {},
        |c, b| {
            let cu = vec![0f32, 2.0, 2.0, 5.0];
            let s = Varlen::new(
                TensorView::new(&cu, &[4])?,
                TensorView::new(&b.cu_kv, &[4])?,
                3,
                4,
            );
            let mut out = TensorViewMut::new(&mut b.out, &[6, 4, 8])?;
            c.forward_varlen(
                &TensorView::new(&b.q, &[6, 4, 8])?,
                &TensorView::new(&b.k, &[8, 2, 8])?,
                &TensorView::new(&b.v, &[8, 2, 8])?,
                &mut out,
                None,
                &s,
                &AttentionParams::default(),
            )
        },
    );
    varlen_err(
        inv,
        &["q must have 3 dimensions"],
        |_| {},
        |c, b| {
            let s = Varlen::new(
                TensorView::new(&b.cu_q, &[4])?,
                TensorView::new(&b.cu_kv, &[4])?,
                3,
                4,
            );
            let mut out = TensorViewMut::new(&mut b.out, &[6, 4, 8])?;
            c.forward_varlen(
                &TensorView::new(&b.q, &[1, 6, 4, 8])?,
                &TensorView::new(&b.k, &[8, 2, 8])?,
                &TensorView::new(&b.v, &[8, 2, 8])?,
                &mut out,
                None,
                &s,
                &AttentionParams::default(),
            )
        },
    );
    varlen_err(
        inv,
        &["lse.shape[1]=5 but must equal q.shape[0] (total_q)=6"],
        |_| {},
        |c, b| {
            let s = Varlen::new(
                TensorView::new(&b.cu_q, &[4])?,
                TensorView::new(&b.cu_kv, &[4])?,
                3,
                4,
            );
            let (out, lse) = (&mut b.out, &mut b.lse);
            let mut out = TensorViewMut::new(out, &[6, 4, 8])?;
            let mut lse = TensorViewMut::new(&mut lse[..20], &[4, 5])?;
            c.forward_varlen(
                &TensorView::new(&b.q, &[6, 4, 8])?,
                &TensorView::new(&b.k, &[8, 2, 8])?,
                &TensorView::new(&b.v, &[8, 2, 8])?,
                &mut out,
                Some(&mut lse),
                &s,
                &AttentionParams::default(),
            )
        },
    );
}

#[test]
fn paged_varlen_rules() {
    let inv = ErrorKind::InvalidArgument;
    // 4 pages of 2 keys: sequence 0 (4 keys) takes pages [3, 1], 1 (1 key) [0], 2 (3 keys) [2, x].
    let paged = |c: &Context, b: &mut Packed, table: &[i32], page: usize| {
        let s = Varlen::new(
            TensorView::new(&b.cu_q, &[4])?,
            TensorView::new(&b.cu_kv, &[4])?,
            3,
            4,
        )
        .block_table(TensorView::new(table, &[3, 2])?);
        let mut out = TensorViewMut::new(&mut b.out, &[6, 4, 8])?;
        c.forward_varlen(
            &TensorView::new(&b.q, &[6, 4, 8])?,
            &TensorView::new(&b.k, &[8 / page, page, 2, 8])?,
            &TensorView::new(&b.v, &[8 / page, page, 2, 8])?,
            &mut out,
            None,
            &s,
            &AttentionParams::default(),
        )
    };
    let mut b = packed();
    paged(&ctx(), &mut b, &[3, 1, 0, -1, 2, 0], 2).unwrap();
    varlen_err(
        inv,
        &["block_table[2][1]=4 but the cache has pages 0..4"],
        |_| {},
        |c, b| paged(c, b, &[3, 1, 0, -1, 2, 4], 2),
    );
    varlen_err(
        inv,
        &["block_table[0][0]=-3"],
        |_| {},
        |c, b| paged(c, b, &[-3, 1, 0, 0, 2, 0], 2),
    );
    // Pages of 3 keys are not a power of two (k holds 2 pages of 3, plus 2 spare rows).
    varlen_err(
        inv,
        &["k.shape[1]=3 (page_size) must be a power of two from 1 to 256"],
        |_| {},
        |c, b| {
            let s = Varlen::new(
                TensorView::new(&b.cu_q, &[4])?,
                TensorView::new(&b.cu_kv, &[4])?,
                3,
                4,
            )
            .block_table(TensorView::new(&[0, 1, 0, 0, 1, 0][..], &[3, 2])?);
            let mut out = TensorViewMut::new(&mut b.out, &[6, 4, 8])?;
            c.forward_varlen(
                &TensorView::new(&b.q, &[6, 4, 8])?,
                &TensorView::new(&b.k[..96], &[2, 3, 2, 8])?,
                &TensorView::new(&b.v[..96], &[2, 3, 2, 8])?,
                &mut out,
                None,
                &s,
                &AttentionParams::default(),
            )
        },
    );
}

#[test]
fn varlen_backward_rules() {
    let mut b = packed();
    let (mut dq, mut dk, mut dv) = (
        vec![POISON; 6 * 32],
        vec![POISON; 8 * 16],
        vec![POISON; 8 * 16],
    );
    let lse = vec![0f32; 24];
    let dout = data(6 * 32, 0.7);
    let run = |b: &Packed, used: bool, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]| {
        let mut s = Varlen::new(
            TensorView::new(&b.cu_q, &[4]).unwrap(),
            TensorView::new(&b.cu_kv, &[4]).unwrap(),
            3,
            4,
        );
        if used {
            s = s.seqused_kv(TensorView::new(&b.used, &[3]).unwrap());
        }
        let inputs = BackwardInputs {
            q: TensorView::new(&b.q, &[6, 4, 8]).unwrap(),
            k: TensorView::new(&b.k, &[8, 2, 8]).unwrap(),
            v: TensorView::new(&b.v, &[8, 2, 8]).unwrap(),
            out: TensorView::new(&b.q, &[6, 4, 8]).unwrap(),
            dout: TensorView::new(&dout, &[6, 4, 8]).unwrap(),
            lse: TensorView::new(&lse, &[4, 6]).unwrap(),
        };
        let mut g = Gradients {
            dq: TensorViewMut::new(dq, &[6, 4, 8]).unwrap(),
            dk: TensorViewMut::new(dk, &[8, 2, 8]).unwrap(),
            dv: TensorViewMut::new(dv, &[8, 2, 8]).unwrap(),
        };
        ctx().backward_varlen(&inputs, &mut g, &s, &AttentionParams::default())
    };
    let err = run(&b, true, &mut dq, &mut dk, &mut dv).unwrap_err();
    check(err, ErrorKind::Unsupported, &["seqused_kv is forward only"]);
    b.cu_kv[2] = 3;
    let err = run(&b, false, &mut dq, &mut dk, &mut dv).unwrap_err();
    check(
        err,
        ErrorKind::InvalidArgument,
        &["cu_seqlens_kv[2]=3 is less than cu_seqlens_kv[1]=4"],
    );
    assert!(dq.iter().chain(&dk).chain(&dv).all(|&x| x == POISON));
}

/// A dense cache of 2 entries × 4 slots (3 sequences of 2, 0 and 1 cached keys with
/// cache_batch_idx [1, 0, 2]... see each test), 2 query heads over 1 KV head, head dim 4.
struct Cache {
    q: Vec<f32>,
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
    seqlens: Vec<i32>,
    k_new: Vec<f32>,
    v_new: Vec<f32>,
    out: Vec<f32>,
    lse: Vec<f32>,
}

/// 2 sequences, 1 query row each, entries × 4 slots × 1 KV head × 4 dims; 1 new key each.
fn cache(entries: usize) -> Cache {
    Cache {
        q: data(2 * 2 * 4, 0.1),
        k_cache: data(entries * 4 * 4, 0.2),
        v_cache: data(entries * 4 * 4, 0.3),
        seqlens: vec![2, 0],
        k_new: data(2 * 4, 0.4),
        v_new: data(2 * 4, 0.5),
        out: vec![POISON; 2 * 2 * 4],
        lse: vec![POISON; 4],
    }
}

/// Runs a KV-cache call that must fail; the outputs and the cache must be unchanged.
fn kv_err(
    kind: ErrorKind,
    needles: &[&str],
    entries: usize,
    change: impl FnOnce(&mut Cache),
    call: impl FnOnce(&Context, &mut Cache) -> ufa::Result<()>,
) {
    let mut c = cache(entries);
    change(&mut c);
    let (k0, v0) = (c.k_cache.clone(), c.v_cache.clone());
    let err = call(&ctx(), &mut c).expect_err("call must fail");
    check(err, kind, needles);
    assert!(
        c.out.iter().chain(&c.lse).all(|&x| x == POISON),
        "output written on error"
    );
    assert!(c.k_cache == k0 && c.v_cache == v0, "cache written on error");
}

#[allow(clippy::too_many_arguments)]
fn kv_call(
    ctx: &Context,
    c: &mut Cache,
    table: Option<(&[i32], usize)>,
    batch_idx: Option<&[i32]>,
    append: bool,
    rotary: Option<(&[f32], usize)>,
) -> ufa::Result<()> {
    let cache_shape = match table {
        Some((_, page)) => [c.k_cache.len() / (page * 4), page, 1, 4],
        None => [c.k_cache.len() / 16, 4, 1, 4],
    };
    let mut kc = KvCache {
        k: TensorViewMut::new(&mut c.k_cache, &cache_shape)?,
        v: TensorViewMut::new(&mut c.v_cache, &cache_shape)?,
        seqlens: TensorView::new(&c.seqlens, &[2])?,
        block_table: table
            .map(|(t, _)| TensorView::new(t, &[2, t.len() / 2]))
            .transpose()?,
        batch_idx: batch_idx.map(|i| TensorView::new(i, &[2])).transpose()?,
        checked: false,
    };
    let rot = rotary
        .map(|(t, rows)| -> ufa::Result<Rotary<'_>> {
            Ok(Rotary {
                cos: TensorView::new(t, &[rows, t.len() / rows])?,
                sin: TensorView::new(t, &[rows, t.len() / rows])?,
                interleaved: false,
            })
        })
        .transpose()?;
    let app = KvAppend {
        k: TensorView::new(&c.k_new, &[2, 1, 1, 4])?,
        v: TensorView::new(&c.v_new, &[2, 1, 1, 4])?,
        rotary: rot,
    };
    let mut out = TensorViewMut::new(&mut c.out, &[2, 1, 2, 4])?;
    let mut lse = TensorViewMut::new(&mut c.lse, &[2, 2, 1])?;
    ctx.forward_kvcache(
        &TensorView::new(&c.q, &[2, 1, 2, 4])?,
        &mut kc,
        append.then_some(&app),
        &mut out,
        Some(&mut lse),
        &AttentionParams::default().causal(true),
    )
}

#[test]
fn valid_kvcache_call_appends_and_attends() {
    let mut c = cache(2);
    kv_call(&ctx(), &mut c, None, None, true, None).unwrap();
    assert_eq!(
        &c.k_cache[2 * 4..3 * 4],
        &c.k_new[..4],
        "sequence 0's key at slot 2"
    );
    assert_eq!(
        &c.k_cache[16..20],
        &c.k_new[4..],
        "sequence 1's key at slot 0"
    );
    assert!(c.out.iter().chain(&c.lse).all(|x| x.is_finite()));
}

#[test]
fn kvcache_rules_leave_the_cache_untouched() {
    let inv = ErrorKind::InvalidArgument;
    kv_err(
        inv,
        &["cache_seqlens[0]=4 exceeds", "capacity - seqlen_new", "=3"],
        2,
        |c| c.seqlens[0] = 4,
        |x, c| kv_call(x, c, None, None, true, None),
    );
    kv_err(
        inv,
        &["cache_seqlens[1]=-1 is negative"],
        2,
        |c| c.seqlens[1] = -1,
        |x, c| kv_call(x, c, None, None, true, None),
    );
    kv_err(
        inv,
        &["k_cache.shape[0]=1 (batch_cache) but q.shape[0]=2"],
        1,
        |_| {},
        |x, c| kv_call(x, c, None, None, true, None),
    );
    kv_err(
        inv,
        &["cache_batch_idx[1]=3 but the cache has entries 0..3"],
        3,
        |_| {},
        |x, c| kv_call(x, c, None, Some(&[0, 3]), true, None),
    );
    kv_err(
        inv,
        &["cache_batch_idx[1]=2 repeats cache_batch_idx[0]"],
        3,
        |_| {},
        |x, c| kv_call(x, c, None, Some(&[2, 2]), true, None),
    );
    // Pages of 2 slots: 4 pages. Sequence 0 (2 + 1 keys) needs 2 pages, sequence 1 one.
    kv_err(
        inv,
        &["block_table[0][1]=4 but the cache has pages 0..4"],
        2,
        |_| {},
        |x, c| kv_call(x, c, Some((&[1, 4, 2, 0], 2)), None, true, None),
    );
    kv_err(
        inv,
        &["sequences 0 and 1 would both append to row 0 of page 1"],
        2,
        |_| {},
        |x, c| kv_call(x, c, Some((&[0, 1, 1, 3], 2)), None, true, None),
    );
    kv_err(
        inv,
        &["cache_batch_idx cannot be combined with block_table"],
        2,
        |_| {},
        |x, c| kv_call(x, c, Some((&[0, 1, 2, 3], 2)), Some(&[0, 1]), true, None),
    );
    kv_err(
        inv,
        &["needs rotary positions up to 2", "rotary_cos has 2 rows"],
        2,
        |_| {},
        |x, c| kv_call(x, c, None, None, true, Some((&[0.5; 4], 2))),
    );
    kv_err(
        inv,
        &["rotary_cos.shape[1]=3 (rotary_dim / 2) must be from 1 to head_dim / 2 = 2"],
        2,
        |_| {},
        |x, c| kv_call(x, c, None, None, true, Some((&[0.5; 12], 4))),
    );
}

#[test]
fn kvcache_page_size_and_dtype_rules() {
    let inv = ErrorKind::InvalidArgument;
    kv_err(
        inv,
        &["k_cache.shape[1]=3 (page_size) must be a power of two"],
        3,
        |_| {},
        |x, c| {
            // 12 slots as pages of 3: not a power of two.
            let mut kc = KvCache {
                k: TensorViewMut::new(&mut c.k_cache, &[4, 3, 1, 4])?,
                v: TensorViewMut::new(&mut c.v_cache, &[4, 3, 1, 4])?,
                seqlens: TensorView::new(&c.seqlens, &[2])?,
                block_table: Some(TensorView::new(&[0, 1, 2, 3][..], &[2, 2])?),
                batch_idx: None,
                checked: false,
            };
            let mut out = TensorViewMut::new(&mut c.out, &[2, 1, 2, 4])?;
            x.forward_kvcache(
                &TensorView::new(&c.q, &[2, 1, 2, 4])?,
                &mut kc,
                None,
                &mut out,
                None,
                &AttentionParams::default(),
            )
        },
    );
    kv_err(
        inv,
        &["k_cache.dtype=bf16 but must equal q.dtype=f32"],
        2,
        |_| {},
        |x, c| {
            let mut kb = vec![half::bf16::ZERO; 32];
            let mut vb = vec![half::bf16::ZERO; 32];
            let mut kc = KvCache {
                k: TensorViewMut::new(&mut kb, &[2, 4, 1, 4])?,
                v: TensorViewMut::new(&mut vb, &[2, 4, 1, 4])?,
                seqlens: TensorView::new(&c.seqlens, &[2])?,
                block_table: None,
                batch_idx: None,
                checked: false,
            };
            let mut out = TensorViewMut::new(&mut c.out, &[2, 1, 2, 4])?;
            x.forward_kvcache(
                &TensorView::new(&c.q, &[2, 1, 2, 4])?,
                &mut kc,
                None,
                &mut out,
                None,
                &AttentionParams::default(),
            )
        },
    );
}

#[test]
fn merge_rules() {
    let inv = ErrorKind::InvalidArgument;
    let (a, la) = (data(2 * 3 * 2 * 4, 0.1), vec![0.5f32; 2 * 2 * 3]);
    let b = data(2 * 3 * 2 * 4, 0.2);
    let mut out = vec![POISON; 2 * 3 * 2 * 4];
    fn st<'a>(o: &'a [f32], la: &'a [f32], s: [usize; 4]) -> AttentionState<'a> {
        AttentionState {
            out: TensorView::new(o, &s).unwrap(),
            lse: TensorView::new(&la[..s[0] * s[1] * s[2]], &[s[0], s[2], s[1]]).unwrap(),
        }
    }
    let s4 = [2, 3, 2, 4];
    let c = ctx();
    let e = c
        .merge_states(&[], &mut TensorViewMut::new(&mut out, &s4).unwrap(), None)
        .unwrap_err();
    check(e, inv, &["states is empty"]);
    let e = c
        .merge_states(
            &[st(&a, &la, s4), st(&b[..16], &la, [1, 2, 2, 4])],
            &mut TensorViewMut::new(&mut out, &s4).unwrap(),
            None,
        )
        .unwrap_err();
    check(
        e,
        inv,
        &["states[1].out.shape[0]=1 but must equal states[0].out.shape[0] (batch)=2"],
    );
    assert!(out.iter().all(|&x| x == POISON));
    // An output overlapping the second state (not in place) is refused.
    let mut both = [a.clone(), b.clone()].concat();
    let (first, second) = both.split_at_mut(a.len());
    let second_view = unsafe {
        TensorView::from_raw_parts(
            second.as_ptr() as *const std::ffi::c_void,
            ufa::DType::F32,
            ufa::Device::Cpu,
            &s4,
            &[24, 8, 4, 1],
        )
        .unwrap()
    };
    let states = [
        st(first, &la, s4),
        AttentionState {
            out: second_view,
            lse: TensorView::new(&la, &[2, 2, 3]).unwrap(),
        },
    ];
    let e = c
        .merge_states(&states, &mut TensorViewMut::new(second, &s4).unwrap(), None)
        .unwrap_err();
    check(e, inv, &["out shares memory with states[1].out"]);
}
