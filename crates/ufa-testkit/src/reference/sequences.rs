//! The f64 reference of packed batches, KV caches and merging, written from their definitions:
//! each sequence's rows are gathered into a dense tensor (with their own index arithmetic, not
//! the library's) and given to the dense reference; the cache after an append is built element
//! by element.

use super::{backward_at, forward_at, read, ReferenceGrads, ReferenceOutput};
use half::{bf16, f16};
use ufa::AttentionParams;
use ufa::AttentionState;
use ufa::DType;
use ufa::Device;
use ufa::Result;
use ufa::TensorView;
use ufa::Varlen;
use ufa::{KvAppend, Rotary};

/// An int32 host array as values.
fn ints(t: &TensorView<'_>) -> Vec<i64> {
    assert_eq!(t.dtype(), DType::I32);
    assert_eq!(t.device(), Device::Cpu);
    let n: usize = t.shape().iter().product();
    let cols = if t.ndim() == 2 { t.shape()[1] } else { 1 };
    (0..n)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            let off = r * t.strides()[0] + if t.ndim() == 2 { c * t.strides()[1] } else { 0 };
            // SAFETY: within the view (the caller's host array).
            unsafe { *(t.as_ptr() as *const i32).add(off) as i64 }
        })
        .collect()
}

/// A dense `[1, rows, heads, dim]` copy of some rows of a tensor, in its dtype.
struct Dense {
    bytes: Vec<u8>,
    dtype: DType,
    shape: [usize; 4],
}

impl Dense {
    /// Rows `row(j)` for `j < n` of `t`, where `row(j)` is the index of row j's first element
    /// in `t`'s dims before the last two (heads and dim).
    fn gather(t: &TensorView<'_>, n: usize, row: impl Fn(usize) -> Vec<usize>) -> Dense {
        let nd = t.ndim();
        let (h, d) = (t.shape()[nd - 2], t.shape()[nd - 1]);
        let size = t.dtype().size_in_bytes();
        let mut bytes = Vec::with_capacity(n * h * d * size);
        for j in 0..n {
            let lead = row(j);
            for hh in 0..h {
                for e in 0..d {
                    let mut idx = lead.clone();
                    idx.extend([hh, e]);
                    let off: usize = idx.iter().zip(t.strides()).map(|(i, s)| i * s).sum();
                    // SAFETY: within the caller's view.
                    let src = unsafe { t.as_ptr().add(off * size) };
                    bytes.extend_from_slice(unsafe { std::slice::from_raw_parts(src, size) });
                }
            }
        }
        Dense {
            bytes,
            dtype: t.dtype(),
            shape: [1, n, h, d],
        }
    }

    fn view(&self) -> TensorView<'_> {
        let [_, n, h, d] = self.shape;
        // SAFETY: the buffer holds exactly this contiguous tensor.
        unsafe {
            TensorView::from_raw_parts(
                self.bytes.as_ptr() as *const std::ffi::c_void,
                self.dtype,
                Device::Cpu,
                &self.shape,
                &[n * h * d, h * d, d, 1],
            )
        }
        .expect("a valid contiguous layout")
    }
}

/// The parameters of one sequence: its row of batch-indexed ALiBi slopes, and its corner of a
/// mask broadcast to `[batch, heads, max_seqlen_q, max_seqlen_kv]`.
fn params_of_sequence<'a>(
    params: &AttentionParams<'a>,
    b: usize,
    sq: usize,
    skv: usize,
) -> Result<AttentionParams<'a>> {
    let mut p = *params;
    let sub = |t: &TensorView<'a>, fixed: &[(usize, usize, usize)]| -> Result<TensorView<'a>> {
        // fixed: (dim, start, new size) per sliced dimension
        let (mut shape, strides) = (t.shape().to_vec(), t.strides().to_vec());
        let mut off = 0;
        for &(d, start, size) in fixed {
            off += start * strides[d];
            shape[d] = size;
        }
        let size = t.dtype().size_in_bytes();
        // SAFETY: a sub-range of the caller's view.
        unsafe {
            TensorView::from_raw_parts(
                t.as_ptr().add(off * size) as *const std::ffi::c_void,
                t.dtype(),
                t.device(),
                &shape,
                &strides,
            )
        }
    };
    if let Some(a) = &params.alibi_slopes {
        if a.ndim() == 2 {
            let row = sub(a, &[(0, b, 1)])?;
            let h = row.shape()[1];
            // SAFETY: the same memory seen as [heads].
            p.alibi_slopes = Some(unsafe {
                TensorView::from_raw_parts(
                    row.as_ptr() as *const std::ffi::c_void,
                    DType::F32,
                    row.device(),
                    &[h],
                    &[row.strides()[1]],
                )?
            });
        }
    }
    if let Some(m) = &params.mask {
        let pad = 4 - m.ndim();
        let mut fixed = Vec::new();
        for (full_dim, (start, n)) in [(0, (b, 1)), (2, (0, sq)), (3, (0, skv))] {
            if full_dim >= pad && m.shape()[full_dim - pad] != 1 {
                fixed.push((full_dim - pad, start, n));
            }
        }
        p.mask = Some(sub(m, &fixed)?);
    }
    Ok(p)
}

/// The reference of one sequence: out `[sq, heads, dv]` and LSE `[heads, sq]` (zeros and −inf
/// for a sequence without keys).
fn sequence(
    q: &Dense,
    k: &Dense,
    v: &Dense,
    heads_q: usize,
    dv: usize,
    params: &AttentionParams<'_>,
    bh0: usize,
) -> Result<ReferenceOutput> {
    let sq = q.shape[1];
    if k.shape[1] == 0 {
        return Ok(ReferenceOutput {
            out: vec![0.0; sq * heads_q * dv],
            lse: vec![f64::NEG_INFINITY; heads_q * sq],
        });
    }
    forward_at(&q.view(), &k.view(), &v.view(), params, bh0)
}

/// Attention of a packed batch (see [`Varlen`]) in f64: out `[total_q, heads_q, head_dim_v]`
/// and LSE `[heads_q, total_q]` (rows outside every sequence: 0 and −inf).
pub fn reference_varlen(
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    seqs: &Varlen<'_>,
    params: &AttentionParams<'_>,
) -> Result<ReferenceOutput> {
    let (cu_q, cu_kv) = (ints(&seqs.cu_seqlens_q), ints(&seqs.cu_seqlens_kv));
    let used = seqs.seqused_kv.as_ref().map(ints);
    let table = seqs.block_table.as_ref().map(|t| (ints(t), t.shape()[1]));
    let (total_q, heads_q, dv) = (q.shape()[0], q.shape()[1], v.shape()[v.ndim() - 1]);
    let mut r = ReferenceOutput {
        out: vec![0.0; total_q * heads_q * dv],
        lse: vec![f64::NEG_INFINITY; heads_q * total_q],
    };
    for b in 0..cu_q.len() - 1 {
        let (q0, sq) = (cu_q[b] as usize, (cu_q[b + 1] - cu_q[b]) as usize);
        let skv = match &used {
            Some(u) => u[b] as usize,
            None => (cu_kv[b + 1] - cu_kv[b]) as usize,
        };
        if sq == 0 {
            continue;
        }
        let key_row = |j: usize| match &table {
            Some((t, cols)) => {
                let ps = k.shape()[1];
                vec![t[b * cols + j / ps] as usize, j % ps]
            }
            None => vec![cu_kv[b] as usize + j],
        };
        let qs = Dense::gather(q, sq, |i| vec![q0 + i]);
        let (ks, vs) = (
            Dense::gather(k, skv, key_row),
            Dense::gather(v, skv, key_row),
        );
        let p = params_of_sequence(params, b, sq, skv)?;
        // Sequence b draws its dropout as batch entry b: (b · heads_q + h, row, key).
        let o = sequence(&qs, &ks, &vs, heads_q, dv, &p, b * heads_q)?;
        r.out[q0 * heads_q * dv..][..sq * heads_q * dv].copy_from_slice(&o.out);
        for h in 0..heads_q {
            r.lse[h * total_q + q0..][..sq].copy_from_slice(&o.lse[h * sq..][..sq]);
        }
    }
    Ok(r)
}

/// Gradients of a packed batch in f64, packed like q, k and v: exact, or with `flash` (the
/// stored output, and the 16-bit type P and dS are rounded to) a flash pass's roundings (see
/// [`super::reference_backward`] and [`super::reference_backward_rounded`]). Keys must be
/// packed (no block table).
pub fn reference_varlen_backward(
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    dout: &TensorView<'_>,
    flash: Option<(&TensorView<'_>, Option<DType>)>,
    seqs: &Varlen<'_>,
    params: &AttentionParams<'_>,
) -> Result<ReferenceGrads> {
    if seqs.block_table.is_some() || seqs.seqused_kv.is_some() {
        return Err(ufa::Error::invalid(
            "the reference backward takes packed keys without seqused_kv",
        ));
    }
    let (cu_q, cu_kv) = (ints(&seqs.cu_seqlens_q), ints(&seqs.cu_seqlens_kv));
    let (total_q, hq, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let (total_kv, hkv, dv) = (k.shape()[0], k.shape()[1], v.shape()[2]);
    let mut g = ReferenceGrads {
        dq: vec![0.0; total_q * hq * d],
        dk: vec![0.0; total_kv * hkv * d],
        dv: vec![0.0; total_kv * hkv * dv],
    };
    for b in 0..cu_q.len() - 1 {
        let (q0, sq) = (cu_q[b] as usize, (cu_q[b + 1] - cu_q[b]) as usize);
        let (k0, skv) = (cu_kv[b] as usize, (cu_kv[b + 1] - cu_kv[b]) as usize);
        if sq == 0 || skv == 0 {
            continue; // no pair of rows: zero gradients
        }
        let qrows = |i: usize| vec![q0 + i];
        let krows = |j: usize| vec![k0 + j];
        let (qs, ks, vs) = (
            Dense::gather(q, sq, qrows),
            Dense::gather(k, skv, krows),
            Dense::gather(v, skv, krows),
        );
        let dos = Dense::gather(dout, sq, qrows);
        let outs = flash.map(|(o, _)| Dense::gather(o, sq, qrows));
        let out_views = outs.as_ref().map(|o| o.view());
        let p = params_of_sequence(params, b, sq, skv)?;
        let s = backward_at(
            &qs.view(),
            &ks.view(),
            &vs.view(),
            &dos.view(),
            out_views.as_ref().map(|o| (o, flash.and_then(|f| f.1))),
            &p,
            b * hq,
        )?;
        g.dq[q0 * hq * d..][..s.dq.len()].copy_from_slice(&s.dq);
        g.dk[k0 * hkv * d..][..s.dk.len()].copy_from_slice(&s.dk);
        g.dv[k0 * hkv * dv..][..s.dv.len()].copy_from_slice(&s.dv);
    }
    Ok(g)
}

/// What [`reference_kvcache`] computes: the attention, and the whole cache after the append,
/// element by element in logical order `[outer, row, head, dim]` (exactly: every f16, bf16 and
/// f32 value is an f64).
#[derive(Clone, Debug)]
pub struct ReferenceKvCache {
    pub attention: ReferenceOutput,
    pub k_cache: Vec<f64>,
    pub v_cache: Vec<f64>,
}

/// Rounds an f32 to `dtype` (nearest even), as a value.
fn round_to(dtype: DType, x: f32) -> f64 {
    match dtype {
        DType::F16 => f16::from_f32(x).to_f64(),
        DType::BF16 => bf16::from_f32(x).to_f64(),
        _ => x as f64,
    }
}

/// One row rotated at `pos` by the definition in [`Rotary`]: pairs `(a, b)` become
/// `(a·cos − b·sin, b·cos + a·sin)` in f64, rounded to f32, then to `dtype`.
fn rotate_row(row: &[f64], r: &Rotary<'_>, pos: usize, dtype: DType) -> Vec<f64> {
    let half = r.cos.shape()[1];
    let mut out: Vec<f64> = row.iter().map(|&x| round_to(dtype, x as f32)).collect();
    for i in 0..half {
        // SAFETY: positions are checked against the tables by the caller.
        let (c, s) = unsafe { (read(&r.cos, &[pos, i]), read(&r.sin, &[pos, i])) };
        let (ia, ib) = if r.interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (a, b) = (row[ia], row[ib]);
        out[ia] = round_to(dtype, (a * c - b * s) as f32);
        out[ib] = round_to(dtype, (b * c + a * s) as f32);
    }
    out
}

/// Logical contents of a 4-d tensor.
fn values4(t: &TensorView<'_>) -> Vec<f64> {
    let s = t.shape();
    let mut v = Vec::with_capacity(s.iter().product());
    for a in 0..s[0] {
        for b in 0..s[1] {
            for c in 0..s[2] {
                for d in 0..s[3] {
                    // SAFETY: within the view.
                    v.push(unsafe { read(t, &[a, b, c, d]) });
                }
            }
        }
    }
    v
}

/// A KV-cache call in f64 (see [`ufa::KvCache`]): the cache after appending `append`
/// (rotated), then attention of q (rotated and rounded to its dtype, as the call does) over
/// each sequence's keys. `k_cache`/`v_cache` are the cache before the call.
#[allow(clippy::too_many_arguments)]
pub fn reference_kvcache(
    q: &TensorView<'_>,
    k_cache: &TensorView<'_>,
    v_cache: &TensorView<'_>,
    cache_seqlens: &TensorView<'_>,
    block_table: Option<&TensorView<'_>>,
    batch_idx: Option<&TensorView<'_>>,
    append: Option<&KvAppend<'_>>,
    params: &AttentionParams<'_>,
) -> Result<ReferenceKvCache> {
    let lens = ints(cache_seqlens);
    let table = block_table.map(|t| (ints(t), t.shape()[1]));
    let idx = batch_idx.map(ints);
    let [batch, sq, hq, d] = [0, 1, 2, 3].map(|i| q.shape()[i]);
    let [_, rows, hkv, _] = [0, 1, 2, 3].map(|i| k_cache.shape()[i]);
    let dv = v_cache.shape()[3];
    let dtype = q.dtype();
    let (mut kc, mut vc) = (values4(k_cache), values4(v_cache));
    // Logical index of (sequence b, key j) in the cache: (outer, row).
    let slot = |b: usize, j: usize| -> (usize, usize) {
        match (&table, &idx) {
            (Some((t, cols)), _) => (t[b * cols + j / rows] as usize, j % rows),
            (None, Some(ix)) => (ix[b] as usize, j),
            (None, None) => (b, j),
        }
    };
    let new = append.map_or(0, |a| a.k.shape()[1]);
    if let Some(a) = append {
        for (b, &len) in lens.iter().enumerate() {
            for i in 0..new {
                let pos = len as usize + i;
                let (outer, row) = slot(b, pos);
                for h in 0..hkv {
                    // SAFETY: within the views.
                    let krow: Vec<f64> = (0..d)
                        .map(|e| unsafe { read(&a.k, &[b, i, h, e]) })
                        .collect();
                    let krow = match &a.rotary {
                        Some(r) => rotate_row(&krow, r, pos, dtype),
                        None => krow,
                    };
                    let at = ((outer * rows + row) * hkv + h) * d;
                    kc[at..at + d].copy_from_slice(&krow);
                    let at = ((outer * rows + row) * hkv + h) * dv;
                    for e in 0..dv {
                        vc[at + e] = unsafe { read(&a.v, &[b, i, h, e]) };
                    }
                }
            }
        }
    }
    // q as the call attends with it (rotated, rounded to its dtype).
    let rot = append.and_then(|a| a.rotary.as_ref());
    let advances = params.causal || params.window_left >= 0 || params.window_right >= 0;
    let mut out = ReferenceOutput {
        out: vec![0.0; batch * sq * hq * dv],
        lse: vec![f64::NEG_INFINITY; batch * hq * sq],
    };
    let to_dense = |vals: Vec<f64>, n: usize, h: usize, dd: usize| -> Dense {
        let bytes = match dtype {
            DType::F32 => vals
                .iter()
                .flat_map(|&x| (x as f32).to_ne_bytes())
                .collect(),
            DType::F16 => vals
                .iter()
                .flat_map(|&x| f16::from_f64(x).to_ne_bytes())
                .collect(),
            _ => vals
                .iter()
                .flat_map(|&x| bf16::from_f64(x).to_ne_bytes())
                .collect(),
        };
        Dense {
            bytes,
            dtype,
            shape: [1, n, h, dd],
        }
    };
    for (b, &len) in lens.iter().enumerate() {
        let skv = len as usize + new;
        let mut qv = Vec::with_capacity(sq * hq * d);
        for i in 0..sq {
            let pos = len as usize + if advances { i } else { 0 };
            for h in 0..hq {
                let row: Vec<f64> = (0..d).map(|e| unsafe { read(q, &[b, i, h, e]) }).collect();
                qv.extend(match rot {
                    Some(r) => rotate_row(&row, r, pos, dtype),
                    None => row,
                });
            }
        }
        let (mut kv, mut vv) = (Vec::new(), Vec::new());
        for j in 0..skv {
            let (outer, row) = slot(b, j);
            kv.extend_from_slice(&kc[((outer * rows + row) * hkv) * d..][..hkv * d]);
            vv.extend_from_slice(&vc[((outer * rows + row) * hkv) * dv..][..hkv * dv]);
        }
        let (qs, ks, vs) = (
            to_dense(qv, sq, hq, d),
            to_dense(kv, skv, hkv, d),
            to_dense(vv, skv, hkv, dv),
        );
        let p = params_of_sequence(params, b, sq, skv)?;
        let o = sequence(&qs, &ks, &vs, hq, dv, &p, b * hq)?;
        out.out[b * sq * hq * dv..][..o.out.len()].copy_from_slice(&o.out);
        out.lse[b * hq * sq..][..o.lse.len()].copy_from_slice(&o.lse);
    }
    Ok(ReferenceKvCache {
        attention: out,
        k_cache: kc,
        v_cache: vc,
    })
}

/// Merged states in f64 (see [`ufa::AttentionState`]): out `[batch, seqlen, heads, dim]`,
/// LSE `[batch, heads, seqlen]`.
pub fn reference_merge(states: &[AttentionState<'_>]) -> ReferenceOutput {
    let s = states[0].out.shape();
    let (batch, seqlen, heads, dim) = (s[0], s[1], s[2], s[3]);
    let mut r = ReferenceOutput {
        out: vec![0.0; batch * seqlen * heads * dim],
        lse: vec![f64::NEG_INFINITY; batch * heads * seqlen],
    };
    for b in 0..batch {
        for i in 0..seqlen {
            for h in 0..heads {
                // SAFETY: within the views.
                let lses: Vec<f64> = states
                    .iter()
                    .map(|st| unsafe { read(&st.lse, &[b, h, i]) })
                    .collect();
                let m = lses.iter().cloned().fold(f64::NEG_INFINITY, |a, x| {
                    if a.is_nan() || x.is_nan() {
                        f64::NAN
                    } else {
                        a.max(x)
                    }
                });
                let o = &mut r.out[((b * seqlen + i) * heads + h) * dim..][..dim];
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let mut sum = 0.0;
                for (st, &l) in states.iter().zip(&lses) {
                    if l == f64::NEG_INFINITY {
                        continue;
                    }
                    let w = (l - m).exp();
                    sum += w;
                    for (e, oe) in o.iter_mut().enumerate() {
                        *oe += w * unsafe { read(&st.out, &[b, i, h, e]) };
                    }
                }
                o.iter_mut().for_each(|x| *x /= sum);
                r.lse[(b * heads + h) * seqlen + i] = m + sum.ln();
            }
        }
    }
    r
}
