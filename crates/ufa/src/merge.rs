//! Merging attention states: partial results of attention over disjoint sets of keys (KV
//! splits, a shared prefix and a private suffix, ring or context parallelism) combine exactly
//! through their log-sum-exps:
//!
//! `m = max_i lse_i`, `w_i = exp(lse_i − m)`, `out = Σ w_i out_i / Σ w_i`, `lse = m + ln Σ w_i`.
//!
//! A state with LSE −inf (it saw no key) contributes nothing; if every state has −inf the merged
//! row is 0 with LSE −inf, as a row that sees no key. A NaN anywhere in a row's inputs makes that
//! row NaN. LSEs are natural logarithms, as every ufa call returns them; FlashInfer's are base 2
//! (multiply by ln 2 to convert).

use crate::device::Device;
use crate::error::{invalid, Result};
use crate::problem::{
    byte_range, check_f32, check_float, check_no_self_overlap, check_tensor, lse_operand, operand,
    Operand,
};
use crate::tensor::{TensorView, TensorViewMut};

/// One partial result: `out` `[batch, seqlen, heads, head_dim]` (any float dtype) and its LSE,
/// f32 `[batch, heads, seqlen]`, natural log.
#[derive(Clone, Copy, Debug)]
pub struct AttentionState<'a> {
    pub out: TensorView<'a>,
    pub lse: TensorView<'a>,
}

/// A validated merge.
#[derive(Clone, Debug)]
pub(crate) struct MergeProblem {
    pub device: Device,
    pub batch: usize,
    pub seqlen: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// (out, lse) of each state.
    pub states: Vec<(Operand, Operand)>,
    pub out: Operand,
    pub lse: Option<Operand>,
}

/// Checks a merge. The output may be the first state itself (the same view, merged in place:
/// each row is read before it is written); any other overlap of an output with an input is an
/// error.
pub(crate) fn validate_merge(
    states: &[AttentionState<'_>],
    out: &TensorViewMut<'_>,
    lse: Option<&TensorViewMut<'_>>,
) -> Result<MergeProblem> {
    let Some(first) = states.first() else {
        invalid!("states is empty: a merge needs at least one state");
    };
    let device = first.out.device();
    let shape = first.out.shape().to_vec();
    if shape.len() != 4 {
        invalid!(
            "states[0].out must have 4 dimensions [batch, seqlen, heads, head_dim], got shape \
             {shape:?}"
        );
    }
    let (batch, seqlen, heads, head_dim) = (shape[0], shape[1], shape[2], shape[3]);
    let o_want = [
        (batch, "states[0].out.shape[0] (batch)"),
        (seqlen, "states[0].out.shape[1] (seqlen)"),
        (heads, "states[0].out.shape[2] (heads)"),
        (head_dim, "states[0].out.shape[3] (head_dim)"),
    ];
    let l_want = [o_want[0], o_want[2], o_want[1]];
    let mut ops = Vec::with_capacity(states.len());
    for (i, s) in states.iter().enumerate() {
        let (on, ln) = (format!("states[{i}].out"), format!("states[{i}].lse"));
        check_tensor(&on, s.out.layout(), s.out.device(), device, &o_want)?;
        check_float(&on, s.out.dtype())?;
        check_tensor(&ln, s.lse.layout(), s.lse.device(), device, &l_want)?;
        check_f32(&ln, s.lse.dtype())?;
        ops.push((
            operand(s.out.as_ptr(), s.out.dtype(), s.out.layout()),
            lse_operand(s.lse.as_ptr(), s.lse.layout()),
        ));
    }
    check_tensor("out", out.layout(), out.device(), device, &o_want)?;
    check_float("out", out.dtype())?;
    check_no_self_overlap("out", out.layout())?;
    if let Some(l) = lse {
        check_tensor("lse", l.layout(), l.device(), device, &l_want)?;
        check_f32("lse", l.dtype())?;
        check_no_self_overlap("lse", l.layout())?;
    }
    // Outputs against inputs: disjoint, or exactly the first state (in place).
    let range = |t: &TensorView<'_>| byte_range(t.as_ptr(), t.dtype(), t.layout());
    let same = |a: &TensorView<'_>, b: &TensorView<'_>| {
        a.as_ptr() == b.as_ptr() && a.dtype() == b.dtype() && a.layout() == b.layout()
    };
    let meets = |a: (usize, usize), b: (usize, usize)| a.0 < b.1 && b.0 < a.1;
    let mut outputs = vec![("out", out.as_view())];
    outputs.extend(lse.map(|l| ("lse", l.as_view())));
    if let [(_, o), (_, l)] = outputs.as_slice() {
        if meets(range(o), range(l)) {
            invalid!("out and lse share memory; they must be separate buffers");
        }
    }
    for (oname, o) in &outputs {
        for (i, s) in states.iter().enumerate() {
            for (iname, t, own) in [("out", &s.out, "out"), ("lse", &s.lse, "lse")] {
                let in_place = i == 0 && *oname == own && same(o, t);
                if meets(range(o), range(t)) && !in_place {
                    invalid!(
                        "{oname} shares memory with states[{i}].{iname}; outputs must not \
                         overlap the states (except the output being states[0] itself)"
                    );
                }
            }
        }
    }
    Ok(MergeProblem {
        device,
        batch,
        seqlen,
        heads,
        head_dim,
        states: ops,
        out: operand(out.as_view().as_ptr(), out.dtype(), out.layout()),
        lse: lse.map(|l| lse_operand(l.as_view().as_ptr(), l.layout())),
    })
}

/// The merged (max LSE, Σ weights) of one row's LSEs, and each state's weight written to
/// `weights`; `(−inf, 0)` when no state saw a key, NaN when an LSE is NaN.
#[inline]
pub(crate) fn merge_weights(lses: &[f32], weights: &mut [f32]) -> (f32, f32) {
    let mut m = f32::NEG_INFINITY;
    for &l in lses {
        // NaN propagates (f32::max would drop it).
        m = if l.is_nan() || m.is_nan() {
            f32::NAN
        } else {
            m.max(l)
        };
    }
    if m == f32::NEG_INFINITY {
        weights.fill(0.0);
        return (m, 0.0);
    }
    let mut sum = 0.0;
    for (w, &l) in weights.iter_mut().zip(lses) {
        *w = (l - m).exp();
        sum += *w;
    }
    (m, sum)
}
