//! The variant catalogue: which kernel runs a problem, with which tiles, and the program NVRTC
//! compiles for it. A variant is named after its kernel file (`FwdSm80` ↔ kernels/fwd_sm80.cu,
//! entry `ufa_fwd_sm80_...`). Every variant is a template instance whose `extern "C"` entry
//! point is generated here at run time (one module per variant), so the repository holds only
//! the templates. To add one: a kernel file (registered in sources.rs), a `Variant` arm here
//! (name, threads, shared memory, program, `all`), and its selection.

use super::abi::{ROW_WARPS, SIMPLE_WARPS, STREAM_ROWS};
use super::decode::DecodeTile;
use super::sm90::{self, TmaFwdTile, WgmmaBwdTile, WgmmaTile};
use super::sm90_f32::{self, F32WgmmaTile};
use super::sources::Program;
use super::tiles::{mma_tile_head_dim_pair, tile_for, BwdTile, Tile};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::params::Fp32Precision;
use crate::problem::{Operand, Problem};
use crate::sequences::RowMap;
use std::borrow::Cow;

/// A kernel variant: what gets compiled into one module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Variant {
    /// The forward on tensor cores (mma.sync, sm_80+); `score_mod` adds softcap, ALiBi, masks
    /// and non-positive scales to the inner loop; `seqs` reads sequence metadata (packed
    /// batches, per-sequence key counts, caches read through an index or a block table).
    /// fp32 runs on TF32 tensor cores: three products per product, or one with `tf32`
    /// (Fp32Precision::Tf32). `dropout`: the probabilities are dropped (kernels/dropout.cuh).
    FwdSm80 {
        dtype: DType,
        tile: Tile,
        score_mod: bool,
        seqs: bool,
        tf32: bool,
        dropout: bool,
    },
    /// The forward on Hopper tensor cores (wgmma, sm_90a); flags as for `FwdSm80`, and
    /// `paged` (with `seqs`): K and V are read through a block table, a compile-time choice
    /// here because its loads cost the other variants registers (spills) and occupancy.
    FwdSm90 {
        dtype: DType,
        tile: WgmmaTile,
        score_mod: bool,
        seqs: bool,
        paged: bool,
        dropout: bool,
    },
    /// The fp32 forward on Hopper tensor cores (wgmma TF32, kernels/fwd_sm90_f32.cu): three
    /// products a product, or one with `tf32`; flags as for `FwdSm80` (which of them it serves:
    /// [`sm90_f32::f32_wgmma_tile_for`]).
    FwdSm90F32 {
        tile: F32WgmmaTile,
        tf32: bool,
        score_mod: bool,
        seqs: bool,
        dropout: bool,
    },
    /// The forward on Hopper for dense batches (kernels/fwd_sm90_tma.cu): warp-specialised, K
    /// and V loaded by TMA into a ring, the softmax under the MMAs; flags as for `FwdSm90`.
    FwdSm90Tma {
        dtype: DType,
        tile: TmaFwdTile,
        score_mod: bool,
        dropout: bool,
    },
    /// Decoding (few query rows per KV head, kernels/fwd_decode.cu): packed GQA rows, keys
    /// split across blocks; flags as for `FwdSm90` (`paged` keeps the block-table lookups out
    /// of the other variants' loads: a dense cache read through them ran 1.5x slower).
    FwdDecode {
        dtype: DType,
        tile: DecodeTile,
        score_mod: bool,
        seqs: bool,
        paged: bool,
    },
    /// Merging a decoding call's split partials (dtypes read at run time).
    DecodeCombine,
    /// The forward on CUDA cores: any head dims up to 512, any output dtype, any strides and
    /// key layouts.
    FwdSimple { input: DType, output: DType },
    /// The backward on tensor cores: dK/dV per key block, dQ into an fp32 buffer; flags as
    /// for `FwdSm80`.
    BwdSm80 {
        dtype: DType,
        tile: BwdTile,
        score_mod: bool,
        seqs: bool,
        tf32: bool,
        dropout: bool,
    },
    /// The backward on Hopper tensor cores (wgmma, TMA, warp specialisation), same plan as
    /// `BwdSm80`; dense batches.
    BwdSm90 {
        dtype: DType,
        tile: WgmmaBwdTile,
        score_mod: bool,
        dropout: bool,
    },
    /// One of the backward's row kernels (dtypes read at run time).
    BwdRows(RowKernel),
    /// A KV cache's append and rotary embedding (kernels/kvcache.cu; dtypes read at run time).
    KvAppend(AppendKernel),
    /// Merging attention states (kernels/merge.cu; dtypes read at run time).
    Merge,
}

/// The backward's row kernels (kernels/bwd_rows.cu): the streaming ones `STREAM_ROWS` rows a
/// block, the CUDA-core backward one warp a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum RowKernel {
    /// D = rowsum(dO ∘ O), LSE in log2, workspace zeroing.
    Preprocess,
    /// The fp32 dQ buffer to dQ.
    ConvertDq,
    /// CUDA-core dQ, one warp per query row.
    Dq,
    /// CUDA-core dK and dV, one warp per key row.
    DkDv,
}

impl RowKernel {
    #[cfg(any(test, feature = "testkit"))]
    pub const ALL: [RowKernel; 4] = [
        RowKernel::Preprocess,
        RowKernel::ConvertDq,
        RowKernel::Dq,
        RowKernel::DkDv,
    ];

    fn function(self) -> &'static str {
        match self {
            RowKernel::Preprocess => "bwd_preprocess",
            RowKernel::ConvertDq => "bwd_convert_dq",
            RowKernel::Dq => "bwd_rows_dq",
            RowKernel::DkDv => "bwd_rows_dkdv",
        }
    }

    /// Blocks of the kernel one SM should hold (`__launch_bounds__`, which caps registers):
    /// the streaming kernels are bound by memory and want many threads with loads in flight.
    /// Unbounded, the row statistics took 56 registers, 9 blocks of 128 threads an SM; at 12
    /// blocks (40 registers) they spill nothing and ran at most 35.9 µs a GPT layer on an H100
    /// (measured with a quarter more blocks than rows needed), at 16 (32 registers, 32 bytes
    /// spilled) 39.9 (cuDNN's: 36.0). The CUDA-core backward takes what its registers allow.
    pub fn min_blocks(self) -> u32 {
        match self {
            RowKernel::Preprocess | RowKernel::ConvertDq => 12,
            RowKernel::Dq | RowKernel::DkDv => 1,
        }
    }

    /// Rows (query rows, or key rows for `DkDv`) one block takes.
    pub fn rows_per_block(self) -> u32 {
        match self {
            RowKernel::Preprocess | RowKernel::ConvertDq => STREAM_ROWS,
            RowKernel::Dq | RowKernel::DkDv => ROW_WARPS,
        }
    }
}

/// The KV cache's kernels (kernels/kvcache.cu), one warp per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum AppendKernel {
    /// New keys (rotated) and values into the cache.
    Append,
    /// q rotated into a contiguous copy.
    RotateQ,
}

impl AppendKernel {
    fn function(self) -> &'static str {
        match self {
            AppendKernel::Append => "kv_append",
            AppendKernel::RotateQ => "kv_rotate_q",
        }
    }
}

/// Warps of the append and merge kernels' blocks (one row each).
pub(crate) const ROW_KERNEL_WARPS: u32 = ROW_WARPS;

fn type_tag(d: DType) -> &'static str {
    match d {
        DType::F16 => "Half",
        DType::BF16 => "BFloat16",
        DType::F32 | DType::Bool | DType::I32 => "Float32",
    }
}

impl Variant {
    /// Chooses the forward kernel for `p` on a device with `max_smem` bytes of shared memory a
    /// block; `hopper`: the device runs sm_90a code (wgmma).
    pub fn select(p: &Problem, max_smem: u32, hopper: bool) -> Variant {
        Self::select_with(
            p,
            max_smem,
            hopper,
            sm90::tma_fwd_enabled(),
            sm90::off_tile_enabled(),
        )
    }

    /// [`Variant::select`] with the warp-specialised Hopper forward allowed or not, and taking
    /// head dims off its tile widths as its own or not (`off_tile`, [`sm90::off_tile_enabled`]).
    fn select_with(
        p: &Problem,
        max_smem: u32,
        hopper: bool,
        tma_fwd: bool,
        off_tile: bool,
    ) -> Variant {
        let dtype = p.q.dtype;
        let half = matches!(dtype, DType::F16 | DType::BF16);
        let seqs = has_sequence_metadata(p);
        let score_mod = needs_score_mod(p);
        let dropout = p.dropout.is_some();
        // The tensor-core kernels copy 16-byte pieces of rows; other layouts (odd strides,
        // unaligned views) are rare and take the CUDA-core kernel.
        let tensor_cores =
            (half || dtype == DType::F32) && p.out.dtype == dtype && rows_aligned16(p);
        // The warp-specialised Hopper forward takes V of its own width (MLA's 192/128); the
        // cp.async one equal head dims only.
        let same_dims = p.head_dim == p.head_dim_v;
        if tensor_cores && half && hopper && sm90::wgmma_enabled() {
            if !seqs && tma_fwd && super::tma::forward_maps_possible(p) {
                let long = sm90::WIDE_FWD_MIN_SEQLEN;
                let long_unbanded = !p.has_band() && p.seqlen_q >= long && p.seqlen_kv >= long;
                if let Some(tile) = sm90::tma_head_dims(p.head_dim, p.head_dim_v, off_tile)
                    .and_then(|(d, dv)| {
                        sm90::tma_tile_for(d, dv, score_mod, dropout, long_unbanded, max_smem)
                    })
                {
                    return Variant::FwdSm90Tma {
                        dtype,
                        tile,
                        score_mod,
                        dropout,
                    };
                }
            }
            let paged = p.k.rows.is_paged();
            if let Some(tile) =
                sm90::wgmma_tile_for(p.head_dim, score_mod, paged, dropout, max_smem)
                    .filter(|_| same_dims)
            {
                return Variant::FwdSm90 {
                    dtype,
                    tile,
                    score_mod,
                    seqs,
                    paged,
                    dropout,
                };
            }
        }
        if tensor_cores && dtype == DType::F32 && hopper && sm90::wgmma_enabled() && same_dims {
            if let Some(tile) = sm90_f32::f32_wgmma_tile_for(p.head_dim, seqs, dropout, max_smem) {
                return Variant::FwdSm90F32 {
                    tile,
                    tf32: rounds_to_tf32(p),
                    score_mod,
                    seqs,
                    dropout,
                };
            }
        }
        let bytes = dtype.size_in_bytes();
        let tile = mma_tile_head_dim_pair(p.head_dim, p.head_dim_v, bytes)
            .filter(|_| tensor_cores)
            .and_then(|d| tile_for(d, bytes as u32, score_mod, max_smem));
        match tile {
            Some(tile) => Variant::FwdSm80 {
                dtype,
                tile,
                score_mod,
                seqs,
                tf32: rounds_to_tf32(p),
                dropout,
            },
            None => Variant::FwdSimple {
                input: dtype,
                output: p.out.dtype,
            },
        }
    }

    /// The `extern "C"` name of the variant's kernel; unique per variant.
    pub fn kernel_name(&self) -> String {
        let flags = |score_mod: bool, seqs: bool| {
            format!(
                "{}{}",
                if score_mod { "_mod" } else { "" },
                if seqs { "_seqs" } else { "" }
            )
        };
        match *self {
            Variant::FwdSm80 {
                dtype,
                tile: t,
                score_mod,
                seqs,
                tf32,
                dropout,
            } => format!(
                "ufa_fwd_sm80_{}_d{}_m{}_n{}_w{}_b{}{}{}{}",
                if tf32 {
                    "tf32".to_string()
                } else {
                    dtype.to_string()
                },
                t.head_dim,
                t.block_m,
                t.block_n,
                t.warps,
                t.min_blocks,
                if t.q_in_regs { "_qreg" } else { "" },
                flags(score_mod, seqs),
                if dropout { "_drop" } else { "" }
            ),
            Variant::FwdSm90 {
                dtype,
                tile: t,
                score_mod,
                seqs,
                paged,
                dropout,
            } => format!(
                "ufa_fwd_sm90_{dtype}_d{}_m{}_n{}_s{}_b{}{}{}{}",
                t.head_dim,
                t.block_m,
                t.block_n,
                t.stages,
                t.min_blocks,
                flags(score_mod, seqs),
                if paged { "_paged" } else { "" },
                if dropout { "_drop" } else { "" }
            ),
            Variant::FwdSm90F32 {
                tile: t,
                tf32,
                score_mod,
                seqs,
                dropout,
            } => format!(
                "ufa_fwd_sm90_{}_d{}_m{}_n{}{}{}",
                if tf32 { "tf32" } else { "f32" },
                t.head_dim,
                t.block_m,
                t.block_n,
                flags(score_mod, seqs),
                if dropout { "_drop" } else { "" }
            ),
            Variant::FwdSm90Tma {
                dtype,
                tile: t,
                score_mod,
                dropout,
            } => format!(
                "ufa_fwd_sm90_tma_{dtype}_d{}{}_m{}_n{}_s{}{}{}{}{}",
                t.head_dim,
                if t.head_dim_v != t.head_dim {
                    format!("_v{}", t.head_dim_v)
                } else {
                    String::new()
                },
                t.block_m,
                t.block_n,
                t.stages,
                if t.pingpong { "_pp" } else { "" },
                if t.persistent { "_pers" } else { "" },
                flags(score_mod, false),
                if dropout { "_drop" } else { "" }
            ),
            Variant::FwdDecode {
                dtype,
                tile: t,
                score_mod,
                seqs,
                paged,
            } => format!(
                "ufa_fwd_decode_{dtype}_d{}_m{}_w{}_n{}_s{}{}{}{}",
                t.head_dim,
                t.m_tiles,
                t.warps,
                t.block_n,
                t.stages,
                if t.q_in_regs { "_qreg" } else { "" },
                flags(score_mod, seqs),
                if paged { "_paged" } else { "" }
            ),
            Variant::DecodeCombine => "ufa_decode_combine".into(),
            Variant::FwdSimple { input, output } => format!("ufa_fwd_simple_{input}_{output}"),
            Variant::BwdSm80 {
                dtype,
                tile: t,
                score_mod,
                seqs,
                tf32,
                dropout,
            } => format!(
                "ufa_bwd_sm80_{}_d{}_m{}_n{}_w{}_s{}_g{}{}{}_b{}{}{}",
                if tf32 {
                    "tf32".to_string()
                } else {
                    dtype.to_string()
                },
                t.head_dim,
                t.block_m,
                t.block_n,
                t.warps,
                t.stages,
                t.grid_rows[0],
                t.grid_rows[1],
                t.grid_rows[2],
                t.min_blocks,
                flags(score_mod, seqs),
                if dropout { "_drop" } else { "" }
            ),
            Variant::BwdSm90 {
                dtype,
                tile: t,
                score_mod,
                dropout,
            } => format!(
                "ufa_bwd_sm90_{dtype}_d{}_m{}_n{}_b{}{}{}",
                t.head_dim,
                t.block_m,
                t.block_n,
                t.min_blocks,
                flags(score_mod, false),
                if dropout { "_drop" } else { "" }
            ),
            Variant::BwdRows(k) => format!("ufa_{}", k.function()),
            Variant::KvAppend(k) => format!("ufa_{}", k.function()),
            Variant::Merge => "ufa_merge_states".into(),
        }
    }

    pub fn threads(&self) -> u32 {
        match self {
            Variant::FwdSm80 { tile, .. } => tile.warps * 32,
            Variant::FwdSm90 { tile, .. } => tile.threads(),
            Variant::FwdSm90F32 { tile, .. } => tile.threads(),
            Variant::FwdSm90Tma { tile, .. } => tile.threads(),
            Variant::FwdDecode { tile, .. } => tile.warps * 32,
            Variant::DecodeCombine => ROW_KERNEL_WARPS * 32,
            Variant::FwdSimple { .. } => SIMPLE_WARPS * 32,
            Variant::BwdSm80 { tile, .. } => tile.warps * 32,
            Variant::BwdSm90 { tile, .. } => tile.threads(),
            Variant::BwdRows(_) => ROW_WARPS * 32,
            Variant::KvAppend(_) | Variant::Merge => ROW_KERNEL_WARPS * 32,
        }
    }

    pub fn dynamic_smem(&self) -> u32 {
        match self {
            Variant::FwdSm80 { tile, .. } => tile.smem_bytes(),
            Variant::FwdSm90 { tile, .. } => tile.smem_bytes(),
            Variant::FwdSm90F32 { tile, tf32, .. } => tile.smem_bytes(!tf32),
            Variant::FwdSm90Tma { tile, .. } => tile.smem_bytes(),
            Variant::FwdDecode { tile, .. } => tile.smem_bytes(),
            Variant::BwdSm80 { tile, .. } => tile.smem_bytes(),
            Variant::BwdSm90 { tile, .. } => tile.smem_bytes(),
            Variant::FwdSimple { .. }
            | Variant::DecodeCombine
            | Variant::BwdRows(_)
            | Variant::KvAppend(_)
            | Variant::Merge => 0,
        }
    }

    /// Rows (query rows for the forward, keys for the backward's tensor-core kernel, query
    /// or key rows for the row kernels) one block computes.
    pub fn rows_per_block(&self) -> u32 {
        match self {
            Variant::FwdSm80 { tile, .. } => tile.block_m,
            Variant::FwdSm90 { tile, .. } => tile.block_m,
            Variant::FwdSm90F32 { tile, .. } => tile.block_m,
            Variant::FwdSm90Tma { tile, .. } => tile.block_m,
            Variant::FwdSimple { .. } => SIMPLE_WARPS,
            Variant::FwdDecode { tile, .. } => tile.rows(),
            Variant::DecodeCombine => ROW_KERNEL_WARPS,
            Variant::BwdSm80 { tile, .. } => tile.block_n,
            Variant::BwdSm90 { tile, .. } => tile.block_n,
            Variant::BwdRows(k) => k.rows_per_block(),
            Variant::KvAppend(_) | Variant::Merge => ROW_KERNEL_WARPS,
        }
    }

    /// Whether this is one of a backward call's kernels.
    pub fn is_backward(&self) -> bool {
        matches!(
            self,
            Variant::BwdSm80 { .. } | Variant::BwdSm90 { .. } | Variant::BwdRows(_)
        )
    }

    /// The declaration of the kernel's one parameter's type. The Hopper backward's holds
    /// tensor maps, which the TMA reads from the parameter space (`__grid_constant__`).
    pub fn params_type(&self) -> &'static str {
        match self {
            Variant::FwdSm80 { .. }
            | Variant::FwdSm90 { .. }
            | Variant::FwdSm90F32 { .. }
            | Variant::FwdSimple { .. } => "const FwdParams",
            Variant::FwdDecode { .. } | Variant::DecodeCombine => "const DecodeParams",
            Variant::BwdSm80 { .. } | Variant::BwdRows(_) => "const BwdParams",
            Variant::FwdSm90Tma { .. } => "const __grid_constant__ FwdSm90Params",
            Variant::BwdSm90 { .. } => "const __grid_constant__ BwdSm90Params",
            Variant::KvAppend(_) => "const AppendParams",
            Variant::Merge => "const MergeParams",
        }
    }

    /// The program of the variant's module: a translation unit that includes its kernel file
    /// and defines the generated entry point, with the headers it reads.
    pub fn program(&self) -> Program {
        let name = self.kernel_name();
        let threads = self.threads();
        let wgmma_ops = |wrappers: String| -> Vec<(&'static str, Cow<'static, str>)> {
            vec![(
                "wgmma_ops.cuh",
                Cow::Owned(format!(
                    "// Generated by crates/ufa/src/cuda/sm90.rs for {name}.\n#pragma once\n\
                     #include \"common.cuh\"\n{wrappers}"
                )),
            )]
        };
        let (file, extra, min_blocks, call) = match *self {
            Variant::FwdSm80 {
                dtype,
                tile: t,
                score_mod,
                seqs,
                tf32,
                dropout,
            } => (
                "fwd_sm80.cu",
                Vec::new(),
                t.min_blocks,
                format!(
                    "fwd_sm80<{}, TileConfig<{}, {}, {}, {}, {}, {}>, {score_mod}, {seqs}, {dropout}>(p)",
                    // fp32 storage, one TF32 product (kernels/common.cuh); set only for fp32.
                    if tf32 { "Tf32" } else { type_tag(dtype) },
                    t.head_dim,
                    t.block_m,
                    t.block_n,
                    t.warps,
                    t.q_in_regs,
                    t.elem_bytes / 2
                ),
            ),
            Variant::FwdSm90 {
                dtype,
                tile: t,
                score_mod,
                seqs,
                paged,
                dropout,
            } => (
                "fwd_sm90.cu",
                wgmma_ops(sm90::wrappers(t.head_dim, t.block_n)),
                t.min_blocks,
                sm90::call(&t, score_mod, seqs, paged, dropout, type_tag(dtype)),
            ),
            Variant::FwdSm90F32 {
                tile: t,
                tf32,
                score_mod,
                seqs,
                dropout,
            } => (
                "fwd_sm90_f32.cu",
                wgmma_ops(sm90_f32::wrappers(&t)),
                1,
                sm90_f32::call(&t, !tf32, score_mod, seqs, dropout),
            ),
            Variant::FwdSm90Tma {
                dtype,
                tile: t,
                score_mod,
                dropout,
            } => (
                "fwd_sm90_tma.cu",
                wgmma_ops(sm90::wrappers(t.head_dim_v, t.block_n)),
                1,
                sm90::tma_call(&t, score_mod, dropout, type_tag(dtype)),
            ),
            Variant::BwdSm90 {
                dtype,
                tile: t,
                score_mod,
                dropout,
            } => (
                "bwd_sm90.cu",
                wgmma_ops(sm90::bwd_wrappers(&t)),
                t.min_blocks,
                sm90::bwd_call(&t, score_mod, dropout, type_tag(dtype)),
            ),
            Variant::FwdDecode {
                dtype,
                tile: t,
                score_mod,
                seqs,
                paged,
            } => (
                "fwd_decode.cu",
                Vec::new(),
                1,
                format!(
                    "fwd_decode<{}, DecodeConfig<{}, {}, {}, {}, {}, {}, {}>, {score_mod}, {seqs}, {paged}>(p)",
                    type_tag(dtype),
                    t.head_dim,
                    t.row_pitch(),
                    t.m_tiles,
                    t.warps,
                    t.block_n,
                    t.stages,
                    t.q_in_regs
                ),
            ),
            Variant::DecodeCombine => ("fwd_decode.cu", Vec::new(), 1, "decode_combine(p)".into()),
            Variant::FwdSimple { input, output } => (
                "fwd_simple.cu",
                Vec::new(),
                1,
                format!("fwd_simple<{}, {}>(p)", type_tag(input), type_tag(output)),
            ),
            Variant::BwdSm80 {
                dtype,
                tile: t,
                score_mod,
                seqs,
                tf32,
                dropout,
            } => (
                "bwd_sm80.cu",
                Vec::new(),
                t.min_blocks,
                format!(
                    "bwd_sm80<{}, BwdTileConfig<{}, {}, {}, {}, {}, {}, {}, {}, {}>, {score_mod}, {seqs}, {dropout}>(p)",
                    if tf32 { "Tf32" } else { type_tag(dtype) },
                    t.head_dim,
                    t.block_m,
                    t.block_n,
                    t.warps,
                    t.stages,
                    t.grid_rows[0],
                    t.grid_rows[1],
                    t.grid_rows[2],
                    t.elem_bytes / 2
                ),
            ),
            Variant::BwdRows(k) => (
                "bwd_rows.cu",
                Vec::new(),
                k.min_blocks(),
                format!("{}(p)", k.function()),
            ),
            Variant::KvAppend(k) => ("kvcache.cu", Vec::new(), 1, format!("{}(p)", k.function())),
            Variant::Merge => ("merge.cu", Vec::new(), 1, "merge_states(p)".into()),
        };
        let params = self.params_type();
        // A backward call's kernels after its first are programmatic dependents on sm_90
        // (mod.rs): each waits for the kernel before it to complete before it touches memory,
        // then lets the next one be scheduled while it runs (no-ops before sm_90).
        let pdl = if self.is_backward() {
            "pdl_wait();\n  pdl_launch_dependents();\n  "
        } else {
            ""
        };
        Program::new(
            format!(
                "#include \"{file}\"\n// generated entry point\nextern \"C\" __global__ void \
                 __launch_bounds__({threads}, {min_blocks}) {name}({params} p) {{\n  {pdl}{call};\n}}\n"
            ),
            extra,
        )
    }

    /// Every variant the library can launch on a device with `max_smem` bytes a block
    /// (`hopper`: with the sm_90a kernels), except the warp-specialised Hopper forward's at
    /// head dims off its tile widths, of which it holds those of known models
    /// ([`sm90::TMA_FWD_OFF_TILE_DIMS`]): the others are the same template with other MMA
    /// extents.
    #[cfg(any(test, feature = "testkit"))]
    pub fn all(max_smem: u32, hopper: bool) -> Vec<Variant> {
        use super::decode::{decode_tile_for, m_tiles_for, DECODE_MAX_ROWS};
        use super::tiles::{bwd_tile_for, mma_head_dims, MMA_HEAD_DIMS};
        let mut v = Vec::new();
        // (score_mod, seqs): plain or general scores, dense batches or sequence metadata.
        let flag_sets = [(false, false), (true, false), (false, true), (true, true)];
        // The tensor-core prefill and backward kernels also come in dropout variants, for each
        // of those (the CUDA-core kernels read it at run time; the decoding kernel has none:
        // calls with dropout take the prefill kernel).
        for dtype in [DType::F16, DType::BF16] {
            for d in sm90::WGMMA_HEAD_DIMS {
                for (score_mod, seqs) in flag_sets {
                    for paged in [false, true].into_iter().filter(|&pg| seqs || !pg) {
                        for dropout in [false, true] {
                            if let Some(tile) =
                                sm90::wgmma_tile_for(d, score_mod, paged, dropout, max_smem)
                                    .filter(|_| hopper)
                            {
                                v.push(Variant::FwdSm90 {
                                    dtype,
                                    tile,
                                    score_mod,
                                    seqs,
                                    paged,
                                    dropout,
                                });
                            }
                        }
                    }
                }
            }
        }
        // The warp-specialised forward: dense batches, the tile widths with every score and
        // dropout flag, and the head dims of known models off them.
        let dims = sm90::WGMMA_HEAD_DIMS
            .map(|d| (d, d, true))
            .into_iter()
            .chain(sm90::TMA_FWD_OFF_TILE_DIMS);
        for dtype in [DType::F16, DType::BF16] {
            for (d, dv, every_flag) in dims.clone() {
                let flags: &[(bool, bool)] = if every_flag {
                    &[(false, false), (false, true), (true, false), (true, true)]
                } else {
                    &[(false, false)]
                };
                for &(score_mod, dropout) in flags {
                    // Long problems without a band may take a tile of their own.
                    let tiles = [false, true].map(|long| {
                        sm90::tma_tile_for(d, dv, score_mod, dropout, long, max_smem)
                            .filter(|_| hopper)
                    });
                    let own_long = tiles[1] != tiles[0];
                    for tile in tiles[0].into_iter().chain(tiles[1].filter(|_| own_long)) {
                        v.push(Variant::FwdSm90Tma {
                            dtype,
                            tile,
                            score_mod,
                            dropout,
                        });
                    }
                }
            }
        }
        // fp32 on Hopper, both precisions, with the flags it serves.
        for d in sm90_f32::F32_WGMMA_HEAD_DIMS {
            for (score_mod, seqs) in flag_sets {
                for (dropout, tf32) in [(false, false), (false, true), (true, false), (true, true)]
                {
                    if let Some(tile) =
                        sm90_f32::f32_wgmma_tile_for(d, seqs, dropout, max_smem).filter(|_| hopper)
                    {
                        v.push(Variant::FwdSm90F32 {
                            tile,
                            tf32,
                            score_mod,
                            seqs,
                            dropout,
                        });
                    }
                }
            }
        }
        // (dtype, tf32): f16, bf16, and fp32 in both precisions.
        let mma_types = [
            (DType::F16, false),
            (DType::BF16, false),
            (DType::F32, false),
            (DType::F32, true),
        ];
        for (dtype, tf32) in mma_types {
            // With the wide head dims in 16-bit types (tiles.rs, WIDE_HEAD_DIMS).
            for d in mma_head_dims(dtype.size_in_bytes()) {
                for (score_mod, seqs) in flag_sets {
                    for dropout in [false, true] {
                        if let Some(tile) =
                            tile_for(d, dtype.size_in_bytes() as u32, score_mod, max_smem)
                        {
                            v.push(Variant::FwdSm80 {
                                dtype,
                                tile,
                                score_mod,
                                seqs,
                                tf32,
                                dropout,
                            });
                        }
                    }
                }
            }
        }
        for dtype in [DType::F16, DType::BF16] {
            for d in MMA_HEAD_DIMS {
                // One m-tile, and two where a block of the most packed rows takes them.
                for m_tiles in 1..=m_tiles_for(DECODE_MAX_ROWS, d) {
                    for (score_mod, seqs) in flag_sets {
                        for paged in [false, true].into_iter().filter(|&pg| seqs || !pg) {
                            if let Some(tile) = decode_tile_for(d, m_tiles, paged, max_smem) {
                                v.push(Variant::FwdDecode {
                                    dtype,
                                    tile,
                                    score_mod,
                                    seqs,
                                    paged,
                                });
                            }
                        }
                    }
                }
            }
        }
        v.push(Variant::DecodeCombine);
        for input in [DType::F32, DType::F16, DType::BF16] {
            for output in [DType::F32, DType::F16, DType::BF16] {
                v.push(Variant::FwdSimple { input, output });
            }
        }
        for (dtype, tf32) in mma_types {
            // With the wide head dims in 16-bit types (tiles.rs, WIDE_HEAD_DIMS).
            for d in mma_head_dims(dtype.size_in_bytes()) {
                for (score_mod, seqs) in flag_sets {
                    for dropout in [false, true] {
                        if let Some(tile) = bwd_tile_for(d, dtype.size_in_bytes() as u32, max_smem)
                        {
                            v.push(Variant::BwdSm80 {
                                dtype,
                                tile,
                                score_mod,
                                seqs,
                                tf32,
                                dropout,
                            });
                        }
                    }
                }
            }
        }
        for dtype in [DType::F16, DType::BF16] {
            for d in sm90::WGMMA_HEAD_DIMS_BWD {
                for (score_mod, dropout) in [false, true]
                    .into_iter()
                    .flat_map(|m| [(m, false), (m, true)])
                {
                    for (deterministic, band) in [false, true]
                        .into_iter()
                        .flat_map(|d| [(d, false), (d, true)])
                    {
                        let Some(tile) =
                            sm90::bwd_tile_for(d, max_smem, deterministic, band).filter(|_| hopper)
                        else {
                            continue;
                        };
                        let variant = Variant::BwdSm90 {
                            dtype,
                            tile,
                            score_mod,
                            dropout,
                        };
                        if !v.contains(&variant) {
                            v.push(variant);
                        }
                    }
                }
            }
        }
        v.extend(RowKernel::ALL.map(Variant::BwdRows));
        v.extend([AppendKernel::Append, AppendKernel::RotateQ].map(Variant::KvAppend));
        v.push(Variant::Merge);
        v
    }

    /// The launch grid of a prefill variant for `p` on a device with `sms` multiprocessors:
    /// (query-row blocks, heads, batch), or the persistent kernel's one block an SM.
    pub fn grid(&self, p: &Problem, sms: u32) -> Result<(u32, u32, u32)> {
        let dense = grid(p.seqlen_q, self.rows_per_block(), p.heads_q, p.batch)?;
        Ok(match self {
            Variant::FwdSm90Tma { tile, .. } => tile.grid(dense, sms),
            _ => dense,
        })
    }
}

/// Whether `p`'s tensor-core products take one TF32 product each (fp32 inputs under
/// `Fp32Precision::Tf32`) rather than three (the `tf32` flag of the mma.sync variants).
pub(crate) fn rounds_to_tf32(p: &Problem) -> bool {
    p.q.dtype == DType::F32 && p.fp32_precision == Fp32Precision::Tf32
}

/// Whether `p`'s forward takes the score-modifying variants: the scores are modified
/// ([`Problem::modifies_scores`]), or the scale is one the plain variants cannot fuse into
/// exp2 (their running maximum is taken before scaling: max(s)·scale = max(s·scale) only for
/// scale > 0). The backward subtracts the stored LSE instead of a running maximum, so for it
/// the scale's sign does not matter.
pub(crate) fn needs_score_mod(p: &Problem) -> bool {
    p.modifies_scores() || p.scale <= 0.0
}

/// Whether `p` reads sequence metadata: a packed batch, per-sequence key counts, or a cache
/// read through an index or a block table (the kernels' SEQS variants).
pub(crate) fn has_sequence_metadata(p: &Problem) -> bool {
    !p.seqs.is_uniform() || !matches!(p.k.rows, RowMap::Strided)
}

/// Grid of blocks of `rows_per_block` rows over `rows`, one block row per head and batch entry.
pub(crate) fn grid(
    rows: usize,
    rows_per_block: u32,
    heads: usize,
    batch: usize,
) -> Result<(u32, u32, u32)> {
    if heads > 65535 || batch > 65535 {
        return Err(Error::unsupported(format!(
            "the CUDA backend launches one block row per head and batch entry, at most 65535 \
             each; got heads={heads} and batch={batch}"
        )));
    }
    let blocks = rows.div_ceil(rows_per_block as usize);
    Ok((blocks as u32, heads as u32, batch as u32))
}

/// Whether every row a tile load or store touches starts 16 bytes after the previous: base
/// pointers aligned, and each stride that matters (its dimension has more than one index) a
/// multiple of 16 bytes.
pub(crate) fn rows_aligned16(p: &Problem) -> bool {
    let (q, kv) = query_and_key_dims(p);
    operands_aligned16(&[(&p.q, q), (&p.k, kv), (&p.v, kv), (&p.out, q)])
}

/// (batch, seqlen, heads) of the query-side and the key-side operands of a dense batch.
pub(crate) fn query_and_key_dims(p: &Problem) -> ([usize; 3], [usize; 3]) {
    (
        [p.batch, p.seqlen_q, p.heads_q],
        [p.batch, p.seqlen_kv, p.heads_kv],
    )
}

/// The (batch, rows, heads) an operand spans in memory, given its problem's (batch, seqlen,
/// heads): a packed operand's rows, a paged cache's pages of rows, a gathered cache's entries.
fn span_dims(o: &Operand, [batch, seqlen, heads]: [usize; 3]) -> [usize; 3] {
    match o.rows {
        RowMap::Strided => [batch, seqlen, heads],
        RowMap::Packed { rows, .. } => [1, rows, heads],
        RowMap::Paged { pages, shift, .. } => [pages, 1 << shift, heads],
        RowMap::Gathered { entries, .. } => [entries, seqlen, heads],
    }
}

/// [`rows_aligned16`] for a list of operands with their problem's (batch, seqlen, heads).
pub(crate) fn operands_aligned16(ops: &[(&Operand, [usize; 3])]) -> bool {
    ops.iter().all(|(o, dims)| {
        let dims = span_dims(o, *dims);
        (o.ptr as usize).is_multiple_of(16)
            && (0..3).all(|i| {
                dims[i] == 1 || (o.strides[i] * o.dtype.size_in_bytes()).is_multiple_of(16)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::validate_forward;
    use crate::{AttentionParams, TensorView, TensorViewMut};
    use half::bf16;

    /// The Hopper forward a bf16 problem [1, 300, 4, d] over keys [1, 500, 2, d] selects with
    /// the warp-specialised kernel allowed (and, checked here, the cp.async or mma.sync one
    /// without it), with K's head stride `k_head_stride` (elements; V is dense).
    fn hopper_forward(d: usize, k_head_stride: usize) -> Variant {
        let q = vec![bf16::ZERO; 300 * 4 * d];
        let kv = vec![bf16::ZERO; 500 * 2 * d];
        let mut out = q.clone();
        let qv = TensorView::new(&q, &[1, 300, 4, d]).unwrap();
        let k = TensorView::with_strides(
            &kv,
            &[1, 500, 2, d],
            &[500 * 2 * d, 2 * d, k_head_stride, 1],
        )
        .unwrap();
        let v = TensorView::new(&kv, &[1, 500, 2, d]).unwrap();
        let o = TensorViewMut::new(&mut out, &[1, 300, 4, d]).unwrap();
        let p = validate_forward(&qv, &k, &v, &o, None, &AttentionParams::default()).unwrap();
        let cp_async = Variant::select_with(&p, 232_448, true, false, true);
        assert!(
            matches!(cp_async, Variant::FwdSm90 { .. } | Variant::FwdSm80 { .. }),
            "d{d}: {cp_async:?}"
        );
        Variant::select_with(&p, 232_448, true, true, true)
    }

    #[test]
    fn long_unbanded_d64_problems_take_three_consumers() {
        let tile_of = |s: usize, d: usize, params: &AttentionParams<'_>| {
            let x = vec![bf16::ZERO; s * 2 * d];
            let mut out = x.clone();
            let v = TensorView::new(&x, &[1, s, 2, d]).unwrap();
            let o = TensorViewMut::new(&mut out, &[1, s, 2, d]).unwrap();
            let p = validate_forward(&v, &v, &v, &o, None, params).unwrap();
            match Variant::select_with(&p, 232_448, true, true, true) {
                Variant::FwdSm90Tma { tile, .. } => (tile.block_m, tile.pingpong),
                other => panic!("{other:?}"),
            }
        };
        let plain = AttentionParams::default();
        let causal = AttentionParams::default().causal(true);
        assert_eq!(tile_of(2048, 64, &plain), (192, false));
        assert_eq!(tile_of(2047, 64, &plain), (128, true));
        assert_eq!(tile_of(2048, 64, &causal), (128, true));
        assert_eq!(tile_of(2048, 128, &plain), (128, true));
    }

    /// fp32 on Hopper takes the wgmma TF32 kernel at head dims 64 and 128 in both precisions;
    /// other head dims and other devices take mma.sync.
    #[test]
    fn fp32_hopper_problems_take_the_wgmma_kernel() {
        let select_with = |d: usize, params: AttentionParams<'_>, hopper: bool| {
            let x = vec![0f32; 100 * 2 * d];
            let mut out = x.clone();
            let v = TensorView::new(&x, &[1, 100, 2, d]).unwrap();
            let o = TensorViewMut::new(&mut out, &[1, 100, 2, d]).unwrap();
            let p = validate_forward(&v, &v, &v, &o, None, &params).unwrap();
            Variant::select(&p, 232_448, hopper)
        };
        let select = |d: usize, precision: Fp32Precision, hopper: bool| {
            select_with(
                d,
                AttentionParams::default().fp32_precision(precision),
                hopper,
            )
        };
        // Dropout (and packed batches) keep mma.sync until the kernel's paths for them run.
        let dropout = AttentionParams::default().dropout(0.1, 1, 0);
        assert!(matches!(
            select_with(64, dropout, true),
            Variant::FwdSm80 { .. }
        ));
        for d in [64, 128] {
            for (precision, tf32_wanted) in
                [(Fp32Precision::Ieee, false), (Fp32Precision::Tf32, true)]
            {
                match select(d, precision, true) {
                    Variant::FwdSm90F32 { tile, tf32, .. } => {
                        assert_eq!((tile.head_dim, tf32), (d as u32, tf32_wanted));
                        let name = select(d, precision, true).kernel_name();
                        let kind = if tf32_wanted { "tf32" } else { "f32" };
                        assert!(
                            name.starts_with(&format!("ufa_fwd_sm90_{kind}_d{d}_")),
                            "{name}"
                        );
                    }
                    other => panic!("d{d}: {other:?}"),
                }
                assert!(matches!(
                    select(d, precision, false),
                    Variant::FwdSm80 { .. }
                ));
            }
        }
        for d in [32, 40, 96, 160, 256] {
            let v = select(d, Fp32Precision::Ieee, true);
            assert!(matches!(v, Variant::FwdSm80 { .. }), "d{d}: {v:?}");
        }
    }

    #[test]
    fn dense_hopper_problems_take_the_warp_specialised_forward_where_maps_fit() {
        for d in sm90::WGMMA_HEAD_DIMS {
            match hopper_forward(d, d) {
                Variant::FwdSm90Tma { tile, .. } => {
                    assert_eq!(
                        Some(tile),
                        sm90::tma_tile_for(d, d, false, false, false, 232_448)
                    );
                    assert!(tile.smem_bytes() <= 232_448);
                }
                other => panic!("d{d}: {other:?}"),
            }
        }
        // K broadcast over its heads (stride 0): no tensor map, so the cp.async kernel.
        assert!(matches!(hopper_forward(128, 0), Variant::FwdSm90 { .. }));
        // Head dims between the wgmma tiles run on the next larger tile width (TMA fills the
        // columns past the head with zeros) with MMAs of the real width; without tensor maps
        // they stay on mma.sync.
        for (d, tile_d) in [
            (16, 64),
            (32, 64),
            (40, 64),
            (48, 64),
            (80, 128),
            (96, 128),
            (160, 192),
            (200, 256),
        ] {
            match hopper_forward(d, d) {
                Variant::FwdSm90Tma { tile, .. } => {
                    assert_eq!(tile.qk_tile_width(), tile_d);
                    assert_eq!(tile.head_dim_v, d as u32);
                }
                other => panic!("d{d}: {other:?}"),
            }
        }
        assert!(matches!(hopper_forward(96, 0), Variant::FwdSm80 { .. }));
    }

    /// The forward a bf16 problem selects with Q/K head dim `d` and V head dim `dv`, on Hopper
    /// or (`hopper` false) an sm_80 device with as much shared memory, head dims off the wgmma
    /// tile widths taken as their own.
    fn forward_with_v_dim(d: usize, dv: usize, hopper: bool) -> Variant {
        forward_with_dims(d, dv, hopper, true)
    }

    /// [`forward_with_v_dim`], `off_tile` given.
    fn forward_with_dims(d: usize, dv: usize, hopper: bool, off_tile: bool) -> Variant {
        let q = vec![bf16::ZERO; 300 * 4 * d];
        let k = vec![bf16::ZERO; 500 * 2 * d];
        let v = vec![bf16::ZERO; 500 * 2 * dv];
        let mut out = vec![bf16::ZERO; 300 * 4 * dv];
        let qv = TensorView::new(&q, &[1, 300, 4, d]).unwrap();
        let kv = TensorView::new(&k, &[1, 500, 2, d]).unwrap();
        let vv = TensorView::new(&v, &[1, 500, 2, dv]).unwrap();
        let o = TensorViewMut::new(&mut out, &[1, 300, 4, dv]).unwrap();
        let p = validate_forward(&qv, &kv, &vv, &o, None, &AttentionParams::default()).unwrap();
        Variant::select_with(&p, 232_448, hopper, true, off_tile)
    }

    /// Without `off_tile` the Hopper forward selects what it did before head dims off the tile
    /// widths were its own: equal head dims above 32 on the whole tile, the rest on mma.sync.
    #[test]
    fn without_off_tile_dims_hopper_keeps_whole_tiles() {
        for (d, dv, tma) in [
            (80, 80, Some((128, 128))),
            (128, 128, Some((128, 128))),
            (40, 40, Some((64, 64))),
            (32, 32, None),
            (192, 128, None),
        ] {
            match (forward_with_dims(d, dv, true, false), tma) {
                (Variant::FwdSm90Tma { tile, .. }, Some(dims)) => {
                    assert_eq!((tile.head_dim as usize, tile.head_dim_v as usize), dims)
                }
                (Variant::FwdSm80 { .. }, None) => {}
                (other, _) => panic!("{d}/{dv}: {other:?}"),
            }
        }
    }

    #[test]
    fn different_qk_and_v_head_dims_run_on_the_larger_ones_mma_tile() {
        for (d, dv, tile_d) in [
            (192, 128, 192),
            (128, 64, 128),
            (64, 128, 128),
            (80, 40, 96),
        ] {
            match forward_with_v_dim(d, dv, false) {
                Variant::FwdSm80 { tile, .. } => assert_eq!(tile.head_dim, tile_d, "{d}/{dv}"),
                other => panic!("{d}/{dv}: {other:?}"),
            }
        }
        // A head dim that does not fill 16-byte pieces (36 bf16 values) cannot be padded.
        for hopper in [false, true] {
            assert!(matches!(
                forward_with_v_dim(128, 36, hopper),
                Variant::FwdSimple { .. }
            ));
            assert!(matches!(
                forward_with_v_dim(300, 128, hopper),
                Variant::FwdSimple { .. }
            ));
        }
    }

    #[test]
    fn head_dims_above_256_take_the_wide_mma_tiles() {
        for hopper in [false, true] {
            for (d, dv, tile_d) in [
                (512, 512, 512),
                (320, 320, 320),
                (264, 264, 320),
                (384, 256, 384),
                (128, 512, 512),
            ] {
                match forward_with_v_dim(d, dv, hopper) {
                    Variant::FwdSm80 { tile, .. } => {
                        assert_eq!(tile.head_dim, tile_d, "{d}/{dv}");
                        assert!(tile.is_wide() && tile.smem_bytes() <= 232_448, "{tile:?}");
                    }
                    other => panic!("{d}/{dv}: {other:?}"),
                }
            }
            // Rows that are not whole 16-byte pieces keep the CUDA-core kernel.
            assert!(matches!(
                forward_with_v_dim(500, 500, hopper),
                Variant::FwdSimple { .. }
            ));
        }
    }

    #[test]
    fn different_qk_and_v_head_dims_take_the_warp_specialised_forward_on_hopper() {
        // Each operand on its own wgmma tile width; the keys a tile follow V's width and the
        // shared memory the two rings take.
        for (d, dv, tile_dims, block_n) in [
            (192, 128, (192, 128), 128),
            (128, 64, (128, 64), 128),
            (64, 128, (64, 128), 128),
            (80, 40, (80, 40), 128),
            (256, 128, (256, 128), 96),
            (64, 256, (64, 256), 80),
        ] {
            match forward_with_v_dim(d, dv, true) {
                Variant::FwdSm90Tma { tile, .. } => {
                    assert_eq!((tile.head_dim, tile.head_dim_v), tile_dims, "{d}/{dv}");
                    assert_eq!(tile.block_n, block_n, "{d}/{dv}");
                    assert!(tile.smem_bytes() <= 232_448, "{d}/{dv}");
                    let name = Variant::FwdSm90Tma {
                        dtype: DType::BF16,
                        tile,
                        score_mod: false,
                        dropout: false,
                    }
                    .kernel_name();
                    assert!(
                        name.contains(&format!("_d{}_v{}_", tile_dims.0, tile_dims.1)),
                        "{name}"
                    );
                }
                other => panic!("{d}/{dv}: {other:?}"),
            }
        }
    }

    #[test]
    fn kernel_names_are_unique_and_appear_in_their_program() {
        let all = Variant::all(232_448, true);
        let mut names: Vec<String> = all.iter().map(|v| v.kernel_name()).collect();
        for v in &all {
            let prog = v.program();
            assert!(prog
                .source
                .contains(&format!("void __launch_bounds__({}", v.threads())));
            assert!(prog
                .source
                .contains(&format!(") {}({} p)", v.kernel_name(), v.params_type())));
            assert!(prog.header("ufa_abi.cuh").is_some());
            // A backward call's kernels after its first are programmatic dependents (mod.rs):
            // each must wait for its predecessor before it touches memory.
            let body = prog.source.split_once("p) {\n").unwrap().1;
            assert_eq!(
                body.starts_with("  pdl_wait();"),
                v.is_backward(),
                "{}",
                v.kernel_name()
            );
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
        // Hopper forward: 2 dtypes × 4 head dims × (plain, general) × (dense, sequences,
        // paged), and the warp-specialised one for dense batches (4 tile widths and MLA's
        // 192/128 with every flag, 4 head dims between the tiles plain, d64's long-problem
        // tile), and fp32's 2 head dims × 2 precisions × (plain, general); sm_80 forward
        // (f16, bf16, fp32 and its TF32 mode) 4 × 7 × 4, and the wide head dims (f16, bf16)
        // 2 × 3 × 4;
        // decoding 2 × (4 head dims × 2 m-tiles + 3 × 1) × 6
        // and its combine; CUDA cores 9; backward on mma.sync as the sm_80 forward, 4 × 7 × 4
        // and 2 × 3 × 4, and on wgmma 2 × (3 + 1 + 1 tiles) × 2; every prefill and backward one with and
        // without dropout; 4 row, 2 append and 1 merge kernels.
        assert_eq!(
            all.len(),
            2 * 4 * 6 * 2
                + 2 * (5 * 2 * 2 + 4 + 1)
                + 2 * 2 * 2
                + 4 * 7 * 4 * 2
                + 2 * 3 * 4 * 2
                + 2 * 11 * 6
                + 1
                + 9
                + 4 * 7 * 4 * 2
                + 2 * 3 * 4 * 2
                + 2 * 5 * 2 * 2
                + 4
                + 2
                + 1
        );
        assert_eq!(
            Variant::all(232_448, false).len(),
            all.len() - 2 * 4 * 6 * 2 - 2 * (5 * 2 * 2 + 4 + 1) - 2 * 2 * 2 - 2 * 5 * 2 * 2
        );
    }
}
