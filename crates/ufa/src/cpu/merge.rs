//! Merging attention states on the CPU, one (batch, row) per work item.

use super::parallel::{for_each, Exec};
use crate::dtype::{load_row_f32, store_row_f32};
use crate::merge::{merge_weights, MergeProblem};

/// Merges every row of `m`'s states into its output.
pub(super) fn merge(m: &MergeProblem, exec: Exec) {
    let n = m.states.len();
    let d = m.head_dim;
    let init = || (vec![0f32; n], vec![0f32; n], vec![0f32; d], vec![0f32; d]);
    for_each(
        exec,
        m.batch * m.seqlen,
        init,
        |(lses, weights, acc, row), item| {
            let (b, i) = (item / m.seqlen, item % m.seqlen);
            for h in 0..m.heads {
                for (l, (_, lse)) in lses.iter_mut().zip(&m.states) {
                    // SAFETY: within the validated LSE views.
                    *l = unsafe { *(lse.at([b, h, i, 0]) as *const f32) };
                }
                let (max, sum) = merge_weights(lses, weights);
                acc.fill(0.0);
                if sum != 0.0 || max.is_nan() {
                    for (((out, _), &w), &l) in m.states.iter().zip(weights.iter()).zip(lses.iter())
                    {
                        if l == f32::NEG_INFINITY {
                            continue; // saw no key: contributes nothing, whatever its row holds
                        }
                        // SAFETY: within the validated output views. Every state row is read
                        // before the merged row is written (states[0] may be the output).
                        unsafe { load_row_f32(out.dtype, out.at([b, i, h, 0]), row) };
                        acc.iter_mut()
                            .zip(row.iter())
                            .for_each(|(a, x)| *a += w * x);
                    }
                    let inv = 1.0 / sum;
                    acc.iter_mut().for_each(|a| *a *= inv);
                }
                let lse = if sum != 0.0 || max.is_nan() {
                    max + sum.ln()
                } else {
                    f32::NEG_INFINITY
                };
                // SAFETY: this item alone writes row (b, i) of every head.
                unsafe {
                    store_row_f32(m.out.dtype, acc, m.out.at([b, i, h, 0]));
                    if let Some(l) = &m.lse {
                        *(l.at([b, h, i, 0]) as *mut f32) = lse;
                    }
                }
            }
        },
    );
}
