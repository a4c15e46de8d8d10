//! Attention over a KV cache, FlashAttention's `flash_attn_with_kvcache`: new keys and values
//! are appended in place at each sequence's `cache_seqlens` (rotated first when rotary tables are
//! given), then q attends to every key in the cache, bottom-right aligned when causal. The cache
//! is dense `[batch_cache, capacity, heads_kv, dim]` (optionally read through `cache_batch_idx`)
//! or paged `[num_pages, page_size, heads_kv, dim]` with a block table; pages may be shared and
//! in any order, and page sizes are the powers of two from 1 to 256.
//!
//! Everything is validated before anything is written: a call that fails leaves the cache as it
//! was. `cache_seqlens` is not advanced: the caller adds `seqlen_new` after the call, as with
//! FlashAttention.

use crate::device::Device;
use crate::error::{invalid, Result};
use crate::metadata::{check_block_table, check_lengths, int_array, page_shift, Fetch};
use crate::params::AttentionParams;
use crate::problem::{
    assemble, byte_range, check_device, check_f32, check_float, check_last_contiguous,
    check_no_alias, check_no_self_overlap, check_rank, check_tensor, input_ranges, lse_operand,
    operand, Dims, Operand, Problem, Ranges, MAX_HEAD_DIM, MAX_SEQLEN,
};
use crate::sequences::{IntArray, KeyLengths, RowMap, Sequences};
use crate::tensor::{TensorView, TensorViewMut};

/// A KV cache and where each sequence's keys end.
#[derive(Debug)]
pub struct KvCache<'a> {
    /// Dense `[batch_cache, capacity, heads_kv, head_dim]`, or paged `[num_pages, page_size,
    /// heads_kv, head_dim]` with `block_table`. Written where new keys are appended.
    pub k: TensorViewMut<'a>,
    /// As `k`, with `head_dim_v`.
    pub v: TensorViewMut<'a>,
    /// int32 `[batch]`: keys already in the cache for each sequence (the call appends after them
    /// and leaves this array unchanged).
    pub seqlens: TensorView<'a>,
    /// int32 `[batch, max_pages]`: key `j` of sequence `b` is row `j % page_size` of page
    /// `block_table[b][j / page_size]`. Entries past a sequence's last page are never read.
    pub block_table: Option<TensorView<'a>>,
    /// int32 `[batch]` (dense caches only): sequence `b` uses cache entry `batch_idx[b]`; without
    /// it, entry `b`. Entries must be distinct when keys are appended.
    pub batch_idx: Option<TensorView<'a>>,
    /// CUDA calls: also check the metadata's values on the host (a synchronisation); without it
    /// out-of-range indices are skipped by the kernels (never followed). CPU calls always check.
    pub checked: bool,
}

/// Keys and values to append before attending: `[batch, seqlen_new, heads_kv, head_dim(_v)]`.
#[derive(Clone, Copy, Debug)]
pub struct KvAppend<'a> {
    pub k: TensorView<'a>,
    pub v: TensorView<'a>,
    /// Rotary embedding applied to the new keys (at positions `seqlens[b] + i`) and to q (at
    /// `seqlens[b] + i` when causal or windowed, else at `seqlens[b]` for every row, as
    /// FlashAttention does).
    pub rotary: Option<Rotary<'a>>,
}

/// Rotary position embedding tables: `cos` and `sin` `[seqlen_ro, rotary_dim / 2]` (any float
/// dtype). The first `rotary_dim` columns of each row are rotated; the rest pass unchanged.
/// Interleaved (GPT-J): pairs `(x[2i], x[2i+1])`; otherwise (GPT-NeoX): `(x[i], x[i + rotary_dim /
/// 2])`. `(a, b) -> (a·cos − b·sin, b·cos + a·sin)`, computed in f64 and rounded to f32, then to
/// the tensor's dtype, so every backend writes the same bits.
#[derive(Clone, Copy, Debug)]
pub struct Rotary<'a> {
    pub cos: TensorView<'a>,
    pub sin: TensorView<'a>,
    pub interleaved: bool,
}

/// The rotation of validated rows.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RotaryOp {
    /// `[seqlen_ro, rotary_dim / 2]` as strides `[row, col, 0, 0]`.
    pub cos: Operand,
    pub sin: Operand,
    pub rotary_dim: usize,
    pub seqlen_ro: usize,
    pub interleaved: bool,
    /// q row `i` is at position `seqlens[b] + i` (causal or windowed calls) rather than
    /// `seqlens[b]`.
    pub q_advances: bool,
}

/// What an appending call writes before it attends.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Append {
    /// `[batch, seqlen_new, heads_kv, dim]`.
    pub k: Operand,
    pub v: Operand,
    pub seqlen_new: usize,
    /// The cache operands (rows mapped like the attention's k and v).
    pub k_cache: Operand,
    pub v_cache: Operand,
    pub seqlens: IntArray,
    pub rotary: Option<RotaryOp>,
}

/// A validated KV-cache call: the append, then attention of `attn` (whose q is the caller's,
/// or the rotated copy the backend makes and points it at).
#[derive(Clone, Copy, Debug)]
pub(crate) struct KvCacheProblem {
    pub attn: Problem,
    pub append: Option<Append>,
}

impl KvCacheProblem {
    /// Whether q must be rotated into scratch memory before attending.
    pub fn rotates_q(&self) -> bool {
        self.append.is_some_and(|a| a.rotary.is_some())
    }

    /// Bytes of scratch memory the call needs (the rotated q), rounded up to 256.
    pub fn workspace_bytes(&self) -> usize {
        if !self.rotates_q() {
            return 0;
        }
        let p = &self.attn;
        rotated_q_bytes(p.batch * p.seqlen_q * p.heads_q * p.head_dim, p.q.dtype)
    }

    /// Points the attention's q at a rotated copy in `ptr`, contiguous `[batch, seqlen_q,
    /// heads_q, head_dim]`.
    pub fn use_rotated_q(&mut self, ptr: *mut u8) {
        let p = &mut self.attn;
        let (s, h, d) = (p.seqlen_q, p.heads_q, p.head_dim);
        p.q = Operand::strided(ptr, p.q.dtype, [s * h * d, h * d, d, 1]);
    }
}

/// Checks every argument of a KV-cache call; nothing is written.
#[allow(clippy::too_many_arguments)]
pub(crate) fn validate_kvcache(
    q: &TensorView<'_>,
    cache: &KvCache<'_>,
    append: Option<&KvAppend<'_>>,
    out: &TensorViewMut<'_>,
    lse: Option<&TensorViewMut<'_>>,
    params: &AttentionParams<'_>,
    fetch: Fetch<'_>,
) -> Result<KvCacheProblem> {
    let device = q.device();
    check_rank("q", q.layout(), 4, "[batch, seqlen_q, heads_q, head_dim]")?;
    check_last_contiguous("q", q.layout())?;
    if !q.dtype().is_float() {
        invalid!("q.dtype={} but must be f16, bf16 or f32", q.dtype());
    }
    let [batch, seqlen_q, heads_q, head_dim] = [0, 1, 2, 3].map(|d| q.shape()[d]);
    let paged = cache.block_table.is_some();
    let (kc, vc) = (cache.k.as_view(), cache.v.as_view());
    let layout_name = if paged {
        "[num_pages, page_size, heads_kv, head_dim]"
    } else {
        "[batch_cache, capacity, heads_kv, head_dim]"
    };
    for (name, t) in [("k_cache", &kc), ("v_cache", &vc)] {
        check_device(name, t.device(), device)?;
        check_rank(name, t.layout(), 4, layout_name)?;
        check_last_contiguous(name, t.layout())?;
        if t.dtype() != q.dtype() {
            invalid!(
                "{name}.dtype={} but must equal q.dtype={}",
                t.dtype(),
                q.dtype()
            );
        }
    }
    let [entries, capacity, heads_kv, _] = [0, 1, 2, 3].map(|d| kc.shape()[d]);
    let head_dim_v = vc.shape()[3];
    for (name, value) in [
        ("q.shape[2] (heads_q)", heads_q),
        ("q.shape[3] (head_dim)", head_dim),
        ("k_cache.shape[1]", capacity),
        ("k_cache.shape[2] (heads_kv)", heads_kv),
        ("v_cache.shape[3] (head_dim_v)", head_dim_v),
    ] {
        if value == 0 {
            invalid!("{name}=0 but must be at least 1");
        }
    }
    for (name, value) in [("head_dim", head_dim), ("head_dim_v", head_dim_v)] {
        if value > MAX_HEAD_DIM {
            invalid!("{name}={value} exceeds the largest supported head dimension {MAX_HEAD_DIM}");
        }
    }
    if kc.shape()[3] != head_dim {
        invalid!(
            "k_cache.shape[3]={} but must equal q.shape[3] (head_dim)={head_dim}",
            kc.shape()[3]
        );
    }
    for d in 0..3 {
        if vc.shape()[d] != kc.shape()[d] {
            invalid!(
                "v_cache.shape[{d}]={} but must equal k_cache.shape[{d}]={}",
                vc.shape()[d],
                kc.shape()[d]
            );
        }
    }
    if heads_q % heads_kv != 0 {
        invalid!(
            "k_cache.shape[2]={heads_kv} (heads_kv) does not divide q.shape[2]={heads_q} (heads_q)"
        );
    }

    let seqlens = int_array("cache_seqlens", &cache.seqlens, device, &[(batch, "batch")])?;
    let (rows, shift, max_pages) = match &cache.block_table {
        Some(t) => {
            if cache.batch_idx.is_some() {
                invalid!(
                    "cache_batch_idx cannot be combined with block_table: the block table \
                     already says where each sequence's keys are"
                );
            }
            if t.ndim() != 2 {
                invalid!(
                    "block_table must have 2 dimensions [batch, max_pages], got shape {:?}",
                    t.shape()
                );
            }
            let cols = t.shape()[1];
            let table = int_array(
                "block_table",
                t,
                device,
                &[(batch, "q.shape[0] (batch)"), (cols, "max_pages")],
            )?;
            let shift = page_shift("k_cache", capacity)?;
            let rows = RowMap::Paged {
                table,
                shift,
                pages: entries,
            };
            (rows, Some(shift), cols)
        }
        None => match &cache.batch_idx {
            Some(i) => {
                let index = int_array("cache_batch_idx", i, device, &[(batch, "batch")])?;
                (RowMap::Gathered { index, entries }, None, 0)
            }
            None => {
                if entries < batch {
                    invalid!(
                        "k_cache.shape[0]={entries} (batch_cache) but q.shape[0]={batch} \
                         sequences need an entry each (or pass cache_batch_idx)"
                    );
                }
                (RowMap::Strided, None, 0)
            }
        },
    };
    // The most keys a sequence can hold.
    let key_bound = match shift {
        Some(s) => max_pages << s,
        None => capacity,
    };
    if key_bound >= MAX_SEQLEN || seqlen_q >= MAX_SEQLEN {
        invalid!(
            "the cache holds up to {key_bound} keys a sequence and q has {seqlen_q} rows; both \
             must be less than {MAX_SEQLEN}"
        );
    }

    let mut seqlen_new = 0;
    let mut new_kv = None;
    let mut rotary = None;
    if let Some(a) = append {
        let (k, v) = (&a.k, &a.v);
        check_tensor(
            "k",
            k.layout(),
            k.device(),
            device,
            &[
                (batch, "q.shape[0] (batch)"),
                (k.shape().get(1).copied().unwrap_or(0), "seqlen_new"),
                (heads_kv, "k_cache.shape[2] (heads_kv)"),
                (head_dim, "q.shape[3] (head_dim)"),
            ],
        )?;
        seqlen_new = k.shape()[1];
        if seqlen_new > key_bound {
            invalid!(
                "k.shape[1]={seqlen_new} (seqlen_new) exceeds the {key_bound} keys a sequence's \
                 cache can hold"
            );
        }
        check_tensor(
            "v",
            v.layout(),
            v.device(),
            device,
            &[
                (batch, "q.shape[0] (batch)"),
                (seqlen_new, "k.shape[1] (seqlen_new)"),
                (heads_kv, "k_cache.shape[2] (heads_kv)"),
                (head_dim_v, "v_cache.shape[3] (head_dim_v)"),
            ],
        )?;
        for (name, t) in [("k", k), ("v", v)] {
            if t.dtype() != q.dtype() {
                invalid!(
                    "{name}.dtype={} but must equal the cache's dtype {}",
                    t.dtype(),
                    q.dtype()
                );
            }
        }
        if let Some(r) = &a.rotary {
            rotary = Some(rotary_op(r, device, head_dim, params)?);
        }
        new_kv = Some((operand(k.as_ptr(), k.dtype(), k.layout()), {
            operand(v.as_ptr(), v.dtype(), v.layout())
        }));
    }

    if device == Device::Cpu || cache.checked {
        let lens = fetch(&seqlens)?;
        check_lengths(
            "cache_seqlens",
            &lens,
            |_| key_bound - seqlen_new.min(key_bound),
            if seqlen_new > 0 {
                "the cache's room for them before appending k (capacity - seqlen_new)"
            } else {
                "the cache's capacity"
            },
        )?;
        let totals: Vec<usize> = lens.iter().map(|&n| n as usize + seqlen_new).collect();
        match rows {
            RowMap::Paged { table, shift, .. } => {
                let t = fetch(&table)?;
                check_block_table(&t, table.cols, &totals, 1 << shift, ("k_cache", entries))?;
                if seqlen_new > 0 {
                    check_distinct_slots(&t, table.cols, &lens, seqlen_new, shift)?;
                }
            }
            RowMap::Gathered { index, .. } => {
                let idx = fetch(&index)?;
                for (b, &e) in idx.iter().enumerate() {
                    if e < 0 || e as usize >= entries {
                        invalid!(
                            "cache_batch_idx[{b}]={e} but the cache has entries 0..{entries} \
                             (k_cache.shape[0])"
                        );
                    }
                }
                if seqlen_new > 0 {
                    let mut seen = vec![usize::MAX; entries];
                    for (b, &e) in idx.iter().enumerate() {
                        if seen[e as usize] != usize::MAX {
                            invalid!(
                                "cache_batch_idx[{b}]={e} repeats cache_batch_idx[{}]: \
                                 sequences that append keys need their own cache entries",
                                seen[e as usize]
                            );
                        }
                        seen[e as usize] = b;
                    }
                }
            }
            _ => {}
        }
        if let Some(r) = &rotary {
            let last_q = if r.q_advances { seqlen_q } else { 1 };
            for (b, &n) in lens.iter().enumerate() {
                let last = n as usize + seqlen_new.max(last_q);
                if last > r.seqlen_ro {
                    invalid!(
                        "sequence {b} needs rotary positions up to {} (cache_seqlens[{b}]={n} \
                         plus the new rows) but rotary_cos has {} rows",
                        last - 1,
                        r.seqlen_ro
                    );
                }
            }
        }
    }

    // The attention: q against the whole cache, each sequence's keys the ones it held plus the
    // appended ones.
    let cache_operand = |t: &TensorView<'_>| Operand {
        rows,
        ..operand(t.as_ptr(), t.dtype(), t.layout())
    };
    let (k_cache, v_cache) = (cache_operand(&kc), cache_operand(&vc));
    let seqs = Sequences {
        cu_q: None,
        kv: KeyLengths::Used {
            used: seqlens,
            add: seqlen_new,
        },
        alignment: params.causal_alignment,
    };
    let dims = Dims {
        batch,
        seqlen_q,
        seqlen_kv: key_bound,
        heads_q,
        heads_kv,
        head_dim,
        head_dim_v,
    };
    let q_op = operand(q.as_ptr(), q.dtype(), q.layout());
    let mut attn = assemble(device, dims, [q_op, k_cache, v_cache], seqs, params)?;
    if attn.dropout.is_some() {
        invalid!("dropout is not supported on KV-cache calls (inference): set it to None");
    }

    // Outputs: out and the LSE; the cache is written too when appending.
    check_tensor(
        "out",
        out.layout(),
        out.device(),
        device,
        &[
            (batch, "q.shape[0] (batch)"),
            (seqlen_q, "q.shape[1] (seqlen_q)"),
            (heads_q, "q.shape[2] (heads_q)"),
            (head_dim_v, "v_cache.shape[3] (head_dim_v)"),
        ],
    )?;
    check_float("out", out.dtype())?;
    check_no_self_overlap("out", out.layout())?;
    let range = |t: &TensorView<'_>| byte_range(t.as_ptr(), t.dtype(), t.layout());
    let mut outputs: Ranges<'_> = vec![("out", range(&out.as_view()))];
    if let Some(l) = lse {
        check_tensor(
            "lse",
            l.layout(),
            l.device(),
            device,
            &[
                (batch, "q.shape[0] (batch)"),
                (heads_q, "q.shape[2] (heads_q)"),
                (seqlen_q, "q.shape[1] (seqlen_q)"),
            ],
        )?;
        check_f32("lse", l.dtype())?;
        check_no_self_overlap("lse", l.layout())?;
        outputs.push(("lse", range(&l.as_view())));
        attn.lse = Some(lse_operand(l.as_view().as_ptr(), l.layout()));
    }
    let mut inputs = input_ranges(q, &kc, &vc, params);
    inputs[1].0 = "k_cache";
    inputs[2].0 = "v_cache";
    let meta = |name, a: &IntArray| (name, (a.ptr as usize, a.ptr as usize + a.span_bytes()));
    inputs.push(meta("cache_seqlens", &seqlens));
    match rows {
        RowMap::Paged { table, .. } => inputs.push(meta("block_table", &table)),
        RowMap::Gathered { index, .. } => inputs.push(meta("cache_batch_idx", &index)),
        _ => {}
    }
    let mut append_op = None;
    if let (Some(a), Some((k_new, v_new))) = (append, new_kv) {
        // The cache is written: it must not overlap any input but itself, nor the outputs.
        for (name, t) in [("k_cache", &kc), ("v_cache", &vc)] {
            check_no_self_overlap(name, t.layout())?;
        }
        let cache_ranges = vec![("k_cache", range(&kc)), ("v_cache", range(&vc))];
        let mut others: Ranges<'_> = inputs[3..].to_vec();
        others.push(("q", range(q)));
        others.push(("k", range(&a.k)));
        others.push(("v", range(&a.v)));
        if let Some(r) = &a.rotary {
            others.push(("rotary_cos", range(&r.cos)));
            others.push(("rotary_sin", range(&r.sin)));
        }
        check_no_alias(&cache_ranges, &others)?;
        inputs.push(("k", range(&a.k)));
        inputs.push(("v", range(&a.v)));
        append_op = Some(Append {
            k: k_new,
            v: v_new,
            seqlen_new,
            k_cache,
            v_cache,
            seqlens,
            rotary,
        });
    }
    check_no_alias(&outputs, &inputs)?;
    attn.out = operand(out.as_view().as_ptr(), out.dtype(), out.layout());
    Ok(KvCacheProblem {
        attn,
        append: append_op,
    })
}

/// Rotary tables checked against the head dim.
fn rotary_op(
    r: &Rotary<'_>,
    device: Device,
    head_dim: usize,
    params: &AttentionParams<'_>,
) -> Result<RotaryOp> {
    for (name, t) in [("rotary_cos", &r.cos), ("rotary_sin", &r.sin)] {
        check_device(name, t.device(), device)?;
        check_rank(name, t.layout(), 2, "[seqlen_ro, rotary_dim / 2]")?;
        check_float(name, t.dtype())?;
    }
    if r.sin.shape() != r.cos.shape() {
        invalid!(
            "rotary_sin.shape={:?} but must equal rotary_cos.shape={:?}",
            r.sin.shape(),
            r.cos.shape()
        );
    }
    let (seqlen_ro, half) = (r.cos.shape()[0], r.cos.shape()[1]);
    if half == 0 || 2 * half > head_dim {
        invalid!(
            "rotary_cos.shape[1]={half} (rotary_dim / 2) must be from 1 to head_dim / 2 = {}",
            head_dim / 2
        );
    }
    let table = |t: &TensorView<'_>| {
        let s = t.strides();
        Operand::strided(t.as_ptr() as *mut u8, t.dtype(), [s[0], s[1], 0, 0])
    };
    Ok(RotaryOp {
        cos: table(&r.cos),
        sin: table(&r.sin),
        rotary_dim: 2 * half,
        seqlen_ro,
        interleaved: r.interleaved,
        q_advances: params.causal || params.window_left >= 0 || params.window_right >= 0,
    })
}

/// Two sequences appending to one slot of a shared page would race: each appended slot (page,
/// row) must belong to one sequence.
fn check_distinct_slots(
    table: &[i32],
    cols: usize,
    lens: &[i32],
    seqlen_new: usize,
    shift: u32,
) -> Result<()> {
    let mut slots = std::collections::HashMap::new();
    for (b, &n) in lens.iter().enumerate() {
        for pos in n as usize..n as usize + seqlen_new {
            let page = table[b * cols + (pos >> shift)];
            let slot = (page, pos & ((1 << shift) - 1));
            if let Some(other) = slots.insert(slot, b) {
                if other != b {
                    invalid!(
                        "sequences {other} and {b} would both append to row {} of page {page}: \
                         appended slots must belong to one sequence",
                        slot.1
                    );
                }
            }
        }
    }
    Ok(())
}

/// The f32 value a rotation writes (before rounding to the tensor's dtype): `a·c − b·s` (or
/// `b·c + a·s` with the roles swapped by the caller) in f64, whose products of f32 values are
/// exact, so any evaluation order gives this one rounding.
#[inline(always)]
pub(crate) fn rotate(a: f32, b: f32, c: f32, s: f32) -> f32 {
    (a as f64 * c as f64 - b as f64 * s as f64) as f32
}

/// Scratch device memory a caller lends a CUDA call, so that the call allocates nothing (CUDA
/// graphs, allocators of one's own). Its size comes from [`crate::kvcache_workspace_bytes`].
#[derive(Debug)]
pub struct Workspace<'a> {
    pub(crate) ptr: *mut std::ffi::c_void,
    pub(crate) bytes: usize,
    _borrow: std::marker::PhantomData<&'a mut [u8]>,
}

impl Workspace<'_> {
    /// # Safety
    /// `ptr` must address `bytes` bytes of device memory of the call's device, 256-byte
    /// aligned, which nothing else uses until the call's stream has run it.
    pub unsafe fn from_raw_parts(ptr: *mut std::ffi::c_void, bytes: usize) -> Self {
        Workspace {
            ptr,
            bytes,
            _borrow: std::marker::PhantomData,
        }
    }
}

/// The scratch a rotated copy of q takes: `elements` of `dtype`, rounded up to 256 bytes.
pub(crate) fn rotated_q_bytes(elements: usize, dtype: crate::DType) -> usize {
    (elements * dtype.size_in_bytes()).div_ceil(256) * 256
}
