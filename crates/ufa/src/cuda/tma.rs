//! Tensor maps for the Hopper kernels fed by the tensor memory accelerator
//! (kernels/fwd_sm90_tma.cu, kernels/bwd_sm90.cu, kernels/tma.cuh): it copies boxes of Q, K,
//! V (and dO) into shared memory with the 128-byte swizzle and adds the backward's dQ tiles
//! into its fp32 buffer, so the kernels' parameter blocks carry one map per tensor.

use super::abi::{BwdParams, BwdSm90Params, FwdParams, FwdSm90Params, TmaMap};
use super::variants::query_and_key_dims;
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use crate::problem::{BackwardProblem, Operand, Problem};
use cudarc::driver::sys;

/// Columns of a 16-bit box: 128 bytes, the swizzle's row.
const BOX_COLS: u32 = 64;
/// Columns of an fp32 dQ box.
const DQ_BOX_COLS: u32 = 32;
/// Strides a tensor map takes: multiples of 16 bytes below 2^40.
const MAX_STRIDE_BYTES: u64 = 1 << 40;

/// Byte strides of (seq, head, batch) for a map of an [batch, seq, heads, head_dim] operand of
/// 2-byte elements, or None where a dimension with more than one index has a stride a map
/// cannot express (zero, not a multiple of 16 bytes, too large). Dimensions of one index get
/// the dense stride, which is never used but must be valid.
fn strides_16bit(
    op: &Operand,
    [batch, seq, heads]: [usize; 3],
    head_dim: usize,
) -> Option<[u64; 3]> {
    let sizes = [seq, heads, batch];
    let given = [op.strides[1], op.strides[2], op.strides[0]];
    let mut out = [0u64; 3];
    let mut dense = head_dim as u64 * 2;
    for i in 0..3 {
        let bytes = given[i] as u64 * 2;
        out[i] = if sizes[i] == 1 { dense } else { bytes };
        if out[i] == 0 || !out[i].is_multiple_of(16) || out[i] >= MAX_STRIDE_BYTES {
            return None;
        }
        dense = out[i] * sizes[i] as u64;
    }
    Some(out)
}

/// Whether an operand of a dense batch with `dims` can have a map: 16-byte aligned, with
/// strides a map can express.
fn mappable(op: &Operand, dims: [usize; 3], head_dim: usize) -> bool {
    (op.ptr as usize).is_multiple_of(16) && strides_16bit(op, dims, head_dim).is_some()
}

/// Whether every operand the warp-specialised Hopper forward loads through a map can have one.
pub(crate) fn forward_maps_possible(f: &Problem) -> bool {
    let (q, kv) = query_and_key_dims(f);
    mappable(&f.q, q, f.head_dim)
        && mappable(&f.k, kv, f.head_dim)
        && mappable(&f.v, kv, f.head_dim_v)
}

/// Whether every operand the Hopper backward loads or stores through a map can have one.
pub(crate) fn backward_maps_possible(p: &BackwardProblem) -> bool {
    let f = &p.fwd;
    let (q, kv) = query_and_key_dims(f);
    let (d, dv) = (f.head_dim, f.head_dim_v);
    [
        (&f.q, q, d),
        (&p.dout, q, dv),
        (&f.k, kv, d),
        (&f.v, kv, dv),
    ]
    .iter()
    .all(|(op, dims, d)| mappable(op, *dims, *d))
}

/// Encodes a tiled map of `dims` (innermost first) with byte `strides` of the outer ones,
/// boxes of `boxes`, 128-byte swizzle, zeros past the ends.
fn encode(
    what: &str,
    dtype: sys::CUtensorMapDataType,
    ptr: u64,
    dims: &[u64],
    strides: &[u64],
    boxes: &[u32],
) -> Result<TmaMap> {
    debug_assert!(dims.len() == boxes.len() && strides.len() + 1 == dims.len());
    let element_strides = vec![1u32; dims.len()];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every array holds `dims.len()` (strides: one fewer) entries, as the rank says;
    // the driver only writes the map and reads nothing at `ptr`.
    let rc = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            dtype,
            dims.len() as u32,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if rc != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::new(
            ErrorKind::Backend,
            format!(
                "cuTensorMapEncodeTiled({what}: dims {dims:?}, byte strides {strides:?}, box \
                 {boxes:?}) failed: {rc:?}"
            ),
        ));
    }
    // SAFETY: initialised by the successful call.
    Ok(TmaMap {
        opaque: unsafe { map.assume_init() }.opaque,
    })
}

fn map_16bit(
    what: &str,
    op: &Operand,
    dims: [usize; 3],
    head_dim: usize,
    rows: u32,
) -> Result<TmaMap> {
    let strides = strides_16bit(op, dims, head_dim).ok_or_else(|| {
        Error::new(
            ErrorKind::Internal,
            format!("{what}: strides {:?} cannot be a tensor map", op.strides),
        )
    })?;
    let dtype = match op.dtype {
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let [batch, seq, heads] = dims.map(|d| d as u64);
    encode(
        what,
        dtype,
        op.ptr as u64,
        &[head_dim as u64, seq, heads, batch],
        &strides,
        &[BOX_COLS, rows, 1, 1],
    )
}

impl BwdSm90Params {
    /// `bp` with the maps of `p`'s tensors: boxes of `block_m` query rows, `block_n` keys; V's
    /// and dO's rows are head_dim_v wide, and every map spans the real head dim (zeros past it
    /// on a wider tile).
    pub fn new(p: &BackwardProblem, bp: BwdParams, block_m: u32, block_n: u32) -> Result<Self> {
        let f = &p.fwd;
        let (qd, kvd) = query_and_key_dims(f);
        let d = f.head_dim;
        let rows = (f.batch * f.heads_q) as u64;
        Ok(BwdSm90Params {
            bp,
            q: map_16bit("q", &f.q, qd, d, block_m)?,
            dout: map_16bit("dout", &p.dout, qd, f.head_dim_v, block_m)?,
            k: map_16bit("k", &f.k, kvd, d, block_n)?,
            v: map_16bit("v", &f.v, kvd, f.head_dim_v, block_n)?,
            dq: encode(
                "dq_accum",
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
                bp.dq_accum as u64,
                &[d as u64, f.seqlen_q as u64, rows],
                &[d as u64 * 4, (f.seqlen_q * d) as u64 * 4],
                &[DQ_BOX_COLS, block_m, 1],
            )?,
        })
    }
}

impl FwdSm90Params {
    /// `f` with the maps of `p`'s Q, K and V: boxes of `block_m` query rows, `block_n` keys;
    /// V's rows are head_dim_v wide.
    pub fn new(p: &Problem, f: FwdParams, block_m: u32, block_n: u32) -> Result<Self> {
        let (qd, kvd) = query_and_key_dims(p);
        let d = p.head_dim;
        Ok(FwdSm90Params {
            f,
            q: map_16bit("q", &p.q, qd, d, block_m)?,
            k: map_16bit("k", &p.k, kvd, d, block_n)?,
            v: map_16bit("v", &p.v, kvd, p.head_dim_v, block_n)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operand(strides: [usize; 4]) -> Operand {
        Operand::strided(4096 as *mut u8, DType::BF16, strides)
    }

    #[test]
    fn tensor_maps_keep_the_hardware_alignment() {
        // The tensor maps follow BwdParams at 64-byte boundaries (the TMA reads them there).
        assert_eq!(std::mem::align_of::<TmaMap>(), 64);
        assert_eq!(std::mem::offset_of!(BwdSm90Params, q) % 64, 0);
        assert_eq!(std::mem::offset_of!(FwdSm90Params, q) % 64, 0);
        assert_eq!(std::mem::size_of::<TmaMap>(), 128);
    }

    #[test]
    fn strides_of_single_index_dimensions_are_made_dense() {
        // [2, 100, 8, 128] contiguous: seq, head, batch strides in bytes.
        let dense = operand([100 * 8 * 128, 8 * 128, 128, 1]);
        assert_eq!(
            strides_16bit(&dense, [2, 100, 8], 128),
            Some([2048, 256, 204_800])
        );
        // One head and one batch entry with strides a map could not take: never read.
        let odd = operand([3, 128, 5, 1]);
        assert_eq!(
            strides_16bit(&odd, [1, 100, 1], 128),
            Some([256, 25_600, 25_600])
        );
    }

    #[test]
    fn broadcast_or_misaligned_strides_have_no_map() {
        // A key tensor expanded over heads (stride 0) and a row stride of 4 elements.
        assert_eq!(
            strides_16bit(&operand([0, 128, 0, 1]), [1, 100, 8], 128),
            None
        );
        assert_eq!(
            strides_16bit(&operand([0, 4, 128, 1]), [1, 100, 8], 128),
            None
        );
    }
}
