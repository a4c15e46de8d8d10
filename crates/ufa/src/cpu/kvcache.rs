//! A KV-cache call's writes on the CPU: new keys and values appended to the cache (keys rotated
//! when rotary tables are given), and q rotated into scratch memory, before the forward pass
//! runs over the cache.

use crate::dtype::{load_f64, load_row_f32, store_row_f32};
use crate::kvcache::{rotate, Append, KvCacheProblem, RotaryOp};
use crate::problem::Operand;

/// Rotates the row at `src` (`len` elements of `src`'s dtype) at position `pos` into `dst`
/// (`dst`'s dtype); columns past the rotary dim are copied. `row` is scratch of `len` floats.
///
/// # Safety
/// `src` and `dst` address `len` elements; `pos` is a row of the validated tables.
unsafe fn rotate_row(
    r: &RotaryOp,
    src: (&Operand, *const u8),
    dst: (&Operand, *mut u8),
    pos: usize,
    row: &mut [f32],
    out: &mut [f32],
) {
    load_row_f32(src.0.dtype, src.1, row);
    out.copy_from_slice(row);
    let half = r.rotary_dim / 2;
    for i in 0..half {
        // Table values are f16/bf16/f32: exact as f32.
        let c = load_f64(r.cos.dtype, r.cos.at([pos, i, 0, 0])) as f32;
        let s = load_f64(r.sin.dtype, r.sin.at([pos, i, 0, 0])) as f32;
        let (ia, ib) = if r.interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (a, b) = (row[ia], row[ib]);
        out[ia] = rotate(a, b, c, s);
        // b·c + a·s, as b·c − (−a)·s (negation is exact).
        out[ib] = rotate(b, -a, c, s);
    }
    store_row_f32(dst.0.dtype, out, dst.1);
}

/// Writes the new keys (rotated) and values into the cache at each sequence's length.
pub(super) fn append(kp: &KvCacheProblem, a: &Append) {
    let p = &kp.attn;
    let (d, dv) = (p.head_dim, p.head_dim_v);
    let (mut row, mut out) = (vec![0f32; d.max(dv)], vec![0f32; d.max(dv)]);
    for b in 0..p.batch {
        // SAFETY: validation read every length of this host array.
        let n = unsafe { a.seqlens.get(b) } as usize;
        for i in 0..a.seqlen_new {
            let pos = n + i;
            for h in 0..p.heads_kv {
                let (src, dst) = (a.k.at([b, i, h, 0]), a.k_cache.at([b, pos, h, 0]));
                // SAFETY: validation bounded every index: the new rows, the cache slot (its page
                // or entry checked) and the rotary position.
                unsafe {
                    match &a.rotary {
                        Some(r) => rotate_row(
                            r,
                            (&a.k, src),
                            (&a.k_cache, dst),
                            pos,
                            &mut row[..d],
                            &mut out[..d],
                        ),
                        None => copy_row(&a.k, src, dst, d),
                    }
                    copy_row(&a.v, a.v.at([b, i, h, 0]), a.v_cache.at([b, pos, h, 0]), dv);
                }
            }
        }
    }
}

/// Copies `len` elements of `x`'s dtype (cache and new rows share it).
///
/// # Safety
/// Both addresses hold `len` elements and do not overlap (validated).
unsafe fn copy_row(x: &Operand, src: *const u8, dst: *mut u8, len: usize) {
    std::ptr::copy_nonoverlapping(src, dst, len * x.dtype.size_in_bytes());
}

/// q rotated at its positions into a new contiguous `[batch, seqlen_q, heads_q, head_dim]`
/// buffer of q's dtype.
pub(super) fn rotate_q(kp: &KvCacheProblem, a: &Append, r: &RotaryOp) -> Vec<u8> {
    let p = &kp.attn;
    let d = p.head_dim;
    let size = p.q.dtype.size_in_bytes();
    let mut buf = vec![0u8; p.batch * p.seqlen_q * p.heads_q * d * size];
    let dst_op = Operand::strided(buf.as_mut_ptr(), p.q.dtype, [0; 4]);
    let (mut row, mut out) = (vec![0f32; d], vec![0f32; d]);
    for b in 0..p.batch {
        // SAFETY: as in `append`.
        let n = unsafe { a.seqlens.get(b) } as usize;
        for i in 0..p.seqlen_q {
            let pos = if r.q_advances { n + i } else { n };
            for h in 0..p.heads_q {
                let at = ((b * p.seqlen_q + i) * p.heads_q + h) * d * size;
                // SAFETY: the row lies inside `buf`; q's row and the position are validated.
                unsafe {
                    let dst = buf.as_mut_ptr().add(at);
                    rotate_row(
                        r,
                        (&p.q, p.q.at([b, i, h, 0])),
                        (&dst_op, dst),
                        pos,
                        &mut row,
                        &mut out,
                    );
                }
            }
        }
    }
    buf
}
