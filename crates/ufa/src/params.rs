//! What an attention call computes besides Q, K and V: scale, masking, biases.

use crate::dropout::Dropout;
use crate::tensor::TensorView;

/// Where the causal diagonal (and the sliding window) sits when `seqlen_q != seqlen_kv`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CausalAlignment {
    /// Query `i` is aligned with key `i + seqlen_kv - seqlen_q` (FlashAttention 2+, decoding with
    /// a KV cache). The default.
    #[default]
    BottomRight,
    /// Query `i` is aligned with key `i` (PyTorch's `scaled_dot_product_attention(is_causal=True)`).
    TopLeft,
}

/// How fp32 products may be computed where a backend can trade accuracy for speed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Fp32Precision {
    /// fp32 accuracy, the default: the CPU computes in fp32; NVIDIA tensor cores split every
    /// product into three TF32 products ("3xTF32"), about 2^-22 relative per product.
    #[default]
    Ieee,
    /// Operands rounded to TF32 (10 mantissa bits) once, as PyTorch does under
    /// `torch.backends.cuda.matmul.allow_tf32` / `fp32_precision = "tf32"`: the CUDA forward
    /// and backward run up to 3× faster, with outputs and gradients within 2e-3 (relative RMS)
    /// of the exact ones instead of 1e-5. The CPU, which has no faster mode, computes in fp32.
    Tf32,
}

/// The parameters of an attention call. Build with [`AttentionParams::default`] and the builder
/// methods; every field is public for bindings that fill it directly.
///
/// Scores are computed as `s = softmax_scale * q·k`, then `s = softcap * tanh(s / softcap)` if
/// `softcap > 0`, then `s -= slope * |i + offset - j|` for ALiBi, then the additive mask is added;
/// keys outside the causal/window band or where a boolean mask is false are excluded.
#[derive(Clone, Copy, Debug)]
pub struct AttentionParams<'a> {
    /// Multiplies `q·k`; `None` means `1/sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// Query `i` sees only keys at or before its aligned position.
    pub causal: bool,
    /// How the causal diagonal and the window are aligned.
    pub causal_alignment: CausalAlignment,
    /// Keys visible to the left of the aligned position; -1 = unbounded.
    pub window_left: i64,
    /// Keys visible to the right of the aligned position; -1 = unbounded (0 when causal).
    pub window_right: i64,
    /// Tanh soft-capping of the scores; 0 disables it.
    pub softcap: f32,
    /// ALiBi slopes, fp32, shape `[heads_q]` or `[batch, heads_q]`.
    pub alibi_slopes: Option<TensorView<'a>>,
    /// A boolean (true = attend) or additive (f16/bf16/f32) mask, broadcastable to
    /// `[batch, heads_q, seqlen_q, seqlen_kv]` (NumPy rules: dims aligned on the right, each 1 or full).
    pub mask: Option<TensorView<'a>>,
    /// Backward only: bitwise-reproducible gradients run to run, at some cost in speed on GPUs
    /// (no order-dependent atomics). The CPU backend is always deterministic.
    pub deterministic: bool,
    /// fp32 inputs: whether products may be rounded to TF32 (see [`Fp32Precision`]).
    pub fp32_precision: Fp32Precision,
    /// Dropout of the attention probabilities (see [`Dropout`]); the backward must be given
    /// the forward's. CPU tensors; dense and packed (varlen) calls, not KV-cache ones.
    pub dropout: Option<Dropout>,
}

impl Default for AttentionParams<'_> {
    fn default() -> Self {
        AttentionParams {
            softmax_scale: None,
            causal: false,
            causal_alignment: CausalAlignment::BottomRight,
            window_left: -1,
            window_right: -1,
            softcap: 0.0,
            alibi_slopes: None,
            mask: None,
            deterministic: false,
            fp32_precision: Fp32Precision::Ieee,
            dropout: None,
        }
    }
}

impl<'a> AttentionParams<'a> {
    pub fn softmax_scale(mut self, scale: f32) -> Self {
        self.softmax_scale = Some(scale);
        self
    }
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    pub fn causal_alignment(mut self, alignment: CausalAlignment) -> Self {
        self.causal_alignment = alignment;
        self
    }
    pub fn window(mut self, left: i64, right: i64) -> Self {
        self.window_left = left;
        self.window_right = right;
        self
    }
    pub fn softcap(mut self, softcap: f32) -> Self {
        self.softcap = softcap;
        self
    }
    pub fn alibi_slopes(mut self, slopes: TensorView<'a>) -> Self {
        self.alibi_slopes = Some(slopes);
        self
    }
    pub fn mask(mut self, mask: TensorView<'a>) -> Self {
        self.mask = Some(mask);
        self
    }
    pub fn deterministic(mut self, deterministic: bool) -> Self {
        self.deterministic = deterministic;
        self
    }
    /// Drops each probability with probability `p` (scaling the others by `1 / (1 - p)`),
    /// drawn from the counter-based generator at (`seed`, `offset`): the same three values
    /// give the same mask in the forward and the backward.
    pub fn dropout(mut self, p: f32, seed: u64, offset: u64) -> Self {
        self.dropout = Some(Dropout { p, seed, offset });
        self
    }
    pub fn fp32_precision(mut self, precision: Fp32Precision) -> Self {
        self.fp32_precision = precision;
        self
    }
}
