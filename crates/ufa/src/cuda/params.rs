//! How validated problems become the kernels' parameter blocks (declared in abi.rs): strides
//! as the kernels index them, sequence metadata as device pointers, and the limits the kernels
//! clamp device-side lengths and indices to.

use super::abi::MERGE_MAX_STATES;
use super::abi::{
    AppendParams, AppendRows, DTypeKind, DecodeParams, FwdParams, MaskKind, MergeParams, MergeState,
};
use super::decode::{DecodePlan, SplitMerge};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kvcache::KvCacheProblem;
use crate::merge::MergeProblem;
use crate::problem::{Problem, MAX_SEQLEN};
use crate::sequences::{KeyLengths, RowMap};
use crate::CausalAlignment;
use std::ffi::c_void;

/// Windows are clamped to this (band arithmetic `i + offset ± window` stays in 32 bits).
const UNBOUNDED: i32 = 1 << 29;

fn mask_kind(d: DType) -> MaskKind {
    match d {
        DType::Bool => MaskKind::Bool,
        DType::F16 => MaskKind::F16,
        DType::BF16 => MaskKind::BF16,
        DType::F32 => MaskKind::F32,
        DType::I32 => unreachable!("masks are bool or float (validated)"),
    }
}

/// `DTypeKind` of a float tensor.
pub(crate) fn dtype_kind(d: DType) -> i32 {
    (match d {
        DType::F16 => DTypeKind::F16,
        DType::BF16 => DTypeKind::BF16,
        DType::F32 | DType::Bool | DType::I32 => DTypeKind::F32,
    }) as i32
}

/// Strides (batch, seq, head) of a [b, s, h, d] operand, as the kernels index them.
pub(crate) fn bsh(s: [usize; 4]) -> [i64; 3] {
    [s[0] as i64, s[1] as i64, s[2] as i64]
}

fn ptr_of(a: Option<crate::sequences::IntArray>) -> *const i32 {
    a.map_or(std::ptr::null(), |a| a.ptr)
}

impl FwdParams {
    /// The parameter block of `p`, for kernels whose blocks cover `rows_per_block` query rows.
    pub fn new(p: &Problem, rows_per_block: u32) -> Result<FwdParams> {
        if p.seqlen_q >= MAX_SEQLEN || p.seqlen_kv >= MAX_SEQLEN {
            return Err(Error::unsupported(format!(
                "seqlen_q={} / seqlen_kv={}: the CUDA backend handles sequences shorter than {MAX_SEQLEN}",
                p.seqlen_q, p.seqlen_kv
            )));
        }
        let window = |w: Option<usize>| w.map_or(UNBOUNDED, |w| w.min(UNBOUNDED as usize) as i32);
        let (lse, lse_stride) = match &p.lse {
            Some(l) => (l.ptr as *mut f32, bsh(l.strides)),
            None => (std::ptr::null_mut(), [0; 3]),
        };
        let (alibi, alibi_stride) = match &p.alibi {
            Some(a) => (
                a.ptr as *const f32,
                [a.strides[0] as i64, a.strides[1] as i64],
            ),
            None => (std::ptr::null(), [0; 2]),
        };
        let (mask, mask_stride, kind) = match &p.mask {
            Some(m) => (
                m.ptr as *const c_void,
                m.strides.map(|s| s as i64),
                mask_kind(m.dtype),
            ),
            None => (std::ptr::null(), [0; 4], MaskKind::None),
        };
        // Packed rows, and what the key side's indices are checked against.
        let rows = |o: &crate::problem::Operand| match o.rows {
            RowMap::Packed { rows, .. } => rows as i64,
            _ => 0,
        };
        let (block_table, block_table_stride, page_shift, kv_batch_idx, kv_entries) = match p.k.rows
        {
            RowMap::Paged {
                table,
                shift,
                pages,
            } => (
                table.ptr,
                table.stride as i64,
                shift as i32,
                std::ptr::null(),
                pages as i64,
            ),
            RowMap::Gathered { index, entries } => {
                (std::ptr::null(), 0, 0, index.ptr, entries as i64)
            }
            _ => (std::ptr::null(), 0, 0, std::ptr::null(), p.batch as i64),
        };
        let (cu_seqlens_k, seqused_k, seqused_add) = match p.seqs.kv {
            KeyLengths::Uniform => (std::ptr::null(), std::ptr::null(), 0),
            KeyLengths::Cumulative(cu) => (cu.ptr, std::ptr::null(), 0),
            KeyLengths::Used { used, add } => (
                // A packed batch's keys are placed by cu_seqlens_kv even when seqused_kv
                // counts them.
                match p.k.rows {
                    RowMap::Packed { cu, .. } => cu.ptr,
                    _ => std::ptr::null(),
                },
                used.ptr,
                add as i32,
            ),
        };
        let rows_kv = match p.k.rows {
            // cu_seqlens_kv of a paged batch only counts keys: bounded by seqlen_kv.
            RowMap::Paged { .. } => i64::MAX,
            _ => rows(&p.k),
        };
        let rpb = rows_per_block as usize;
        let dropout = p.dropout.map(|d| d.kernel_words()).unwrap_or_default();
        Ok(FwdParams {
            q: p.q.ptr as *const c_void,
            k: p.k.ptr as *const c_void,
            v: p.v.ptr as *const c_void,
            out: p.out.ptr as *mut c_void,
            lse,
            alibi,
            mask,
            cu_seqlens_q: ptr_of(p.seqs.cu_q),
            cu_seqlens_k,
            seqused_k,
            block_table,
            kv_batch_idx,
            q_stride: bsh(p.q.strides),
            k_stride: bsh(p.k.strides),
            v_stride: bsh(p.v.strides),
            o_stride: bsh(p.out.strides),
            lse_stride,
            alibi_stride,
            mask_stride,
            block_table_stride,
            rows_q: rows(&p.q),
            rows_kv,
            kv_entries,
            batch: p.batch as i32,
            seqlen_q: p.seqlen_q as i32,
            seqlen_kv: p.seqlen_kv as i32,
            heads_q: p.heads_q as i32,
            group: p.group_size() as i32,
            head_dim: p.head_dim as i32,
            head_dim_v: p.head_dim_v as i32,
            seqused_add,
            page_shift,
            top_left: (p.seqs.alignment == CausalAlignment::TopLeft) as i32,
            window_left: window(p.window_left),
            window_right: window(p.window_right),
            scale: p.scale,
            scale_log2: p.scale * std::f32::consts::LOG2_E,
            softcap: p.softcap,
            mask_kind: kind as i32,
            num_m_blocks: p.seqlen_q.div_ceil(rpb) as i32,
            dropout_key: dropout.key,
            dropout_offset: dropout.offset,
            dropout_keep_max: dropout.keep_max,
            dropout_scale: dropout.scale,
        })
    }
}

impl DecodeParams {
    /// The decoding call of `p` under `plan`, its split partials at `o_part` and `lse_part`
    /// (null with one split or a merge within clusters), writing `append`'s new rows into the
    /// cache first where given.
    pub fn new(
        p: &Problem,
        plan: &DecodePlan,
        o_part: *mut f32,
        lse_part: *mut f32,
        append: Option<AppendRows>,
    ) -> Result<DecodeParams> {
        Ok(DecodeParams {
            f: FwdParams::new(p, plan.tile.rows())?,
            o_part,
            lse_part,
            num_splits: plan.splits as i32,
            row_blocks: plan.row_blocks as i32,
            dtype_out: dtype_kind(p.out.dtype),
            cluster_merge: (plan.merge == SplitMerge::Cluster) as i32,
            append: append.unwrap_or_else(AppendRows::none),
        })
    }
}

impl AppendRows {
    /// Nothing appended.
    pub fn none() -> AppendRows {
        AppendRows {
            k_new: std::ptr::null(),
            v_new: std::ptr::null(),
            cos: std::ptr::null(),
            sin: std::ptr::null(),
            k_new_stride: [0; 3],
            v_new_stride: [0; 3],
            rot_stride: [0; 2],
            seqlen_new: 0,
            rotary_dim: 0,
            seqlen_ro: 0,
            interleaved: 0,
            q_advances: 0,
            dtype: 0,
            dtype_rot: 0,
            _pad: 0,
        }
    }

    /// The new rows of `kp` (none when it appends nothing).
    pub fn new(kp: &KvCacheProblem) -> AppendRows {
        let Some(a) = &kp.append else {
            return AppendRows::none();
        };
        let rot = a.rotary;
        AppendRows {
            k_new: a.k.ptr as *const c_void,
            v_new: a.v.ptr as *const c_void,
            cos: rot.map_or(std::ptr::null(), |r| r.cos.ptr as *const c_void),
            sin: rot.map_or(std::ptr::null(), |r| r.sin.ptr as *const c_void),
            k_new_stride: bsh(a.k.strides),
            v_new_stride: bsh(a.v.strides),
            rot_stride: rot.map_or([0; 2], |r| {
                [r.cos.strides[0] as i64, r.cos.strides[1] as i64]
            }),
            seqlen_new: a.seqlen_new as i32,
            rotary_dim: rot.map_or(0, |r| r.rotary_dim as i32),
            seqlen_ro: rot.map_or(0, |r| r.seqlen_ro as i32),
            interleaved: rot.is_some_and(|r| r.interleaved) as i32,
            q_advances: rot.is_some_and(|r| r.q_advances) as i32,
            dtype: dtype_kind(kp.attn.q.dtype),
            dtype_rot: rot.map_or(0, |r| dtype_kind(r.cos.dtype)),
            _pad: 0,
        }
    }
}

impl AppendParams {
    /// The append (and q rotation) of `kp`, writing the rotated q to `q_rot` (null: none).
    pub fn new(kp: &KvCacheProblem, q_rot: *mut c_void) -> Result<AppendParams> {
        let f = FwdParams::new(&kp.attn, 1)?;
        let Some(a) = &kp.append else {
            return Err(Error::new(
                crate::ErrorKind::Internal,
                "AppendParams of a call that appends nothing",
            ));
        };
        Ok(AppendParams {
            // The cache as the attention reads it, and the caller's q (rotated into q_rot).
            f: FwdParams {
                k: a.k_cache.ptr as *const c_void,
                v: a.v_cache.ptr as *const c_void,
                ..f
            },
            rows: AppendRows::new(kp),
            q_rot,
        })
    }
}

impl MergeParams {
    /// One round of `m`: states `first..first + n` (at most MERGE_MAX_STATES), merged into the
    /// output, together with what the output holds already when `running`. `lse` is where the
    /// merged LSE goes (the caller's, or scratch when it wants none and rounds follow).
    pub fn new(m: &MergeProblem, first: usize, n: usize, running: bool, lse: *mut f32) -> Self {
        let empty = MergeState {
            out: std::ptr::null(),
            lse: std::ptr::null(),
            out_stride: [0; 3],
            lse_stride: [0; 3],
            dtype: 0,
            _pad: 0,
        };
        let mut states = [empty; MERGE_MAX_STATES];
        for (slot, (o, l)) in states.iter_mut().zip(&m.states[first..first + n]) {
            *slot = MergeState {
                out: o.ptr as *const c_void,
                lse: l.ptr as *const f32,
                out_stride: bsh(o.strides),
                lse_stride: bsh(l.strides),
                dtype: dtype_kind(o.dtype),
                _pad: 0,
            };
        }
        let lse_stride = match &m.lse {
            Some(l) => bsh(l.strides),
            // Scratch LSE: contiguous [batch, heads, seqlen].
            None => [(m.heads * m.seqlen) as i64, m.seqlen as i64, 1],
        };
        MergeParams {
            states,
            out: m.out.ptr as *mut c_void,
            lse,
            out_stride: bsh(m.out.strides),
            lse_stride,
            num_states: n as i32,
            running: running as i32,
            batch: m.batch as i32,
            seqlen: m.seqlen as i32,
            heads: m.heads as i32,
            head_dim: m.head_dim as i32,
            dtype_out: dtype_kind(m.out.dtype),
            _pad: 0,
        }
    }
}
