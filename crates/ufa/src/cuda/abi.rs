//! The kernel ABI: every parameter block, enum and constant that the host and the CUDA kernels
//! share, declared once here. The header the kernels include (`ufa_abi.cuh`) is generated from
//! these declarations, with a `static_assert` on the size and on every field offset of every
//! struct, so a mismatch fails the NVRTC compile (and CI's compile check) instead of
//! corrupting memory.

use std::ffi::c_void;
use std::fmt::Write;

/// A Rust type as a C declaration of a field named `name`.
pub(crate) trait CField {
    fn c_decl(name: &str) -> String;
}

macro_rules! c_scalar {
    ($($t:ty => $c:literal),* $(,)?) => {
        $(impl CField for $t {
            fn c_decl(name: &str) -> String {
                format!("{} {name}", $c)
            }
        })*
    };
}

c_scalar! {
    i32 => "int32_t",
    u32 => "uint32_t",
    i64 => "int64_t",
    u64 => "uint64_t",
    f32 => "float",
    *const c_void => "const void*",
    *mut c_void => "void*",
    *const f32 => "const float*",
    *mut f32 => "float*",
    *const i32 => "const int32_t*",
    *mut i32 => "int32_t*",
}

impl<T: CField, const N: usize> CField for [T; N] {
    fn c_decl(name: &str) -> String {
        T::c_decl(&format!("{name}[{N}]"))
    }
}

/// A `#[repr(C)]` struct the kernels read, with its generated C definition.
pub(crate) trait KernelStruct {
    /// The fields, in order.
    #[cfg(test)]
    const FIELDS: &'static [&'static str];
    fn c_definition() -> String;
}

/// Declares a kernel parameter struct: the Rust `#[repr(C)]` struct, and its C definition with
/// its doc comments and a `static_assert` on its size and on the offset of each field.
macro_rules! kernel_struct {
    (
        $(#[doc = $doc:literal])*
        $(#[align($align:literal)])?
        pub(crate) struct $name:ident {
            $( $(#[doc = $fdoc:literal])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[doc = $doc])*
        #[repr(C $(, align($align))?)]
        #[derive(Clone, Copy, Debug)]
        pub(crate) struct $name {
            $( $(#[doc = $fdoc])* pub $field: $ty, )*
        }

        impl CField for $name {
            fn c_decl(name: &str) -> String {
                format!("{} {name}", stringify!($name))
            }
        }

        impl KernelStruct for $name {
            #[cfg(test)]
            const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];

            fn c_definition() -> String {
                let name = stringify!($name);
                let mut s = String::new();
                $( let _ = writeln!(s, "//{}", $doc); )*
                let align: &str = concat!("" $(, "alignas(", $align, ") ")?);
                let _ = writeln!(s, "struct {align}{name} {{");
                $(
                    $( let _ = writeln!(s, "    //{}", $fdoc); )*
                    let _ = writeln!(s, "    {};", <$ty as CField>::c_decl(stringify!($field)));
                )*
                let _ = writeln!(s, "}};");
                let _ = writeln!(
                    s,
                    "static_assert(sizeof({name}) == {}, \"{name}: size differs from src/cuda/abi.rs\");",
                    std::mem::size_of::<$name>()
                );
                $(
                    let _ = writeln!(
                        s,
                        "static_assert(UFA_OFFSETOF({name}, {f}) == {}, \"{name}::{f}: offset differs from src/cuda/abi.rs\");",
                        std::mem::offset_of!($name, $field),
                        f = stringify!($field),
                    );
                )*
                s
            }
        }
    };
}

/// Declares an enum the kernels switch on: a `#[repr(i32)]` Rust enum and the C enum, each
/// variant with its C name and value.
macro_rules! kernel_enum {
    (
        $(#[doc = $doc:literal])*
        pub(crate) enum $name:ident {
            $( $(#[doc = $vdoc:literal])* $variant:ident = $c:ident = $value:literal, )*
        }
    ) => {
        $(#[doc = $doc])*
        #[repr(i32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum $name {
            $( $(#[doc = $vdoc])* $variant = $value, )*
        }

        impl $name {
            fn c_definition() -> String {
                let mut s = String::new();
                $( let _ = writeln!(s, "//{}", $doc); )*
                let _ = writeln!(s, "enum {} {{", stringify!($name));
                $( let _ = writeln!(s, "    {} = {},", stringify!($c), $value); )*
                let _ = writeln!(s, "}};");
                s
            }
        }
    };
}

/// Declares constants the kernels size arrays and loops with: the Rust `const` and a C
/// `constexpr int`.
macro_rules! kernel_consts {
    ( $( $(#[doc = $doc:literal])* $name:ident : $t:ty = $value:expr => $c:literal; )* ) => {
        $( $(#[doc = $doc])* pub(crate) const $name: $t = $value; )*

        fn consts_c_definition() -> String {
            let mut s = String::new();
            $(
                $( let _ = writeln!(s, "//{}", $doc); )*
                let _ = writeln!(s, "constexpr int {} = {};", $c, $name);
            )*
            s
        }
    };
}

kernel_consts! {
    /// Warps (each one query row) of the CUDA-core forward kernel's blocks.
    SIMPLE_WARPS: u32 = 4 => "kSimpleWarps";
    /// Warps of the backward's row kernels' blocks.
    ROW_WARPS: u32 = 4 => "kRowWarps";
    /// Rows a block of the backward's streaming row kernels (row statistics, dQ conversion)
    /// takes, with `ROW_WARPS` warps: a row's share of a warp is 8 threads.
    STREAM_ROWS: u32 = 16 => "kStreamRows";
    /// The largest head dim (of Q/K and of V); the row kernels size their buffers by it.
    MAX_HEAD_DIM: usize = crate::problem::MAX_HEAD_DIM => "kMaxHeadDim";
    /// The backward's LSE and D rows are padded to a multiple of this, so that every query
    /// block's loads stay in bounds (in a packed batch, every sequence's rows are).
    SEQLEN_Q_PAD: usize = 128 => "kSeqlenQPad";
    /// States one launch of the merge kernel reads (more are merged in rounds).
    MERGE_MAX_STATES: usize = 8 => "kMergeMaxStates";
    /// The most key splits of a decoding call (its combine kernel keeps a weight per split).
    DECODE_MAX_SPLITS: usize = 128 => "kDecodeMaxSplits";
    /// The most key splits a decoding call merges within one thread-block cluster (sm_90+):
    /// the portable cluster size, which every GPU with clusters schedules.
    DECODE_CLUSTER_MAX: usize = 8 => "kDecodeClusterMax";
}

kernel_enum! {
    /// How `FwdParams::mask` is read.
    pub(crate) enum MaskKind {
        None = MASK_NONE = 0,
        Bool = MASK_BOOL = 1,
        F16 = MASK_F16 = 2,
        BF16 = MASK_BF16 = 3,
        F32 = MASK_F32 = 4,
    }
}

kernel_enum! {
    /// Element types chosen at run time, for the memory-bound kernels where a template per
    /// combination of dtypes would buy nothing.
    pub(crate) enum DTypeKind {
        F32 = DT_F32 = 0,
        F16 = DT_F16 = 1,
        BF16 = DT_BF16 = 2,
    }
}

kernel_enum! {
    /// How the tensor-core backward kernels order their dQ adds (`BwdParams::deterministic`).
    pub(crate) enum DqOrder {
        /// Atomic adds in whatever order the blocks run: the fast mode.
        Any = DQ_ANY = 0,
        /// Deterministic: the key blocks of a query block add in descending order, taking
        /// turns. Every key block starts its walk at its first query block, so without a
        /// causal band the blocks queue there at the start (block j waits for j adds before
        /// its first).
        Turns = DQ_TURNS = 1,
        /// Deterministic, each key block's walk rotated to start at a different query block,
        /// and the turns in the order the walks reach a query block: no queue at the start.
        /// Only where every key block sees every query block (no causal or window band), and
        /// where all the key blocks of one (batch, KV head) fit on the device at once with
        /// room to spare: the turn order of a query block may begin at a block launched after
        /// blocks that wait for it.
        RotatedTurns = DQ_ROTATED = 2,
    }
}

kernel_struct! {
    /// The forward kernels' parameter block. Strides are in elements of each tensor's dtype.
    /// A packed batch has batch stride 0 and its rows from `cu_seqlens_*`; a paged cache has
    /// the page stride as batch stride and its rows from `block_table`.
    pub(crate) struct FwdParams {
        pub q: *const c_void,
        pub k: *const c_void,
        pub v: *const c_void,
        pub out: *mut c_void,
        /// Null: not requested.
        pub lse: *mut f32,
        /// Null: no ALiBi.
        pub alibi: *const f32,
        /// Null: no mask.
        pub mask: *const c_void,
        /// Packed batches: sequence b's query rows start at row cu_seqlens_q[b] (null: dense).
        pub cu_seqlens_q: *const i32,
        /// Packed batches: sequence b's keys start at row cu_seqlens_k[b] (null: dense).
        pub cu_seqlens_k: *const i32,
        /// Sequence b has seqused_k[b] + seqused_add keys (null: its cu_seqlens_k length, or
        /// seqlen_kv).
        pub seqused_k: *const i32,
        /// Paged caches: key j of sequence b is in page block_table[b][j >> page_shift].
        pub block_table: *const i32,
        /// Dense caches read by index: sequence b's keys are entry kv_batch_idx[b].
        pub kv_batch_idx: *const i32,
        /// Batch, row, head.
        pub q_stride: [i64; 3],
        pub k_stride: [i64; 3],
        pub v_stride: [i64; 3],
        pub o_stride: [i64; 3],
        /// Batch, head, row.
        pub lse_stride: [i64; 3],
        /// Batch, head.
        pub alibi_stride: [i64; 2],
        /// Batch, head, query, key (0 where broadcast).
        pub mask_stride: [i64; 4],
        pub block_table_stride: i64,
        /// Rows of packed q and out, and of packed k and v: what cu_seqlens are clamped to.
        pub rows_q: i64,
        pub rows_kv: i64,
        /// Pages of a paged cache, or entries of a dense one: what indices are checked against.
        pub kv_entries: i64,
        pub batch: i32,
        /// Dense batches: every sequence's lengths; otherwise the largest any sequence may have
        /// (lengths read from device memory are clamped to them).
        pub seqlen_q: i32,
        pub seqlen_kv: i32,
        pub heads_q: i32,
        /// heads_q / heads_kv.
        pub group: i32,
        pub head_dim: i32,
        pub head_dim_v: i32,
        /// Added to seqused_k[b] (the keys a KV-cache call appends).
        pub seqused_add: i32,
        /// log2 of the page size.
        pub page_shift: i32,
        /// Nonzero: query i is aligned with key i; zero: with key i + seqlen_kv - seqlen_q.
        pub top_left: i32,
        /// Keys visible around the aligned position c: [c - left, c + right]; large = unbounded.
        pub window_left: i32,
        pub window_right: i32,
        pub scale: f32,
        /// scale * log2(e): scores live in the log2 domain so exp2 is one MUFU op.
        pub scale_log2: f32,
        /// 0 = off.
        pub softcap: f32,
        /// MaskKind.
        pub mask_kind: i32,
        pub num_m_blocks: i32,
        /// Dropout (kernels/dropout.cuh, from crate::dropout): the generator's key and counter
        /// word 3, the largest word that keeps a probability, and the factor a kept one gets
        /// (1 / (1 - p); 0: the call has no dropout).
        pub dropout_key: [u32; 2],
        pub dropout_offset: u32,
        pub dropout_keep_max: u32,
        pub dropout_scale: f32,
    }
}

kernel_struct! {
    /// The decoding kernels' parameter block (kernels/fwd_decode.cu): the forward's, and the
    /// partial states of the key splits.
    pub(crate) struct DecodeParams {
        pub f: FwdParams,
        /// Each split's normalised output, fp32 [num_splits, batch, heads_q, seqlen_q,
        /// head_dim_v], and its LSE (natural log, -inf: no visible key) [num_splits, batch,
        /// heads_q, seqlen_q]; null with one split (the blocks write the output) or a merge
        /// within clusters.
        pub o_part: *mut f32,
        pub lse_part: *mut f32,
        pub num_splits: i32,
        /// Blocks of packed rows (query rows x query heads of one KV head) per (batch entry,
        /// KV head).
        pub row_blocks: i32,
        /// DTypeKind of the output (the combine kernel's stores).
        pub dtype_out: i32,
        /// Nonzero: the splits of a (batch entry, KV head, row block) are one thread-block
        /// cluster and merge in distributed shared memory (o_part and lse_part unused).
        pub cluster_merge: i32,
        /// A KV-cache call's new rows, written into the cache by the blocks that read them
        /// (and q rotated as it is loaded) in the same launch (k_new null: none; kernels with
        /// sequence metadata only).
        pub append: AppendRows,
    }
}

kernel_struct! {
    /// The backward kernels' parameter block. `f` describes the forward (its `out` and `lse`
    /// are inputs here); the workspace arrays are ufa's own, allocated per call on the caller's
    /// stream.
    pub(crate) struct BwdParams {
        pub f: FwdParams,
        pub dout: *const c_void,
        pub dq: *mut c_void,
        pub dk: *mut c_void,
        pub dv: *mut c_void,
        /// LSE in the log2 domain, +inf for rows that see no key (so exp2(s - lse2) = 0) and
        /// past each sequence's end, up to a multiple of kSeqlenQPad.
        pub lse2: *mut f32,
        /// rowsum(dO * O), laid out as lse2, 0 past each sequence's end.
        pub delta: *mut f32,
        /// dQ in fp32, tensor-core path only.
        pub dq_accum: *mut f32,
        /// [batch, heads_q, num_m_blocks] turn counters, deterministic mode only.
        pub order: *mut i32,
        /// Batch, row, head.
        pub do_stride: [i64; 3],
        pub dq_stride: [i64; 3],
        pub dk_stride: [i64; 3],
        pub dv_stride: [i64; 3],
        /// Batch and head strides of lse2/delta (floats); a sequence's rows start at 0 in a
        /// dense batch, at cu_seqlens_q[b] + kSeqlenQPad * b in a packed one.
        pub stat_stride: [i64; 2],
        /// Batch and head strides of dq_accum (floats); rows of head_dim floats, a sequence's
        /// starting at 0 (dense) or cu_seqlens_q[b] (packed).
        pub accum_stride: [i64; 2],
        /// Rows of each (batch, head) of lse2/delta in a dense batch: seqlen_q padded.
        pub seqlen_q_pad: i32,
        /// Query rows per tensor-core m-block (turn counters are per block).
        pub block_m: i32,
        pub num_m_blocks: i32,
        /// DqOrder.
        pub deterministic: i32,
        /// DTypeKind of each tensor.
        pub dtype_out: i32,
        pub dtype_dout: i32,
        pub dtype_dq: i32,
        pub dtype_dk: i32,
        pub dtype_dv: i32,
        pub dtype_in: i32,
    }
}

kernel_struct! {
    /// An encoded `CUtensorMap` (the hardware wants 64-byte alignment; the driver's own type
    /// asks for 128 under CUDA 13, which the kernel's parameter layout does not need).
    #[align(64)]
    pub(crate) struct TmaMap {
        pub opaque: [u64; 16],
    }
}

kernel_struct! {
    /// The Hopper backward's parameter block: BwdParams and the tensor maps of Q, dO, K, V
    /// ([batch, heads, seq, head_dim] boxes of 64 columns, 128-byte swizzle) and of the fp32 dQ
    /// buffer ([batch x heads_q, seqlen_q, head_dim] boxes of 32 columns).
    pub(crate) struct BwdSm90Params {
        pub bp: BwdParams,
        pub q: TmaMap,
        pub dout: TmaMap,
        pub k: TmaMap,
        pub v: TmaMap,
        pub dq: TmaMap,
    }
}

kernel_struct! {
    /// The warp-specialised Hopper forward's parameter block (kernels/fwd_sm90_tma.cu):
    /// FwdParams and the tensor maps of Q, K and V ([batch, heads, seq, head_dim] boxes of 64
    /// columns and the tile's rows, 128-byte swizzle).
    pub(crate) struct FwdSm90Params {
        pub f: FwdParams,
        pub q: TmaMap,
        pub k: TmaMap,
        pub v: TmaMap,
    }
}

kernel_struct! {
    /// A KV-cache call's new keys and values (rotated when rotary tables are given), written
    /// at each sequence's length, and the rotation of its q (kernels/append.cuh).
    pub(crate) struct AppendRows {
        /// [batch, seqlen_new, heads_kv, dim]; null when nothing is appended.
        pub k_new: *const c_void,
        pub v_new: *const c_void,
        /// [seqlen_ro, rotary_dim / 2] (null: no rotary embedding).
        pub cos: *const c_void,
        pub sin: *const c_void,
        /// Batch, row, head.
        pub k_new_stride: [i64; 3],
        pub v_new_stride: [i64; 3],
        /// Row, column.
        pub rot_stride: [i64; 2],
        pub seqlen_new: i32,
        pub rotary_dim: i32,
        pub seqlen_ro: i32,
        pub interleaved: i32,
        /// Nonzero: q row i is at position seqlens[b] + i; zero: at seqlens[b].
        pub q_advances: i32,
        /// DTypeKind of the cache (and k_new, v_new, q) and of the tables.
        pub dtype: i32,
        pub dtype_rot: i32,
        pub _pad: i32,
    }
}

kernel_struct! {
    /// The KV cache's append kernels (kernels/kvcache.cu), where the attention runs as a
    /// second launch: `f` describes the cache as the attention reads it (k and v its cache,
    /// seqused_k its lengths, block_table or kv_batch_idx).
    pub(crate) struct AppendParams {
        pub f: FwdParams,
        pub rows: AppendRows,
        /// Contiguous [batch, seqlen_q, heads_q, head_dim]: the rotated q (null: none).
        pub q_rot: *mut c_void,
    }
}

kernel_struct! {
    /// One state of a merge: its output [batch, seq, heads, dim] and f32 LSE [batch, heads,
    /// seq].
    pub(crate) struct MergeState {
        pub out: *const c_void,
        pub lse: *const f32,
        /// Batch, row, head.
        pub out_stride: [i64; 3],
        /// Batch, head, row.
        pub lse_stride: [i64; 3],
        /// DTypeKind.
        pub dtype: i32,
        pub _pad: i32,
    }
}

kernel_struct! {
    /// A merge of up to kMergeMaxStates states (and, when `running` is set, of the output's
    /// current contents as one more: larger merges run in rounds).
    pub(crate) struct MergeParams {
        pub states: [MergeState; MERGE_MAX_STATES],
        pub out: *mut c_void,
        /// Null: not requested (then a running merge keeps its LSE in `lse_scratch`).
        pub lse: *mut f32,
        pub out_stride: [i64; 3],
        pub lse_stride: [i64; 3],
        pub num_states: i32,
        /// Nonzero: the output (with the LSE in `lse`) is merged in as one more state.
        pub running: i32,
        pub batch: i32,
        pub seqlen: i32,
        pub heads: i32,
        pub head_dim: i32,
        /// DTypeKind of the output.
        pub dtype_out: i32,
        pub _pad: i32,
    }
}

/// The generated header every kernel includes.
pub(crate) fn header() -> String {
    let mut s = String::from(
        "// Generated at run time from crates/ufa/src/cuda/abi.rs: the kernel ABI shared with\n\
         // the host. Do not edit; change the Rust declarations.\n\
         #pragma once\n\
         typedef unsigned char uint8_t;\n\
         typedef unsigned short uint16_t;\n\
         typedef unsigned int uint32_t;\n\
         typedef int int32_t;\n\
         typedef long long int64_t;\n\
         typedef unsigned long long uint64_t;\n\n\
         // A field's offset as a constant expression: NVRTC has __builtin_offsetof from 13.4,\n\
         // and __INTADDR__ (which makes the classic null-pointer form constant) before.\n\
         #if __CUDACC_VER_MAJOR__ > 13 || (__CUDACC_VER_MAJOR__ == 13 && __CUDACC_VER_MINOR__ >= 4)\n\
         #define UFA_OFFSETOF(T, f) __builtin_offsetof(T, f)\n\
         #else\n\
         #define UFA_OFFSETOF(T, f) ((unsigned long long)__INTADDR__(&((T*)0)->f))\n\
         #endif\n\n",
    );
    for part in [
        consts_c_definition(),
        MaskKind::c_definition(),
        DTypeKind::c_definition(),
        DqOrder::c_definition(),
        FwdParams::c_definition(),
        AppendRows::c_definition(),
        DecodeParams::c_definition(),
        BwdParams::c_definition(),
        TmaMap::c_definition(),
        BwdSm90Params::c_definition(),
        FwdSm90Params::c_definition(),
        AppendParams::c_definition(),
        MergeState::c_definition(),
        MergeParams::c_definition(),
    ] {
        s += &part;
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_asserts_every_offset() {
        let h = header();
        assert!(h.contains("struct FwdParams {"));
        assert!(h.contains("    int64_t q_stride[3];"));
        assert!(h.contains("    MergeState states[8];"));
        assert!(h.contains("struct alignas(64) TmaMap {"));
        assert!(h.contains(&format!(
            "static_assert(UFA_OFFSETOF(FwdParams, num_m_blocks) == {}",
            std::mem::offset_of!(FwdParams, num_m_blocks)
        )));
        assert!(h.contains("    DQ_ROTATED = 2,"));
        assert!(h.contains("constexpr int kMaxHeadDim = 512;"));
        // One offset assertion per field of every struct.
        for (name, fields) in [
            ("FwdParams", FwdParams::FIELDS),
            ("DecodeParams", DecodeParams::FIELDS),
            ("BwdParams", BwdParams::FIELDS),
            ("BwdSm90Params", BwdSm90Params::FIELDS),
            ("FwdSm90Params", FwdSm90Params::FIELDS),
            ("AppendRows", AppendRows::FIELDS),
            ("AppendParams", AppendParams::FIELDS),
            ("MergeParams", MergeParams::FIELDS),
        ] {
            for f in fields {
                assert!(
                    h.contains(&format!("UFA_OFFSETOF({name}, {f}) ==")),
                    "{name}::{f}"
                );
            }
        }
        assert_eq!(FwdParams::FIELDS.len(), 44);
    }
}
