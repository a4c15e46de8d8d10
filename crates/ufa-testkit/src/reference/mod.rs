//! A plain f64 implementation of ufa's semantics: the ground truth for tests and `ufa check`.
//!
//! It is written straight from the definitions in [`AttentionParams`] (element by element, one
//! query row at a time, the full score row in memory) and shares no masking code with the
//! backends, so a mistake in a kernel's band or broadcast logic shows up as a mismatch.

use ufa::internals::load_f64;
use ufa::internals::validate_forward_inputs;
use ufa::DType;
use ufa::Device;
use ufa::Result;
use ufa::TensorView;
use ufa::{AttentionParams, CausalAlignment};

mod sequences;
pub use sequences::{
    reference_kvcache, reference_merge, reference_varlen, reference_varlen_backward,
    ReferenceKvCache,
};

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

/// The parameters as the reference uses them, and the score row of one query.
struct RefScores<'x, 'a> {
    q: &'x TensorView<'a>,
    k: &'x TensorView<'a>,
    params: &'x AttentionParams<'a>,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    scale: f64,
    offset: i64,
}

impl RefScores<'_, '_> {
    /// Scores of query `i` (batch `b`, head `h`) against every key (-inf where not visible), and
    /// d(score)/d(scale·q·k) (the softcap's slope; 1 without softcap).
    fn row(&self, b: usize, h: usize, i: usize, scores: &mut [f64], slope_of_cap: &mut [f64]) {
        self.row_masked(b, h, i, scores, slope_of_cap, None);
    }

    /// [`Self::row`], and in `by_caller` which keys the caller masked: outside the band, false
    /// in a boolean mask, or -inf in an additive mask (other -inf scores come from the data).
    fn row_masked(
        &self,
        b: usize,
        h: usize,
        i: usize,
        scores: &mut [f64],
        slope_of_cap: &mut [f64],
        mut by_caller: Option<&mut [bool]>,
    ) {
        let params = self.params;
        let hk = h / (self.heads_q / self.heads_kv);
        let alibi = params.alibi_slopes.as_ref().map(|a| unsafe {
            if a.ndim() == 1 {
                read(a, &[h])
            } else {
                read(a, &[b, h])
            }
        });
        let softcap = params.softcap as f64;
        let c = i as i64 + self.offset; // the key this query is aligned with
        for (j, s) in scores.iter_mut().enumerate() {
            let jj = j as i64;
            slope_of_cap[j] = 1.0;
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
            if let Some(m) = by_caller.as_deref_mut() {
                m[j] = !visible || bias == f64::NEG_INFINITY;
            }
            if !visible {
                *s = f64::NEG_INFINITY;
                continue;
            }
            let mut dot = 0.0;
            for e in 0..self.head_dim {
                dot += unsafe { read(self.q, &[b, i, h, e]) * read(self.k, &[b, j, hk, e]) };
            }
            let mut x = self.scale * dot;
            if softcap > 0.0 {
                let t = (x / softcap).tanh();
                x = softcap * t;
                slope_of_cap[j] = 1.0 - t * t;
            }
            if let Some(sl) = alibi {
                x -= sl * (c - jj).abs() as f64;
            }
            *s = x + bias;
        }
    }
}

/// A validated call's dimensions, read from its tensors: (batch, seqlen_q, seqlen_kv, heads_q,
/// heads_kv, head_dim, head_dim_v).
type Dims = (usize, usize, usize, usize, usize, usize, usize);

/// Validates the inputs (as the library does) and prepares the score computation.
fn ref_setup<'x, 'a>(
    q: &'x TensorView<'a>,
    k: &'x TensorView<'a>,
    v: &TensorView<'_>,
    params: &'x AttentionParams<'a>,
) -> Result<(Dims, RefScores<'x, 'a>)> {
    validate_forward_inputs(q, k, v, params)?;
    if q.device() != Device::Cpu {
        return Err(ufa::Error::invalid(format!(
            "the reference runs on host memory, but q is on {}",
            q.device()
        )));
    }
    let ([b, sq, hq, d], [skv, hkv], dv) = (
        [0, 1, 2, 3].map(|i| q.shape()[i]),
        [1, 2].map(|i| k.shape()[i]),
        v.shape()[3],
    );
    let scores = RefScores {
        q,
        k,
        params,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        scale: params
            .softmax_scale
            .map_or(1.0 / (d as f64).sqrt(), |s| s as f64),
        offset: match params.causal_alignment {
            CausalAlignment::BottomRight => skv as i64 - sq as i64,
            CausalAlignment::TopLeft => 0,
        },
    };
    Ok(((b, sq, skv, hq, hkv, d, dv), scores))
}

/// Multiplies row `i` of head `bh` (= b · heads_q + h) by its dropout factors (0, or
/// 1 / (1 - p) for the kept probabilities), as every backend draws them.
fn dropout_row(params: &AttentionParams<'_>, bh: usize, i: usize, row: &mut [f64]) {
    if let Some(d) = params.dropout {
        for (j, x) in row.iter_mut().enumerate() {
            *x *= d.scale(bh, i, j);
        }
    }
}

/// Turns a score row into probabilities in place; returns the log-sum-exp.
///
/// A key whose score is -inf is masked (by the causal/window band, a boolean mask, or an
/// additive mask or bias of -inf): its probability is 0 and it takes no part in the result.
/// A row whose keys are all masked gets probabilities 0 and LSE -inf. Any NaN among the other
/// scores, or a score of +inf, makes every unmasked probability and the LSE NaN: non-finite
/// inputs are never hidden.
fn softmax_row(scores: &mut [f64]) -> f64 {
    let m = scores.iter().fold(f64::NEG_INFINITY, |a, &s| {
        if a.is_nan() || s.is_nan() {
            f64::NAN
        } else {
            a.max(s)
        }
    });
    if m == f64::NEG_INFINITY {
        scores.iter_mut().for_each(|s| *s = 0.0);
        return f64::NEG_INFINITY;
    }
    let l: f64 = scores.iter().map(|s| (s - m).exp()).sum();
    let lse = m + l.ln();
    for s in scores.iter_mut() {
        *s = if *s == f64::NEG_INFINITY {
            0.0
        } else {
            (*s - lse).exp()
        };
    }
    lse
}

/// Which keys of a score row are masked (score -inf; see [`softmax_row`]).
fn masked_keys(scores: &[f64], masked: &mut [bool]) {
    for (m, &s) in masked.iter_mut().zip(scores) {
        *m = s == f64::NEG_INFINITY;
    }
}

/// Computes attention in f64. Inputs are validated exactly as for the backends.
pub fn reference_forward(
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    params: &AttentionParams<'_>,
) -> Result<ReferenceOutput> {
    forward_at(q, k, v, params, 0)
}

/// [`reference_forward`] of a batch whose first (batch, head) pair is number `bh0` of the
/// caller's: one sequence of a packed batch draws its dropout as that sequence.
fn forward_at(
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    params: &AttentionParams<'_>,
    bh0: usize,
) -> Result<ReferenceOutput> {
    let ((b_n, sq, skv, hq, hkv, _, dv), rs) = ref_setup(q, k, v, params)?;
    let mut out = vec![0.0; b_n * sq * hq * dv];
    let mut lse = vec![f64::NEG_INFINITY; b_n * hq * sq];
    let (mut probs, mut cap, mut masked) = (vec![0.0; skv], vec![0.0; skv], vec![false; skv]);
    for b in 0..b_n {
        for h in 0..hq {
            let hk = h / (hq / hkv);
            for i in 0..sq {
                rs.row(b, h, i, &mut probs, &mut cap);
                masked_keys(&probs, &mut masked);
                lse[(b * hq + h) * sq + i] = softmax_row(&mut probs);
                dropout_row(params, bh0 + b * hq + h, i, &mut probs);
                let o = &mut out[((b * sq + i) * hq + h) * dv..][..dv];
                // Every unmasked key counts, even with probability 0: 0 · inf is NaN here as
                // in every kernel's P·V product.
                for (j, &w) in probs.iter().enumerate() {
                    if !masked[j] {
                        for (e, oe) in o.iter_mut().enumerate() {
                            *oe += w * unsafe { read(v, &[b, j, hk, e]) };
                        }
                    }
                }
            }
        }
    }
    Ok(ReferenceOutput { out, lse })
}

/// Which keys each query row does not see, `[batch, heads_q, seqlen_q, seqlen_kv]` row-major,
/// each as (masked, by the caller): masked where the score is -inf, the keys that take no part
/// in a row's result (as the reference's softmax treats them); by the caller where the band, a boolean mask or an
/// additive mask of -inf hides the key, rather than a non-finite q or k.
pub fn reference_masked_keys(
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    params: &AttentionParams<'_>,
) -> Result<Vec<(bool, bool)>> {
    let ((b_n, sq, skv, hq, ..), rs) = ref_setup(q, k, v, params)?;
    let rows = b_n * hq * sq;
    let mut masked = Vec::with_capacity(rows * skv);
    let (mut scores, mut cap, mut by_caller) = (vec![0.0; skv], vec![0.0; skv], vec![false; skv]);
    for n in 0..rows {
        let (b, h, i) = (n / (hq * sq), n / sq % hq, n % sq);
        rs.row_masked(b, h, i, &mut scores, &mut cap, Some(&mut by_caller));
        masked.extend(
            scores
                .iter()
                .zip(&by_caller)
                .map(|(&s, &c)| (s == f64::NEG_INFINITY, c)),
        );
    }
    Ok(masked)
}

/// Gradients from [`reference_backward`], contiguous f64, in the layouts of q, k and v.
#[derive(Clone, Debug)]
pub struct ReferenceGrads {
    /// [batch, seqlen_q, heads_q, head_dim]
    pub dq: Vec<f64>,
    /// [batch, seqlen_kv, heads_kv, head_dim]
    pub dk: Vec<f64>,
    /// [batch, seqlen_kv, heads_kv, head_dim_v]
    pub dv: Vec<f64>,
}

/// Gradients of `Σ out · dout` with respect to q, k and v, in f64 (the forward is recomputed
/// here, so it needs neither `out` nor the log-sum-exp).
///
/// `delta_from_out`: None computes the exact gradients. Given the forward's stored output, the
/// softmax term `D_i = Σ_j P_ij dP_ij` is instead taken as `Σ_e dO_ie · out_ie`, as every flash
/// backward pass does: with a bf16/fp16 `out` that is the best any kernel handed that output can
/// do, which is what tests measure a kernel's own error against.
pub fn reference_backward(
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    dout: &TensorView<'_>,
    delta_from_out: Option<&TensorView<'_>>,
    params: &AttentionParams<'_>,
) -> Result<ReferenceGrads> {
    backward_at(q, k, v, dout, delta_from_out.map(|o| (o, None)), params, 0)
}

/// [`reference_backward`] as a flash backward pass with 16-bit products computes it, exactly
/// but for its roundings: `D_i` from the stored output `out`, and P and dS rounded to
/// `products` (bf16 or fp16) where the products dV = Pᵀ dO, dK = dSᵀ Q and dQ = dS K consume
/// them, as FlashAttention does on tensor cores and ufa's AVX-512 BF16 backward does. On rows
/// whose softmax is peaked (dP ≈ D) these roundings alone can cost more than the 16-bit
/// types' 1e-2 (a bf16 case of head dim 1 with 143 keys: dV 2.0e-2 from rounding P), which is
/// what a kernel's error is measured against (`Instance::compare_grads`).
pub fn reference_backward_rounded(
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    dout: &TensorView<'_>,
    out: &TensorView<'_>,
    products: Option<DType>,
    params: &AttentionParams<'_>,
) -> Result<ReferenceGrads> {
    backward_at(q, k, v, dout, Some((out, products)), params, 0)
}

/// `x` rounded to `dtype` (bf16 or fp16; unchanged for any other).
fn rounded_to(x: f64, dtype: Option<DType>) -> f64 {
    match dtype {
        Some(DType::BF16) => half::bf16::from_f64(x).to_f64(),
        Some(DType::F16) => half::f16::from_f64(x).to_f64(),
        _ => x,
    }
}

/// [`reference_backward`] with the dropout of (batch, head) pairs from number `bh0` on (see
/// [`forward_at`]).
fn backward_at(
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    dout: &TensorView<'_>,
    flash: Option<(&TensorView<'_>, Option<DType>)>,
    params: &AttentionParams<'_>,
    bh0: usize,
) -> Result<ReferenceGrads> {
    // D from the stored output, and the products' rounding ([`reference_backward_rounded`]).
    let (delta_from_out, products) = (flash.map(|f| f.0), flash.and_then(|f| f.1));
    let ((b_n, sq, skv, hq, hkv, d, dv), rs) = ref_setup(q, k, v, params)?;
    if dout.shape() != [b_n, sq, hq, dv] {
        return Err(ufa::Error::invalid(format!(
            "dout.shape={:?} but must be [batch, seqlen_q, heads_q, head_dim_v]={:?}",
            dout.shape(),
            [b_n, sq, hq, dv]
        )));
    }
    let mut g = ReferenceGrads {
        dq: vec![0.0; b_n * sq * hq * d],
        dk: vec![0.0; b_n * skv * hkv * d],
        dv: vec![0.0; b_n * skv * hkv * dv],
    };
    let (mut probs, mut cap, mut dp) = (vec![0.0; skv], vec![0.0; skv], vec![0.0; skv]);
    let mut masked = vec![false; skv];
    for b in 0..b_n {
        for h in 0..hq {
            let hk = h / (hq / hkv);
            for i in 0..sq {
                rs.row(b, h, i, &mut probs, &mut cap);
                masked_keys(&probs, &mut masked);
                if softmax_row(&mut probs) == f64::NEG_INFINITY {
                    continue; // a row that sees no key passes no gradient
                }
                let dout_i: Vec<f64> = (0..dv)
                    .map(|e| unsafe { read(dout, &[b, i, h, e]) })
                    .collect();
                // dP = dO · Vᵀ through the dropout (out = (P ∘ Z) V with Z the factors 0 or
                // 1 / (1 - p)), so dP = Z ∘ (dO · Vᵀ); D = Σ P ∘ dP (= dO · out), over the keys
                // the row sees.
                let mut keep = vec![1.0; skv];
                dropout_row(params, bh0 + b * hq + h, i, &mut keep);
                let mut big_d = 0.0;
                for j in (0..skv).filter(|&j| !masked[j]) {
                    dp[j] = keep[j]
                        * (0..dv)
                            .map(|e| dout_i[e] * unsafe { read(v, &[b, j, hk, e]) })
                            .sum::<f64>();
                    big_d += probs[j] * dp[j];
                }
                if let Some(out) = delta_from_out {
                    big_d = (0..dv)
                        .map(|e| dout_i[e] * unsafe { read(out, &[b, i, h, e]) })
                        .sum();
                }
                for j in (0..skv).filter(|&j| !masked[j]) {
                    // dS with respect to scale·q·k, through the softmax and the softcap.
                    let ds = rounded_to(probs[j] * (dp[j] - big_d) * cap[j], products);
                    let p_j = rounded_to(probs[j], products);
                    for e in 0..d {
                        let (qe, ke) = unsafe { (read(q, &[b, i, h, e]), read(k, &[b, j, hk, e])) };
                        g.dq[((b * sq + i) * hq + h) * d + e] += rs.scale * ds * ke;
                        g.dk[((b * skv + j) * hkv + hk) * d + e] += rs.scale * ds * qe;
                    }
                    let dv_j = &mut g.dv[((b * skv + j) * hkv + hk) * dv..][..dv];
                    for (acc, g_e) in dv_j.iter_mut().zip(&dout_i) {
                        *acc += p_j * keep[j] * g_e;
                    }
                }
            }
        }
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ufa::TensorView;

    /// The analytic gradients of the reference match central finite differences of
    /// `Σ out · dout` on a tiny problem with every score modifier and dropout on (a fixed
    /// seed is a fixed mask: the output is smooth in q, k and v).
    #[test]
    fn backward_matches_finite_differences() {
        let (b, sq, skv, hq, hkv, d, dv) = (1, 3, 5, 2, 1, 4, 3);
        let gen = |n: usize, f: f64| {
            (0..n)
                .map(|i| ((i as f64 + 1.0) * f).sin() as f32)
                .collect::<Vec<f32>>()
        };
        let mut q = gen(b * sq * hq * d, 0.7);
        let mut k = gen(b * skv * hkv * d, 1.3);
        let mut v = gen(b * skv * hkv * dv, 0.4);
        let dout = gen(b * sq * hq * dv, 2.1);
        let slopes = [0.3f32, 0.1];
        let mask: Vec<f32> = gen(sq * skv, 0.9);
        let params = || {
            AttentionParams::default()
                .causal(true)
                .softcap(1.5)
                .alibi_slopes(TensorView::new(&slopes, &[2]).unwrap())
                .mask(TensorView::new(&mask, &[sq, skv]).unwrap())
                .dropout(0.4, 12345, 6)
        };
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            let o = reference_forward(
                &TensorView::new(q, &[b, sq, hq, d]).unwrap(),
                &TensorView::new(k, &[b, skv, hkv, d]).unwrap(),
                &TensorView::new(v, &[b, skv, hkv, dv]).unwrap(),
                &params(),
            )
            .unwrap();
            o.out.iter().zip(&dout).map(|(o, g)| o * *g as f64).sum()
        };
        let g = reference_backward(
            &TensorView::new(&q, &[b, sq, hq, d]).unwrap(),
            &TensorView::new(&k, &[b, skv, hkv, d]).unwrap(),
            &TensorView::new(&v, &[b, skv, hkv, dv]).unwrap(),
            &TensorView::new(&dout, &[b, sq, hq, dv]).unwrap(),
            None,
            &params(),
        )
        .unwrap();
        let mut worst = 0f64;
        for (which, grad) in [(0, &g.dq), (1, &g.dk), (2, &g.dv)] {
            for idx in 0..grad.len() {
                let bufs: [&mut Vec<f32>; 3] = [&mut q, &mut k, &mut v];
                let x0 = bufs[which][idx];
                let h = 1e-2f32;
                bufs[which][idx] = x0 + h;
                let up = (x0 + h) as f64;
                let fp = loss(&q, &k, &v);
                let bufs: [&mut Vec<f32>; 3] = [&mut q, &mut k, &mut v];
                bufs[which][idx] = x0 - h;
                let down = (x0 - h) as f64;
                let fm = loss(&q, &k, &v);
                let bufs: [&mut Vec<f32>; 3] = [&mut q, &mut k, &mut v];
                bufs[which][idx] = x0;
                let fd = (fp - fm) / (up - down);
                worst = worst.max((fd - grad[idx]).abs());
            }
        }
        // Central differences with h = 1e-2 are exact to O(h²) ~ 1e-4 times the third derivative.
        assert!(worst < 2e-4, "largest gradient difference {worst}");
        assert!(
            g.dq.iter()
                .chain(&g.dk)
                .chain(&g.dv)
                .any(|&x| x.abs() > 1e-2),
            "gradients are trivially zero"
        );
    }
}
