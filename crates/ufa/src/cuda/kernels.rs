//! Which kernel runs a problem, with which tiles, and the text NVRTC compiles for it.
//!
//! Every kernel variant is a template instance; its `extern "C"` wrapper is generated here at
//! run time (one module per variant), so the repository holds only the templates.

use super::wgmma::{self, WgmmaBwdTile, WgmmaTile};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::problem::{Operand, Problem};
use std::borrow::Cow;
use std::ffi::c_void;

pub(crate) const COMMON_SOURCE: &str = include_str!("../../kernels/common.cuh");
pub(crate) const MMA_COMMON_SOURCE: &str = include_str!("../../kernels/mma.cuh");
pub(crate) const MMA_SOURCE: &str = include_str!("../../kernels/flash_fwd.cu");
pub(crate) const SIMPLE_SOURCE: &str = include_str!("../../kernels/attention_simple.cu");
pub(crate) const BWD_MMA_SOURCE: &str = include_str!("../../kernels/flash_bwd.cu");
pub(crate) const BWD_ROWS_SOURCE: &str = include_str!("../../kernels/backward_rows.cu");
pub(crate) const WGMMA_COMMON_SOURCE: &str = include_str!("../../kernels/wgmma.cuh");
pub(crate) const TMA_SOURCE: &str = include_str!("../../kernels/tma.cuh");
pub(crate) const SM90_SOURCE: &str = include_str!("../../kernels/flash_fwd_sm90.cu");
pub(crate) const SM90_BWD_SOURCE: &str = include_str!("../../kernels/flash_bwd_sm90.cu");

/// Head dims the tensor-core kernel is instantiated for (head_dim_v must match).
pub(crate) const MMA_HEAD_DIMS: [usize; 7] = [32, 64, 96, 128, 160, 192, 256];

/// Warps (each 16 query rows) of the CUDA-core kernel's blocks; `kSimpleWarps` in the source.
const SIMPLE_WARPS: u32 = 4;

/// Sequence lengths must stay below this so that band arithmetic (`i + offset ± window`) fits
/// in the kernels' 32-bit integers; windows are clamped to `UNBOUNDED`.
pub(crate) const MAX_SEQLEN: usize = 1 << 28;
const UNBOUNDED: i32 = 1 << 29;

/// Tile sizes of one tensor-core variant; see [`tile_for`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Tile {
    pub head_dim: u32,
    pub block_m: u32,
    pub block_n: u32,
    pub warps: u32,
    pub q_in_regs: bool,
    /// Blocks the compiler should fit on one SM (`__launch_bounds__`), which caps registers.
    pub min_blocks: u32,
}

impl Tile {
    /// Dynamic shared memory: the Q tile and one K and one V tile, rows padded by 8 elements.
    pub fn smem_bytes(&self) -> u32 {
        (self.block_m + 2 * self.block_n) * (self.head_dim + 8) * 2
    }
}

/// Environment variable overriding the tile table for tuning experiments:
/// `block_m,block_n,warps,q_in_regs(0|1),min_blocks`, applied to every tensor-core head dim.
pub const TILE_ENV: &str = "UFA_CUDA_TILE";

/// The tile table (measured on an H100, bf16, seqlen 4096, 2026-11-25; bench/results/gpu_*).
/// - 128 query rows per block: each K/V tile brought into shared memory serves 128 rows.
/// - Head dims up to 128, plain scores: 4 warps of two 16-row m-tiles each, so every K/V
///   fragment read from shared memory feeds two mmas (half the ldmatrix traffic of one m-tile),
///   two blocks an SM. Q stays in registers at 32/64 (+4% there); at 96/128 it would spill.
///   d128: 315 TFLOP/s against 246 with 8 warps of one m-tile.
/// - Larger head dims, and every variant with softcap/ALiBi/mask: 8 warps of one m-tile, one
///   block an SM; two m-tiles of O would not fit in registers (d256 fell to 97 TFLOP/s), and the
///   score-modifying variants would take over 10 s to compile.
/// - 64 keys per tile: S is 32 fp32 registers per m-tile, leaving room for O.
/// - Devices with less shared memory (sm_86/89: 99 KB a block) halve block_m, then block_n.
pub(crate) fn tile_for(head_dim: usize, score_mod: bool, max_smem: u32) -> Option<Tile> {
    if !MMA_HEAD_DIMS.contains(&head_dim) {
        return None;
    }
    let two_m_tiles = head_dim <= 128 && !score_mod;
    let mut tile = match tile_override() {
        Some(t) => Tile {
            head_dim: head_dim as u32,
            ..t
        },
        None => Tile {
            head_dim: head_dim as u32,
            block_m: 128,
            block_n: 64,
            warps: if two_m_tiles { 4 } else { 8 },
            q_in_regs: if two_m_tiles {
                head_dim <= 64
            } else {
                head_dim <= 128
            },
            min_blocks: if two_m_tiles { 2 } else { 1 },
        },
    };
    while tile.smem_bytes() > max_smem {
        if tile.block_m > 64 {
            tile.block_m /= 2;
            tile.warps = (tile.warps / 2).max(1);
        } else if tile.block_n > 32 {
            tile.block_n = 32;
        } else {
            return None;
        }
    }
    Some(tile)
}

fn tile_override() -> Option<Tile> {
    static OVERRIDE: std::sync::OnceLock<Option<Tile>> = std::sync::OnceLock::new();
    *OVERRIDE.get_or_init(|| parse_tile(&std::env::var(TILE_ENV).ok()?))
}

/// Exactly `N` comma-separated unsigned numbers (the tile overrides' format).
pub(crate) fn parse_numbers<const N: usize>(s: &str) -> Option<[u32; N]> {
    let v: Vec<u32> = s
        .split(',')
        .map(|x| x.trim().parse().ok())
        .collect::<Option<_>>()?;
    v.try_into().ok()
}

/// Parses `block_m,block_n,warps,q_in_regs,min_blocks` (head_dim left 0); None if malformed or
/// not a shape the kernel template accepts.
pub(crate) fn parse_tile(s: &str) -> Option<Tile> {
    let [block_m, block_n, warps, q, min_blocks] = parse_numbers(s)?;
    let mt = block_m.checked_div(16 * warps)?;
    let ok = warps > 0
        && (1..=2).contains(&mt)
        && block_m == 16 * warps * mt
        && block_n % 16 == 0
        && block_n > 0;
    ok.then_some(Tile {
        head_dim: 0,
        block_m,
        block_n,
        warps,
        q_in_regs: q != 0,
        min_blocks: min_blocks.max(1),
    })
}

/// A kernel variant: what gets compiled into one module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Variant {
    /// Tensor cores; `score_mod` adds softcap, ALiBi, masks and non-positive scales to the
    /// inner loop.
    Mma {
        dtype: DType,
        tile: Tile,
        score_mod: bool,
    },
    /// Hopper tensor cores (wgmma, sm_90a); `score_mod` as for `Mma`.
    Wgmma {
        dtype: DType,
        tile: WgmmaTile,
        score_mod: bool,
    },
    /// CUDA cores, any head dims up to 512, any output dtype, any strides.
    Simple { input: DType, output: DType },
    /// The backward on tensor cores: dK/dV per key block, dQ into an fp32 buffer.
    BwdMma {
        dtype: DType,
        tile: BwdTile,
        score_mod: bool,
    },
    /// The backward on Hopper tensor cores (wgmma, sm_90a), same plan as `BwdMma`.
    BwdWgmma {
        dtype: DType,
        tile: WgmmaBwdTile,
        score_mod: bool,
    },
    /// One of the backward's row kernels (dtypes read at run time).
    BwdRows(RowKernel),
}

/// The backward's row kernels (kernels/backward_rows.cu), each one warp per row.
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
}

/// Warps of the row kernels' blocks; `kRowWarps` in backward_rows.cu.
pub(crate) const ROW_WARPS: u32 = 4;

/// Tile sizes of one tensor-core backward variant; see [`bwd_tile_for`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct BwdTile {
    pub head_dim: u32,
    /// Query rows per step.
    pub block_m: u32,
    /// Keys per thread block.
    pub block_n: u32,
    pub warps: u32,
    /// Q/dO buffers: 2 overlaps the next query block's loads with this one's math.
    pub stages: u32,
    /// Warp rows of the grids that tile Sᵀ/dPᵀ (keys), dK/dV (keys) and dQ (queries); the
    /// columns are `warps / rows` each (`WN1`, `WN2`, `WQ3` in flash_bwd.cu).
    pub grid_rows: [u32; 3],
    pub min_blocks: u32,
}

impl BwdTile {
    /// Dynamic shared memory: K, V, `stages` × (Q, dO), Pᵀ and dSᵀ (16-bit, rows padded by 8
    /// elements), then fp32 LSE and D per stage; `BwdTileConfig::kSmemElems` in flash_bwd.cu.
    pub fn smem_bytes(&self) -> u32 {
        let pitch = self.head_dim + 8;
        let elems = 2 * self.block_n * pitch
            + self.stages * 2 * self.block_m * pitch
            + 2 * self.block_n * (self.block_m + 8);
        elems * 2 + self.stages * 2 * self.block_m * 4
    }

    /// Whether the kernel template's static_asserts accept this shape.
    pub fn is_valid(&self) -> bool {
        let (m, n, w, d) = (self.block_m, self.block_n, self.warps, self.head_dim);
        // (rows of the output, columns, warp rows of its grid) per phase.
        let grids = [
            (n, m, self.grid_rows[0]),
            (n, d, self.grid_rows[1]),
            (m, d, self.grid_rows[2]),
        ];
        let fits = |(rows, cols, wr): (u32, u32, u32)| {
            wr > 0
                && w % wr == 0
                && rows % (wr * 16) == 0
                && cols % (w / wr) == 0
                && (cols / (w / wr)) % 16 == 0
        };
        w > 0 && (1..=2).contains(&self.stages) && m / 2 <= 32 * w && grids.into_iter().all(fits)
    }
}

/// Environment variable overriding the backward tile table for tuning experiments:
/// `block_m,block_n,warps,stages,wn1,wn2,wq3`, applied to every head dim where it is valid.
pub const BWD_TILE_ENV: &str = "UFA_CUDA_BWD_TILE";

/// The backward tile table (H100, bf16, 2026-11-26; bench/results/gpu_sweep_bwd_*):
/// - head dims up to 128: 128 keys a block, 64 query rows a step, 8 warps. Phase grids
///   4 × 2 (Sᵀ: 32 keys × 32 queries a warp), 4 × 2 (dK/dV: 32 keys × 64 columns) and 2 × 4
///   (dQ: 32 rows × 32 columns): squarer shares read fewer fragments per mma than strips.
/// - larger head dims: 64 keys, grids 2 × 4 (dK/dV: 32 keys × head_dim/4 columns).
/// - head dims whose column split would not be whole n8 pairs (32, 96, 160) take the next grid
///   that fits (fewer column groups).
/// - two Q/dO stages where shared memory allows; devices with less (sm_86/89) drop to one,
///   then halve the blocks.
pub(crate) fn bwd_tile_for(head_dim: usize, max_smem: u32) -> Option<BwdTile> {
    if !MMA_HEAD_DIMS.contains(&head_dim) {
        return None;
    }
    let small = head_dim <= 128;
    let grids: &[[u32; 3]] = &[[4, 4, 2], [4, 4, 4], [2, 2, 2], [2, 4, 4], [2, 2, 1]];
    // The first warp grid (in the table's order of preference) whose splits are whole m-tiles
    // and n8 pairs for this shape.
    let with_grid = |t: BwdTile| {
        let preferred: &[[u32; 3]] = if t.block_n == 128 { grids } else { &grids[2..] };
        preferred
            .iter()
            .map(|&grid_rows| BwdTile { grid_rows, ..t })
            .find(BwdTile::is_valid)
    };
    let default = with_grid(BwdTile {
        head_dim: head_dim as u32,
        block_m: 64,
        block_n: if small { 128 } else { 64 },
        warps: 8,
        stages: 2,
        grid_rows: [0; 3],
        min_blocks: 1,
    })?;
    let mut tile = bwd_tile_override()
        .map(|t| BwdTile {
            head_dim: head_dim as u32,
            ..t
        })
        .filter(BwdTile::is_valid)
        .unwrap_or(default);
    while tile.smem_bytes() > max_smem {
        if tile.stages == 2 {
            tile.stages = 1;
            continue;
        }
        if tile.block_n > 64 {
            tile.block_n = 64;
        } else if tile.block_m > 32 {
            tile.block_m = 32;
        } else {
            return None;
        }
        tile = with_grid(tile)?;
    }
    Some(tile)
}

fn bwd_tile_override() -> Option<BwdTile> {
    static OVERRIDE: std::sync::OnceLock<Option<BwdTile>> = std::sync::OnceLock::new();
    *OVERRIDE.get_or_init(|| parse_bwd_tile(&std::env::var(BWD_TILE_ENV).ok()?))
}

/// Parses `block_m,block_n,warps,stages,wn1,wn2,wq3` (head_dim left 0, not validated).
pub(crate) fn parse_bwd_tile(s: &str) -> Option<BwdTile> {
    let [block_m, block_n, warps, stages, wn1, wn2, wq3] = parse_numbers(s)?;
    Some(BwdTile {
        head_dim: 0,
        block_m,
        block_n,
        warps,
        stages,
        grid_rows: [wn1, wn2, wq3],
        min_blocks: 1,
    })
}

fn type_tag(d: DType) -> &'static str {
    match d {
        DType::F16 => "Half",
        DType::BF16 => "BFloat16",
        DType::F32 | DType::Bool | DType::I32 => "Float32",
    }
}

impl Variant {
    /// Chooses the kernel for `p` on a device with `max_smem` bytes of shared memory a block;
    /// `hopper`: the device runs sm_90a code (wgmma).
    pub fn select(p: &Problem, max_smem: u32, hopper: bool) -> Variant {
        let dtype = p.q.dtype;
        let half = matches!(dtype, DType::F16 | DType::BF16);
        // The plain variants fuse a positive scale into exp2 (max(s)·scale = max(s·scale) only
        // for scale > 0); zero or negative scales take the general path.
        let score_mod = p.softcap > 0.0 || p.alibi.is_some() || p.mask.is_some() || p.scale <= 0.0;
        // The tensor-core kernel copies 16-byte pieces of rows; other layouts (odd strides,
        // unaligned views) are rare and take the CUDA-core kernel.
        let tensor_cores =
            half && p.out.dtype == dtype && p.head_dim == p.head_dim_v && rows_aligned16(p);
        if tensor_cores && hopper && wgmma::wgmma_enabled() {
            if let Some(tile) = wgmma::wgmma_tile_for(p.head_dim, score_mod, max_smem) {
                return Variant::Wgmma {
                    dtype,
                    tile,
                    score_mod,
                };
            }
        }
        let tile = tensor_cores
            .then(|| tile_for(p.head_dim, score_mod, max_smem))
            .flatten();
        match tile {
            Some(tile) => Variant::Mma {
                dtype,
                tile,
                score_mod,
            },
            None => Variant::Simple {
                input: dtype,
                output: p.out.dtype,
            },
        }
    }

    /// The `extern "C"` name of the variant's kernel; unique per variant.
    pub fn kernel_name(&self) -> String {
        match *self {
            Variant::Mma {
                dtype,
                tile: t,
                score_mod,
            } => format!(
                "ufa_fwd_{dtype}_d{}_m{}_n{}_w{}_b{}{}{}",
                t.head_dim,
                t.block_m,
                t.block_n,
                t.warps,
                t.min_blocks,
                if t.q_in_regs { "_qreg" } else { "" },
                if score_mod { "_mod" } else { "" }
            ),
            Variant::Wgmma {
                dtype,
                tile: t,
                score_mod,
            } => format!(
                "ufa_fwd90_{dtype}_d{}_m{}_n{}_s{}_b{}{}",
                t.head_dim,
                t.block_m,
                t.block_n,
                t.stages,
                t.min_blocks,
                if score_mod { "_mod" } else { "" }
            ),
            Variant::Simple { input, output } => format!("ufa_simple_{input}_{output}"),
            Variant::BwdMma {
                dtype,
                tile: t,
                score_mod,
            } => format!(
                "ufa_bwd_{dtype}_d{}_m{}_n{}_w{}_s{}_g{}{}{}_b{}{}",
                t.head_dim,
                t.block_m,
                t.block_n,
                t.warps,
                t.stages,
                t.grid_rows[0],
                t.grid_rows[1],
                t.grid_rows[2],
                t.min_blocks,
                if score_mod { "_mod" } else { "" }
            ),
            Variant::BwdWgmma {
                dtype,
                tile: t,
                score_mod,
            } => format!(
                "ufa_bwd90_{dtype}_d{}_m{}_n{}_b{}{}",
                t.head_dim,
                t.block_m,
                t.block_n,
                t.min_blocks,
                if score_mod { "_mod" } else { "" }
            ),
            Variant::BwdRows(k) => format!("ufa_{}", k.function()),
        }
    }

    pub fn threads(&self) -> u32 {
        match self {
            Variant::Mma { tile, .. } => tile.warps * 32,
            Variant::Wgmma { tile, .. } => tile.threads(),
            Variant::Simple { .. } => SIMPLE_WARPS * 32,
            Variant::BwdMma { tile, .. } => tile.warps * 32,
            Variant::BwdWgmma { tile, .. } => tile.threads(),
            Variant::BwdRows(_) => ROW_WARPS * 32,
        }
    }

    pub fn dynamic_smem(&self) -> u32 {
        match self {
            Variant::Mma { tile, .. } => tile.smem_bytes(),
            Variant::Wgmma { tile, .. } => tile.smem_bytes(),
            Variant::BwdMma { tile, .. } => tile.smem_bytes(),
            Variant::BwdWgmma { tile, .. } => tile.smem_bytes(),
            Variant::Simple { .. } | Variant::BwdRows(_) => 0,
        }
    }

    /// Rows (query rows for the forward, keys for the backward's tensor-core kernel, query
    /// or key rows for the row kernels) one block computes.
    pub fn rows_per_block(&self) -> u32 {
        match self {
            Variant::Mma { tile, .. } => tile.block_m,
            Variant::Wgmma { tile, .. } => tile.block_m,
            Variant::Simple { .. } => SIMPLE_WARPS,
            Variant::BwdMma { tile, .. } => tile.block_n,
            Variant::BwdWgmma { tile, .. } => tile.block_n,
            Variant::BwdRows(_) => ROW_WARPS,
        }
    }

    /// The declaration of the kernel's one parameter's type. The Hopper backward's holds
    /// tensor maps, which the TMA reads from the parameter space (`__grid_constant__`).
    pub fn params_type(&self) -> &'static str {
        match self {
            Variant::Mma { .. } | Variant::Wgmma { .. } | Variant::Simple { .. } => {
                "const FwdParams"
            }
            Variant::BwdMma { .. } | Variant::BwdRows(_) => "const BwdParams",
            Variant::BwdWgmma { .. } => "const __grid_constant__ BwdSm90Params",
        }
    }

    /// The full source of the variant's module: the shared prelude, the kernel template and
    /// the generated entry point.
    pub fn source(&self) -> String {
        let name = self.kernel_name();
        let threads = self.threads();
        // A Hopper kernel's module: the shared building blocks, its generated wgmma wrappers,
        // then its template.
        let hopper = |wrappers: String, body: &'static str| -> Vec<Cow<'static, str>> {
            vec![
                MMA_COMMON_SOURCE.into(),
                WGMMA_COMMON_SOURCE.into(),
                TMA_SOURCE.into(),
                wrappers.into(),
                body.into(),
            ]
        };
        let (bodies, min_blocks, call): (Vec<Cow<'static, str>>, u32, String) = match *self {
            Variant::Mma {
                dtype,
                tile: t,
                score_mod,
            } => (
                vec![MMA_COMMON_SOURCE.into(), MMA_SOURCE.into()],
                t.min_blocks,
                format!(
                    "flash_fwd<{}, TileConfig<{}, {}, {}, {}, {}>, {score_mod}>(p)",
                    type_tag(dtype),
                    t.head_dim,
                    t.block_m,
                    t.block_n,
                    t.warps,
                    t.q_in_regs
                ),
            ),
            Variant::Wgmma {
                dtype,
                tile: t,
                score_mod,
            } => (
                hopper(wgmma::wrappers(&t), SM90_SOURCE),
                t.min_blocks,
                wgmma::call(&t, score_mod, type_tag(dtype)),
            ),
            Variant::BwdWgmma {
                dtype,
                tile: t,
                score_mod,
            } => (
                hopper(wgmma::bwd_wrappers(&t), SM90_BWD_SOURCE),
                t.min_blocks,
                wgmma::bwd_call(&t, score_mod, type_tag(dtype)),
            ),
            Variant::Simple { input, output } => (
                vec![SIMPLE_SOURCE.into()],
                1,
                format!(
                    "attention_simple<{}, {}>(p)",
                    type_tag(input),
                    type_tag(output)
                ),
            ),
            Variant::BwdMma {
                dtype,
                tile: t,
                score_mod,
            } => (
                vec![MMA_COMMON_SOURCE.into(), BWD_MMA_SOURCE.into()],
                t.min_blocks,
                format!(
                    "flash_bwd<{}, BwdTileConfig<{}, {}, {}, {}, {}, {}, {}, {}>, {score_mod}>(p)",
                    type_tag(dtype),
                    t.head_dim,
                    t.block_m,
                    t.block_n,
                    t.warps,
                    t.stages,
                    t.grid_rows[0],
                    t.grid_rows[1],
                    t.grid_rows[2]
                ),
            ),
            Variant::BwdRows(k) => (
                vec![BWD_ROWS_SOURCE.into()],
                1,
                format!("{}(p)", k.function()),
            ),
        };
        let params = self.params_type();
        format!(
            "{COMMON_SOURCE}\n{}\n// generated entry point\nextern \"C\" __global__ void \
             __launch_bounds__({threads}, {min_blocks}) {name}({params} p) {{\n  {call};\n}}\n",
            bodies.join("\n")
        )
    }

    /// Every variant the library can launch on a device with `max_smem` bytes a block
    /// (`hopper`: with the sm_90a kernels).
    pub fn all(max_smem: u32, hopper: bool) -> Vec<Variant> {
        let mut v = Vec::new();
        for dtype in [DType::F16, DType::BF16] {
            for d in wgmma::WGMMA_HEAD_DIMS {
                for score_mod in [false, true] {
                    if let Some(tile) =
                        wgmma::wgmma_tile_for(d, score_mod, max_smem).filter(|_| hopper)
                    {
                        v.push(Variant::Wgmma {
                            dtype,
                            tile,
                            score_mod,
                        });
                    }
                }
            }
        }
        for dtype in [DType::F16, DType::BF16] {
            for d in MMA_HEAD_DIMS {
                for score_mod in [false, true] {
                    if let Some(tile) = tile_for(d, score_mod, max_smem) {
                        v.push(Variant::Mma {
                            dtype,
                            tile,
                            score_mod,
                        });
                    }
                }
            }
        }
        for input in [DType::F32, DType::F16, DType::BF16] {
            for output in [DType::F32, DType::F16, DType::BF16] {
                v.push(Variant::Simple { input, output });
            }
        }
        for dtype in [DType::F16, DType::BF16] {
            for d in MMA_HEAD_DIMS {
                for score_mod in [false, true] {
                    if let Some(tile) = bwd_tile_for(d, max_smem) {
                        v.push(Variant::BwdMma {
                            dtype,
                            tile,
                            score_mod,
                        });
                    }
                }
            }
        }
        for dtype in [DType::F16, DType::BF16] {
            for d in wgmma::WGMMA_HEAD_DIMS_BWD {
                for score_mod in [false, true] {
                    for deterministic in [false, true] {
                        let Some(tile) =
                            wgmma::bwd_tile_for(d, max_smem, deterministic).filter(|_| hopper)
                        else {
                            continue;
                        };
                        let variant = Variant::BwdWgmma {
                            dtype,
                            tile,
                            score_mod,
                        };
                        if !v.contains(&variant) {
                            v.push(variant);
                        }
                    }
                }
            }
        }
        v.extend(RowKernel::ALL.map(Variant::BwdRows));
        v
    }

    /// Grid (query-row blocks, heads, batch) of the forward kernels for `p`.
    pub fn grid(&self, p: &Problem) -> Result<(u32, u32, u32)> {
        grid(p.seqlen_q, self.rows_per_block(), p.heads_q, p.batch)
    }
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

/// The kernels' parameter block; mirrors `struct FwdParams` in kernels/common.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct FwdParams {
    pub q: *const c_void,
    pub k: *const c_void,
    pub v: *const c_void,
    pub out: *mut c_void,
    pub lse: *mut f32,
    pub alibi: *const f32,
    pub mask: *const c_void,
    pub q_stride: [i64; 3],
    pub k_stride: [i64; 3],
    pub v_stride: [i64; 3],
    pub o_stride: [i64; 3],
    pub lse_stride: [i64; 3],
    pub alibi_stride: [i64; 2],
    pub mask_stride: [i64; 4],
    pub batch: i32,
    pub seqlen_q: i32,
    pub seqlen_kv: i32,
    pub heads_q: i32,
    pub group: i32,
    pub head_dim: i32,
    pub head_dim_v: i32,
    pub diag_offset: i32,
    pub window_left: i32,
    pub window_right: i32,
    pub scale: f32,
    pub scale_log2: f32,
    pub softcap: f32,
    pub mask_kind: i32,
    pub num_m_blocks: i32,
}

fn mask_kind(d: DType) -> i32 {
    match d {
        DType::Bool => 1,
        DType::F16 => 2,
        DType::BF16 => 3,
        DType::F32 => 4,
        DType::I32 => unreachable!("masks are bool or float (validated)"),
    }
}

/// Strides (batch, seq, head) of a [b, s, h, d] operand, as the kernels index them.
pub(crate) fn bsh(s: [usize; 4]) -> [i64; 3] {
    [s[0] as i64, s[1] as i64, s[2] as i64]
}

/// Whether every row a tile load or store touches starts 16 bytes after the previous: base
/// pointers aligned, and each stride that matters (its dimension has more than one index) a
/// multiple of 8 two-byte elements.
fn rows_aligned16(p: &Problem) -> bool {
    let (q, kv) = query_and_key_dims(p);
    operands_aligned16(&[(&p.q, q), (&p.k, kv), (&p.v, kv), (&p.out, q)])
}

/// (batch, seqlen, heads) of the query-side and the key-side operands.
pub(crate) fn query_and_key_dims(p: &Problem) -> ([usize; 3], [usize; 3]) {
    (
        [p.batch, p.seqlen_q, p.heads_q],
        [p.batch, p.seqlen_kv, p.heads_kv],
    )
}

/// [`rows_aligned16`] for a list of operands with their (batch, seqlen, heads).
pub(crate) fn operands_aligned16(ops: &[(&Operand, [usize; 3])]) -> bool {
    ops.iter().all(|(o, dims)| {
        (o.ptr as usize).is_multiple_of(16)
            && (0..3).all(|i| dims[i] == 1 || o.strides[i].is_multiple_of(8))
    })
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
            None => (std::ptr::null(), [0; 4], 0),
        };
        let rows = rows_per_block as usize;
        Ok(FwdParams {
            q: p.q.ptr as *const c_void,
            k: p.k.ptr as *const c_void,
            v: p.v.ptr as *const c_void,
            out: p.out.ptr as *mut c_void,
            lse,
            alibi,
            mask,
            q_stride: bsh(p.q.strides),
            k_stride: bsh(p.k.strides),
            v_stride: bsh(p.v.strides),
            o_stride: bsh(p.out.strides),
            lse_stride,
            alibi_stride,
            mask_stride,
            batch: p.batch as i32,
            seqlen_q: p.seqlen_q as i32,
            seqlen_kv: p.seqlen_kv as i32,
            heads_q: p.heads_q as i32,
            group: p.group_size() as i32,
            head_dim: p.head_dim as i32,
            head_dim_v: p.head_dim_v as i32,
            diag_offset: p.diag_offset() as i32,
            window_left: window(p.window_left),
            window_right: window(p.window_right),
            scale: p.scale,
            scale_log2: p.scale * std::f32::consts::LOG2_E,
            softcap: p.softcap,
            mask_kind: kind,
            num_m_blocks: p.seqlen_q.div_ceil(rows) as i32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_block_matches_the_kernel_struct() {
        // common.cuh static_asserts the same size; offsets follow from C layout rules.
        assert_eq!(std::mem::size_of::<FwdParams>(), 288);
        assert!(COMMON_SOURCE.contains("sizeof(FwdParams) == 288"));
    }

    #[test]
    fn tile_table_fits_the_shared_memory_it_is_given() {
        for d in MMA_HEAD_DIMS {
            for score_mod in [false, true] {
                for smem in [101_376, 166_912, 232_448] {
                    let t = tile_for(d, score_mod, smem).expect("every listed head dim has a tile");
                    assert!(
                        t.smem_bytes() <= smem,
                        "d{d}: {t:?} needs {}",
                        t.smem_bytes()
                    );
                    let m_tiles = t.block_m / (16 * t.warps);
                    assert!(t.block_m == 16 * t.warps * m_tiles && (1..=2).contains(&m_tiles));
                }
                // Hopper and A100 get the full 128-row tiles everywhere.
                assert_eq!(tile_for(d, score_mod, 166_912).unwrap().block_m, 128);
            }
        }
        assert_eq!(tile_for(80, false, 232_448), None);
        assert_eq!(tile_for(256, false, 40_000), None);
    }

    #[test]
    fn tile_override_parsing() {
        let t = parse_tile("128,64,4,0,2").unwrap();
        assert_eq!(
            (t.block_m, t.block_n, t.warps, t.q_in_regs, t.min_blocks),
            (128, 64, 4, false, 2)
        );
        assert!(
            parse_tile("128,64,2,0,1").is_none(),
            "four m-tiles a warp is not instantiable"
        );
        assert!(parse_tile("128,60,8,0,1").is_none());
        assert!(parse_tile("128,64,8").is_none());
        assert!(parse_tile("x,64,8,0,1").is_none());
    }

    #[test]
    fn kernel_names_are_unique_and_appear_in_their_source() {
        let all = Variant::all(232_448, true);
        let mut names: Vec<String> = all.iter().map(|v| v.kernel_name()).collect();
        for v in &all {
            assert!(v
                .source()
                .contains(&format!("void __launch_bounds__({}", v.threads())));
            assert!(v
                .source()
                .contains(&format!(") {}({} p)", v.kernel_name(), v.params_type())));
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
        assert_eq!(
            all.len(),
            2 * 4 * 2 + 2 * 7 * 2 + 9 + 2 * 7 * 2 + 2 * 4 * 2 + 4
        );
        assert_eq!(
            Variant::all(232_448, false).len(),
            all.len() - 2 * 4 * 2 - 2 * 4 * 2
        );
    }
}
