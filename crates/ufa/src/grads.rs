//! The arguments of a backward call: what it reads and where it writes. Plain views, below
//! the backends and the context that take them.

use crate::tensor::{TensorView, TensorViewMut};

/// What the backward pass reads: the forward's inputs and output, its log-sum-exp, and the
/// gradient of the loss with respect to the output.
#[derive(Clone, Copy, Debug)]
pub struct BackwardInputs<'a> {
    /// `[batch, seqlen_q, heads_q, head_dim]`
    pub q: TensorView<'a>,
    /// `[batch, seqlen_kv, heads_kv, head_dim]`
    pub k: TensorView<'a>,
    /// `[batch, seqlen_kv, heads_kv, head_dim_v]`
    pub v: TensorView<'a>,
    /// The forward's output, `[batch, seqlen_q, heads_q, head_dim_v]`.
    pub out: TensorView<'a>,
    /// Gradient of the loss with respect to `out`, same shape.
    pub dout: TensorView<'a>,
    /// The forward's log-sum-exp, f32 `[batch, heads_q, seqlen_q]`.
    pub lse: TensorView<'a>,
}

/// Where the backward pass writes: gradients with the shapes of q, k and v (any float dtype).
/// For GQA, dk and dv are summed over the query heads that share a KV head.
#[derive(Debug)]
pub struct Gradients<'a> {
    pub dq: TensorViewMut<'a>,
    pub dk: TensorViewMut<'a>,
    pub dv: TensorViewMut<'a>,
}
