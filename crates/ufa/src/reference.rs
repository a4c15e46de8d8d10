//! A plain f64 implementation of ufa's semantics: the ground truth for tests and `ufa check`.
//!
//! It is written straight from the definitions in [`AttentionParams`] (element by element, one
//! query row at a time, the full score row in memory) and shares no masking code with the
//! backends, so a mistake in a kernel's band or broadcast logic shows up as a mismatch.

use crate::dtype::load_f64;
use crate::error::{invalid, Result};
use crate::params::{AttentionParams, CausalAlignment};
use crate::problem::validate_inputs;
use crate::tensor::TensorView;
use crate::Device;

/// Output of [`reference_forward`], contiguous f64.
#[derive(Clone, Debug)]
pub struct ReferenceOutput {
    /// [batch, seqlen_q, heads_q, head_dim_v]
    pub out: Vec<f64>,
    /// [batch, heads_q, seqlen_q]; -inf for rows with no visible key.
    pub lse: Vec<f64>,
}

unsafe fn read(t: &TensorView<'_>, idx: &[usize]) -> f64 {
    let off: usize = idx.iter().zip(t.strides()).map(|(i, s)| i * s).sum();
    load_f64(t.dtype(), t.as_ptr().add(off * t.dtype().size_in_bytes()))
}

/// Index of mask element [b, h, i, j] under NumPy broadcasting (dims aligned on the right).
fn mask_index(mask: &TensorView<'_>, full: [usize; 4]) -> Vec<usize> {
    let pad = 4 - mask.ndim();
    (0..mask.ndim())
        .map(|d| {
            if mask.shape()[d] == 1 {
                0
            } else {
                full[pad + d]
            }
        })
        .collect()
}

/// Computes attention in f64. Inputs are validated exactly as for the backends.
pub fn reference_forward(
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    params: &AttentionParams<'_>,
) -> Result<ReferenceOutput> {
    let p = validate_inputs(q, k, v, params)?;
    if p.device != Device::Cpu {
        invalid!(
            "the reference runs on host memory, but q is on {}",
            p.device
        );
    }
    let (b_n, sq, skv, hq, hkv, d, dv) = (
        p.batch,
        p.seqlen_q,
        p.seqlen_kv,
        p.heads_q,
        p.heads_kv,
        p.head_dim,
        p.head_dim_v,
    );
    let scale = params
        .softmax_scale
        .map_or(1.0 / (d as f64).sqrt(), |s| s as f64);
    let softcap = params.softcap as f64;
    let offset = match params.causal_alignment {
        CausalAlignment::BottomRight => skv as i64 - sq as i64,
        CausalAlignment::TopLeft => 0,
    };
    let mut out = vec![0.0; b_n * sq * hq * dv];
    let mut lse = vec![f64::NEG_INFINITY; b_n * hq * sq];
    let mut scores = vec![f64::NEG_INFINITY; skv];
    for b in 0..b_n {
        for h in 0..hq {
            let hk = h / (hq / hkv);
            let slope = params.alibi_slopes.as_ref().map(|a| unsafe {
                if a.ndim() == 1 {
                    read(a, &[h])
                } else {
                    read(a, &[b, h])
                }
            });
            for i in 0..sq {
                let c = i as i64 + offset; // the key this query is aligned with
                for (j, s) in scores.iter_mut().enumerate() {
                    let jj = j as i64;
                    let mut visible = true;
                    if params.causal && jj > c {
                        visible = false;
                    }
                    if params.window_left >= 0 && jj < c - params.window_left {
                        visible = false;
                    }
                    if params.window_right >= 0 && jj > c + params.window_right {
                        visible = false;
                    }
                    let mut bias = 0.0;
                    if let Some(m) = &params.mask {
                        let mv = unsafe { read(m, &mask_index(m, [b, h, i, j])) };
                        if m.dtype().is_float() {
                            bias = mv;
                        } else if mv == 0.0 {
                            visible = false;
                        }
                    }
                    if !visible {
                        *s = f64::NEG_INFINITY;
                        continue;
                    }
                    let mut dot = 0.0;
                    for e in 0..d {
                        dot += unsafe { read(q, &[b, i, h, e]) * read(k, &[b, j, hk, e]) };
                    }
                    let mut x = scale * dot;
                    if softcap > 0.0 {
                        x = softcap * (x / softcap).tanh();
                    }
                    if let Some(sl) = slope {
                        x -= sl * (c - jj).abs() as f64;
                    }
                    *s = x + bias;
                }
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue; // no visible key: zeros and -inf
                }
                let mut l = 0.0;
                let o = &mut out[((b * sq + i) * hq + h) * dv..][..dv];
                for (j, &s) in scores.iter().enumerate() {
                    let w = (s - m).exp();
                    if w == 0.0 {
                        continue;
                    }
                    l += w;
                    for (e, oe) in o.iter_mut().enumerate() {
                        *oe += w * unsafe { read(v, &[b, j, hk, e]) };
                    }
                }
                o.iter_mut().for_each(|x| *x /= l);
                lse[(b * hq + h) * sq + i] = m + l.ln();
            }
        }
    }
    Ok(ReferenceOutput { out, lse })
}
