//! Variable-length batches: sequences packed one after another along the rows of q, k and v,
//! FlashAttention's `cu_seqlens` convention (`flash_attn_varlen_func`), optionally over a paged
//! KV cache. Every rule of a dense call applies to each sequence on its own.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{invalid, Result};
use crate::metadata::{
    batch_of_cumulative, check_block_table, check_cumulative, check_lengths, int_array, page_shift,
    Fetch,
};
use crate::params::AttentionParams;
use crate::problem::{
    assemble, byte_range, check_device, check_dim, check_f32, check_float, check_head_dim,
    check_last_contiguous, check_no_alias, check_no_self_overlap, check_rank, input_ranges,
    range_of, BackwardArgs, BackwardProblem, Dims, Operand, Problem, Ranges, MAX_SEQLEN,
};
use crate::sequences::{IntArray, KeyLengths, RowMap, Sequences};
use crate::tensor::{Layout, TensorView, TensorViewMut};

/// A packed batch of variable-length sequences. Sequence `b`'s query rows are rows
/// `cu_seqlens_q[b]..cu_seqlens_q[b + 1]` of q (and of out; its LSE is
/// `lse[:, cu_seqlens_q[b]..]`), its keys rows `cu_seqlens_kv[b]..cu_seqlens_kv[b + 1]` of k
/// and v. Tensors: q `[total_q, heads_q, head_dim]`, k `[total_kv, heads_kv, head_dim]`, v
/// `[total_kv, heads_kv, head_dim_v]`, out `[total_q, heads_q, head_dim_v]`, LSE f32
/// `[heads_q, total_q]`. Rows past `cu_seqlens_q[batch]` are neither read nor written.
#[derive(Clone, Copy, Debug)]
pub struct Varlen<'a> {
    /// int32 `[batch + 1]`, from 0, non-decreasing.
    pub cu_seqlens_q: TensorView<'a>,
    /// int32 `[batch + 1]`, from 0, non-decreasing.
    pub cu_seqlens_kv: TensorView<'a>,
    /// At least the query rows of every sequence (CUDA grids are sized by it).
    pub max_seqlen_q: usize,
    /// At least the keys of every sequence.
    pub max_seqlen_kv: usize,
    /// int32 `[batch]`: sequence `b` attends to its first `seqused_kv[b]` keys only.
    pub seqused_kv: Option<TensorView<'a>>,
    /// int32 `[batch, max_pages]`: k and v are a paged cache `[num_pages, page_size, heads_kv,
    /// dim]` (page_size a power of two up to 256), and key `j` of sequence `b` is row
    /// `j % page_size` of page `block_table[b][j / page_size]`; `cu_seqlens_kv` then only gives
    /// each sequence's key count. Forward only.
    pub block_table: Option<TensorView<'a>>,
    /// CUDA calls: also check the metadata's values on the host (a synchronisation). Without
    /// it the kernels clamp every index they read, so bad metadata gives wrong numbers, never
    /// a read or write outside the tensors. CPU calls always check.
    pub checked: bool,
}

impl<'a> Varlen<'a> {
    pub fn new(
        cu_seqlens_q: TensorView<'a>,
        cu_seqlens_kv: TensorView<'a>,
        max_seqlen_q: usize,
        max_seqlen_kv: usize,
    ) -> Self {
        Varlen {
            cu_seqlens_q,
            cu_seqlens_kv,
            max_seqlen_q,
            max_seqlen_kv,
            seqused_kv: None,
            block_table: None,
            checked: false,
        }
    }

    pub fn seqused_kv(mut self, seqused_kv: TensorView<'a>) -> Self {
        self.seqused_kv = Some(seqused_kv);
        self
    }

    pub fn block_table(mut self, block_table: TensorView<'a>) -> Self {
        self.block_table = Some(block_table);
        self
    }

    pub fn checked(mut self, checked: bool) -> Self {
        self.checked = checked;
        self
    }
}

/// A `[rows, heads, dim]` tensor as a packed operand `[batch, row, head, dim]`.
fn packed(t: &TensorView<'_>, cu: IntArray) -> Operand {
    let s = t.strides();
    Operand {
        ptr: t.as_ptr() as *mut u8,
        dtype: t.dtype(),
        strides: [0, s[0], s[1], s[2]],
        rows: RowMap::Packed {
            cu,
            rows: t.shape()[0],
        },
        seq_dim: 1,
    }
}

/// A `[heads, rows]` f32 LSE as a packed operand `[batch, head, row]`.
fn packed_lse(t: &TensorView<'_>, cu: IntArray) -> Operand {
    let s = t.strides();
    Operand {
        ptr: t.as_ptr() as *mut u8,
        dtype: DType::F32,
        strides: [0, s[0], s[1], 0],
        rows: RowMap::Packed {
            cu,
            rows: t.shape()[1],
        },
        seq_dim: 2,
    }
}

fn check_3d(name: &str, t: &Layout, meaning: &str) -> Result<()> {
    check_rank(name, t, 3, meaning)?;
    check_last_contiguous(name, t)
}

/// Checks the inputs of a varlen call (everything but the outputs).
fn varlen_inputs(
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    s: &Varlen<'_>,
    params: &AttentionParams<'_>,
    fetch: Fetch<'_>,
) -> Result<Problem> {
    let device = q.device();
    check_3d("q", q.layout(), "[total_q, heads_q, head_dim]")?;
    let paged = s.block_table.is_some();
    // Dimension of k and v holding heads (and the one after it, the head dim).
    let hd = if paged { 2 } else { 1 };
    for (name, t) in [("k", k), ("v", v)] {
        if paged {
            check_rank(
                name,
                t.layout(),
                4,
                "[num_pages, page_size, heads_kv, head_dim]",
            )?;
            check_last_contiguous(name, t.layout())?;
        } else {
            check_3d(name, t.layout(), "[total_kv, heads_kv, head_dim]")?;
        }
        check_device(name, t.device(), device)?;
    }
    if !q.dtype().is_float() {
        invalid!("q.dtype={} but must be f16, bf16 or f32", q.dtype());
    }
    for (name, t) in [("k", k), ("v", v)] {
        if t.dtype() != q.dtype() {
            invalid!(
                "{name}.dtype={} but must equal q.dtype={}",
                t.dtype(),
                q.dtype()
            );
        }
    }
    let (total_q, heads_q, head_dim) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let (heads_kv, head_dim_v) = (k.shape()[hd], v.shape()[hd + 1]);
    let kn = |d: usize| format!("k.shape[{}]", d + hd);
    for (name, value) in [
        ("q.shape[1] (heads_q)".to_string(), heads_q),
        ("q.shape[2] (head_dim)".to_string(), head_dim),
        (format!("{} (heads_kv)", kn(0)), heads_kv),
        (format!("v.shape[{}] (head_dim_v)", hd + 1), head_dim_v),
    ] {
        if value == 0 {
            invalid!("{name}=0 but every size must be at least 1");
        }
    }
    check_head_dim("head_dim", head_dim)?;
    check_head_dim("head_dim_v", head_dim_v)?;
    check_dim("k", k.layout(), hd + 1, head_dim, "q.shape[2] (head_dim)")?;
    for d in 0..=hd {
        check_dim("v", v.layout(), d, k.shape()[d], &format!("k.shape[{d}]"))?;
    }
    if heads_q % heads_kv != 0 {
        invalid!(
            "{}={heads_kv} (heads_kv) does not divide q.shape[1]={heads_q} (heads_q)",
            kn(0)
        );
    }
    for (name, m) in [
        ("max_seqlen_q", s.max_seqlen_q),
        ("max_seqlen_kv", s.max_seqlen_kv),
    ] {
        if m >= MAX_SEQLEN {
            invalid!("{name}={m} must be less than {MAX_SEQLEN}");
        }
    }

    let batch = batch_of_cumulative("cu_seqlens_q", &s.cu_seqlens_q)?;
    let cu_q = int_array(
        "cu_seqlens_q",
        &s.cu_seqlens_q,
        device,
        &[(batch + 1, "batch + 1")],
    )?;
    let cu_kv = int_array(
        "cu_seqlens_kv",
        &s.cu_seqlens_kv,
        device,
        &[(batch + 1, "cu_seqlens_q.shape[0]")],
    )?;
    let used = s
        .seqused_kv
        .as_ref()
        .map(|u| int_array("seqused_kv", u, device, &[(batch, "batch")]))
        .transpose()?;
    let table = match &s.block_table {
        Some(t) => {
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
                &[(batch, "batch"), (cols, "max_pages")],
            )?;
            Some((table, page_shift("k", k.shape()[1])?))
        }
        None => None,
    };

    if device == Device::Cpu || s.checked {
        let lens_q = check_cumulative(
            "cu_seqlens_q",
            &fetch(&cu_q)?,
            total_q,
            "q",
            s.max_seqlen_q,
            "max_seqlen_q",
        )?;
        debug_assert_eq!(lens_q.len(), batch);
        let kv_rows = if paged { usize::MAX } else { k.shape()[0] };
        let mut lens_kv = check_cumulative(
            "cu_seqlens_kv",
            &fetch(&cu_kv)?,
            kv_rows,
            "k",
            s.max_seqlen_kv,
            "max_seqlen_kv",
        )?;
        if let Some(u) = &used {
            let used = fetch(u)?;
            check_lengths(
                "seqused_kv",
                &used,
                |b| lens_kv[b],
                "that sequence's keys (cu_seqlens_kv)",
            )?;
            lens_kv = used.iter().map(|&n| n as usize).collect();
        }
        if let Some((t, shift)) = &table {
            check_block_table(
                &fetch(t)?,
                t.cols,
                &lens_kv,
                1 << shift,
                ("k", k.shape()[0]),
            )?;
        }
    }

    let seqs = Sequences {
        cu_q: Some(cu_q),
        kv: match used {
            Some(u) => KeyLengths::Used { used: u, add: 0 },
            None => KeyLengths::Cumulative(cu_kv),
        },
        alignment: params.causal_alignment,
    };
    let [q_op, k_op, v_op] = match table {
        None => [packed(q, cu_q), packed(k, cu_kv), packed(v, cu_kv)],
        Some((table, shift)) => {
            let page = |t: &TensorView<'_>| {
                let mut o = crate::problem::operand(t.as_ptr(), t.dtype(), t.layout());
                o.rows = RowMap::Paged {
                    table,
                    shift,
                    pages: t.shape()[0],
                };
                o
            };
            [packed(q, cu_q), page(k), page(v)]
        }
    };
    let dims = Dims {
        batch,
        seqlen_q: s.max_seqlen_q,
        seqlen_kv: s.max_seqlen_kv,
        heads_q,
        heads_kv,
        head_dim,
        head_dim_v,
    };
    assemble(device, dims, [q_op, k_op, v_op], seqs, params)
}

/// Checks an output `[rows, heads, dim]` of a varlen call.
fn check_rows_heads_dim(
    name: &str,
    t: &TensorView<'_>,
    device: Device,
    want: [(usize, &str); 3],
) -> Result<()> {
    check_device(name, t.device(), device)?;
    check_3d(name, t.layout(), "[rows, heads, dim]")?;
    for (d, (size, what)) in want.iter().enumerate() {
        check_dim(name, t.layout(), d, *size, what)?;
    }
    check_float(name, t.dtype())
}

/// Checks every argument of a varlen forward call.
#[allow(clippy::too_many_arguments)]
pub(crate) fn validate_varlen_forward(
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    out: &TensorViewMut<'_>,
    lse: Option<&TensorViewMut<'_>>,
    s: &Varlen<'_>,
    params: &AttentionParams<'_>,
    fetch: Fetch<'_>,
) -> Result<Problem> {
    let mut p = varlen_inputs(q, k, v, s, params, fetch)?;
    let total_q = q.shape()[0];
    let o = out.as_view();
    check_rows_heads_dim(
        "out",
        &o,
        p.device,
        [
            (total_q, "q.shape[0] (total_q)"),
            (p.heads_q, "q.shape[1] (heads_q)"),
            (p.head_dim_v, "head_dim_v"),
        ],
    )?;
    check_no_self_overlap("out", out.layout())?;
    let mut outputs: Ranges<'_> = vec![("out", range_of("out", &o).1)];
    let RowMap::Packed { cu, .. } = p.q.rows else {
        unreachable!("varlen queries are packed")
    };
    p.out = packed(&o, cu);
    if let Some(l) = lse {
        let lv = l.as_view();
        check_lse(&lv, p.device, p.heads_q, total_q)?;
        check_no_self_overlap("lse", l.layout())?;
        outputs.push(("lse", range_of("lse", &lv).1));
        p.lse = Some(packed_lse(&lv, cu));
    }
    let mut inputs = input_ranges(q, k, v, params);
    inputs.extend(metadata_ranges(s));
    check_no_alias(&outputs, &inputs)?;
    Ok(p)
}

/// Byte ranges of the int32 metadata: kernels read offsets and page numbers while outputs are
/// written, so an output over them would change the rows being written (found by fuzzing: out
/// over cu_seqlens_q sent later sequences' rows past the end of out).
fn metadata_ranges<'n>(s: &Varlen<'_>) -> Ranges<'n> {
    let range = |t: &TensorView<'_>| byte_range(t.as_ptr(), t.dtype(), t.layout());
    let mut r = vec![
        ("cu_seqlens_q", range(&s.cu_seqlens_q)),
        ("cu_seqlens_kv", range(&s.cu_seqlens_kv)),
    ];
    if let Some(u) = &s.seqused_kv {
        r.push(("seqused_kv", range(u)));
    }
    if let Some(t) = &s.block_table {
        r.push(("block_table", range(t)));
    }
    r
}

fn check_lse(t: &TensorView<'_>, device: Device, heads_q: usize, total_q: usize) -> Result<()> {
    check_device("lse", t.device(), device)?;
    if t.ndim() != 2 {
        invalid!(
            "lse must have 2 dimensions [heads_q, total_q], got {} (shape {:?})",
            t.ndim(),
            t.shape()
        );
    }
    check_dim("lse", t.layout(), 0, heads_q, "q.shape[1] (heads_q)")?;
    check_dim("lse", t.layout(), 1, total_q, "q.shape[0] (total_q)")?;
    check_f32("lse", t.dtype())
}

/// Checks every argument of a varlen backward call.
pub(crate) fn validate_varlen_backward(
    a: &BackwardArgs<'_, '_>,
    s: &Varlen<'_>,
    params: &AttentionParams<'_>,
    fetch: Fetch<'_>,
) -> Result<BackwardProblem> {
    if s.block_table.is_some() {
        return Err(crate::Error::unsupported(
            "the backward of attention over a paged KV cache (block_table) is not implemented; \
             pass packed k and v",
        ));
    }
    if s.seqused_kv.is_some() {
        // Keys past seqused_kv would need zero gradients written; training packs exact lengths.
        return Err(crate::Error::unsupported(
            "seqused_kv is forward only: the backward takes each sequence's keys from \
             cu_seqlens_kv",
        ));
    }
    let mut p = varlen_inputs(a.q, a.k, a.v, s, params, fetch)?;
    let (total_q, total_kv) = (a.q.shape()[0], a.k.shape()[0]);
    let q_dims = |dim: usize, what| {
        [
            (total_q, "q.shape[0] (total_q)"),
            (p.heads_q, "q.shape[1] (heads_q)"),
            (dim, what),
        ]
    };
    let kv_dims = |dim: usize, what| {
        [
            (total_kv, "k.shape[0] (total_kv)"),
            (p.heads_kv, "k.shape[1] (heads_kv)"),
            (dim, what),
        ]
    };
    for (name, t) in [("out", a.out), ("dout", a.dout)] {
        check_rows_heads_dim(name, t, p.device, q_dims(p.head_dim_v, "head_dim_v"))?;
    }
    check_lse(a.lse, p.device, p.heads_q, total_q)?;
    let grads = [
        ("dq", a.dq, q_dims(p.head_dim, "head_dim")),
        ("dk", a.dk, kv_dims(p.head_dim, "head_dim")),
        ("dv", a.dv, kv_dims(p.head_dim_v, "head_dim_v")),
    ];
    let mut outputs: Ranges<'_> = Vec::new();
    for (name, t, want) in &grads {
        check_rows_heads_dim(name, &t.as_view(), p.device, *want)?;
        check_no_self_overlap(name, t.layout())?;
        outputs.push((name, range_of(name, &t.as_view()).1));
    }
    let mut inputs = input_ranges(a.q, a.k, a.v, params);
    inputs.push(("out", range_of("out", a.out).1));
    inputs.push(("dout", range_of("dout", a.dout).1));
    inputs.push(("lse", range_of("lse", a.lse).1));
    inputs.extend(metadata_ranges(s));
    check_no_alias(&outputs, &inputs)?;
    let (RowMap::Packed { cu: cu_q, .. }, RowMap::Packed { cu: cu_kv, .. }) = (p.q.rows, p.k.rows)
    else {
        unreachable!("varlen tensors are packed")
    };
    p.out = packed(a.out, cu_q);
    p.lse = Some(packed_lse(a.lse, cu_q));
    Ok(BackwardProblem {
        fwd: p,
        dout: packed(a.dout, cu_q),
        dq: packed(&a.dq.as_view(), cu_q),
        dk: packed(&a.dk.as_view(), cu_kv),
        dv: packed(&a.dv.as_view(), cu_kv),
        deterministic: params.deterministic,
    })
}
