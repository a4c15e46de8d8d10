//! Calls with nothing to compute, answered as PyTorch answers them. A batch or a query length of
//! 0 has empty outputs. A key length of 0 leaves every row without a visible key, so the
//! fully-masked rule applies: output zeros, LSE −inf. In the backward, no queries means no
//! gradient reaches K and V (zeros) and no keys means none reaches Q (zeros).
//!
//! These calls are settled here, once for every backend, because the kernels' tilings assume at
//! least one row and one key (a TMA map of a zero-length tensor cannot even be described).

use crate::dtype::DType;
use crate::problem::{BackwardProblem, Operand, Problem};

/// The constant an output is filled with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FillValue {
    Zero,
    NegInf,
}

/// One output to fill: a strided 4-d view (size-1 dimensions where the operand has fewer).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fill {
    pub ptr: *mut u8,
    pub dtype: DType,
    pub shape: [usize; 4],
    pub strides: [usize; 4],
    pub value: FillValue,
}

impl Fill {
    fn of(op: &Operand, shape: [usize; 4], value: FillValue) -> Fill {
        Fill {
            ptr: op.ptr,
            dtype: op.dtype,
            shape,
            strides: op.strides,
            value,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The element's bit pattern, in the low `dtype.size_in_bytes()` bytes.
    pub fn bits(&self) -> u32 {
        match (self.value, self.dtype) {
            (FillValue::Zero, _) => 0,
            (FillValue::NegInf, DType::F32) => f32::NEG_INFINITY.to_bits(),
            (FillValue::NegInf, DType::F16) => half::f16::NEG_INFINITY.to_bits() as u32,
            (FillValue::NegInf, DType::BF16) => half::bf16::NEG_INFINITY.to_bits() as u32,
            (FillValue::NegInf, other) => unreachable!("no -inf fill of {other}"),
        }
    }

    /// Element offsets of the view, in row-major order of its indices.
    pub fn offsets(&self) -> impl Iterator<Item = usize> + '_ {
        let [a, b, c, d] = self.shape;
        let s = self.strides;
        (0..a).flat_map(move |i| {
            (0..b).flat_map(move |j| {
                (0..c).flat_map(move |k| {
                    (0..d).map(move |l| i * s[0] + j * s[1] + k * s[2] + l * s[3])
                })
            })
        })
    }
}

/// `None` when the forward has work for the kernels; otherwise what to write instead (possibly
/// nothing).
pub(crate) fn forward_fills(p: &Problem) -> Option<Vec<Fill>> {
    if p.batch == 0 || p.seqlen_q == 0 {
        return Some(Vec::new());
    }
    if p.seqlen_kv > 0 {
        return None;
    }
    let out_shape = [p.batch, p.seqlen_q, p.heads_q, p.head_dim_v];
    let mut fills = vec![Fill::of(&p.out, out_shape, FillValue::Zero)];
    if let Some(lse) = &p.lse {
        let lse_shape = [p.batch, p.heads_q, p.seqlen_q, 1];
        fills.push(Fill::of(lse, lse_shape, FillValue::NegInf));
    }
    Some(fills)
}

/// As [`forward_fills`], for the backward's gradients.
pub(crate) fn backward_fills(p: &BackwardProblem) -> Option<Vec<Fill>> {
    let f = &p.fwd;
    if f.batch == 0 {
        return Some(Vec::new());
    }
    if f.seqlen_q == 0 {
        return Some(vec![
            Fill::of(
                &p.dk,
                [f.batch, f.seqlen_kv, f.heads_kv, f.head_dim],
                FillValue::Zero,
            ),
            Fill::of(
                &p.dv,
                [f.batch, f.seqlen_kv, f.heads_kv, f.head_dim_v],
                FillValue::Zero,
            ),
        ]);
    }
    if f.seqlen_kv == 0 {
        let dq_shape = [f.batch, f.seqlen_q, f.heads_q, f.head_dim];
        return Some(vec![Fill::of(&p.dq, dq_shape, FillValue::Zero)]);
    }
    None
}

/// Writes `fills` into host memory.
///
/// # Safety
/// Every fill describes memory validation accepted as a host output.
pub(crate) unsafe fn fill_host(fills: &[Fill]) {
    for f in fills {
        let size = f.dtype.size_in_bytes();
        let bytes = f.bits().to_ne_bytes();
        for off in f.offsets() {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), f.ptr.add(off * size), size);
        }
    }
}
