//! The tile tables of the sm_80 (mma.sync) kernels, forward and backward, with the
//! measurements behind each choice; the Hopper ones are in sm90.rs beside their wrappers.

/// Head dims the tensor-core kernel is instantiated for (head_dim_v must match).
pub(crate) const MMA_HEAD_DIMS: [usize; 7] = [32, 64, 96, 128, 160, 192, 256];

/// Head dims above 256 that the mma.sync kernels take in fp16/bf16 (kernels/fwd_sm80.cu:
/// pairs of warps share the rows, each half of the columns, see [`wide_tile`]; bwd_sm80.cu:
/// two blocks a key range, each half of the gradients' columns, see [`wide_bwd_tile`]). 320
/// and 384 are there for the head dims between 256 and 512, so that one of 264 does not pay
/// for 512. The decoding kernel and fp32 keep 256 as their limit.
pub(crate) const WIDE_HEAD_DIMS: [usize; 3] = [320, 384, 512];

/// The widest tile one warp (forward) or one block (backward) spans whole; the kernel
/// templates split wider ones in two halves of the columns by the same rule
/// (`HEAD_DIM > 256` in `TileConfig` and `BwdTileConfig`).
const WHOLE_TILE_MAX: u32 = 256;

/// Halves of the columns a tile of `head_dim` is split in: 2 for the wide tiles, else 1.
fn column_halves(head_dim: u32) -> u32 {
    if head_dim > WHOLE_TILE_MAX {
        2
    } else {
        1
    }
}

/// The tile head dims of the mma.sync kernels for elements of `elem_bytes`, ascending: the
/// wide ones in 16-bit types only.
pub(crate) fn mma_head_dims(elem_bytes: usize) -> impl Iterator<Item = usize> {
    let wide: &[usize] = if elem_bytes == 2 {
        &WIDE_HEAD_DIMS
    } else {
        &[]
    };
    MMA_HEAD_DIMS.into_iter().chain(wide.iter().copied())
}

/// Whether a row of `head_dim` elements of `elem_bytes` is whole 16-byte pieces, which the
/// tensor-core kernels copy rows in (a multiple of 8 16-bit or 4 fp32 elements).
fn whole_pieces(head_dim: usize, elem_bytes: usize) -> bool {
    head_dim > 0 && (head_dim * elem_bytes).is_multiple_of(16)
}

/// The instantiated head dim whose tiles run a forward of `head_dim` up to 256 (the decoding
/// kernel's tiles): the smallest one at least as large, the columns past `head_dim` loaded as
/// zeros and not stored (fwd_sm80.cu). `head_dim` must fill whole 16-byte pieces; other head
/// dims, and those above 256, take other kernels. The padding costs compute, not memory
/// traffic: head_dim 80 runs the 96 tile.
pub(crate) fn mma_tile_head_dim(head_dim: usize, elem_bytes: usize) -> Option<usize> {
    if !whole_pieces(head_dim, elem_bytes) {
        return None;
    }
    MMA_HEAD_DIMS.into_iter().find(|&d| d >= head_dim)
}

/// The instantiated head dim whose mma.sync tiles run Q/K of `head_dim` and V of `head_dim_v`,
/// forward and backward: the smallest of [`mma_head_dims`] that holds the larger one, the
/// other's rows zero-padded up to it too (MLA's 192/128 runs on the 192 tile, 16-bit 264 on
/// 320), so both must fill whole 16-byte pieces.
pub(crate) fn mma_tile_head_dim_pair(
    head_dim: usize,
    head_dim_v: usize,
    elem_bytes: usize,
) -> Option<usize> {
    if !whole_pieces(head_dim, elem_bytes) || !whole_pieces(head_dim_v, elem_bytes) {
        return None;
    }
    let widest = head_dim.max(head_dim_v);
    mma_head_dims(elem_bytes).find(|&d| d >= widest)
}

/// What runs on NVIDIA tensor cores and what does not, in words, from the tile tables here and
/// in sm90.rs (`ufa info` prints it; the README's feature table says the same with numbers).
pub fn tensor_core_coverage() -> String {
    let list = |dims: &[usize]| {
        dims.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("/")
    };
    format!(
        "fp16/bf16 head dims that are multiples of 8 up to {wide_max} (Hopper: wgmma at up to \
         256, tiles {wgmma}; mma.sync tiles {mma} and, above 256, {wide}, in both passes); \
         fp32 head dims that are multiples of 4 up to 256 on TF32 tensor cores (three TF32 \
         products a product, or one with the TF32 precision; Hopper: wgmma at head dims \
         {f32_wgmma} for dense batches without dropout, mma.sync otherwise); other head dims \
         (fp32 above 256, rows not of whole 16-byte pieces) and an output dtype other than the \
         input's on CUDA cores; decoding's split-key kernel up to 256",
        wide_max = WIDE_HEAD_DIMS[WIDE_HEAD_DIMS.len() - 1],
        wgmma = list(&super::sm90::WGMMA_HEAD_DIMS),
        mma = list(&MMA_HEAD_DIMS),
        wide = list(&WIDE_HEAD_DIMS),
        f32_wgmma = list(&super::sm90_f32::F32_WGMMA_HEAD_DIMS),
    )
}

/// Tile sizes of one tensor-core variant; see [`tile_for`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Tile {
    pub head_dim: u32,
    /// 2 (f16/bf16, m16n8k16) or 4 (fp32 on TF32 tensor cores, m16n8k8).
    pub elem_bytes: u32,
    pub block_m: u32,
    pub block_n: u32,
    pub warps: u32,
    pub q_in_regs: bool,
    /// Blocks the compiler should fit on one SM (`__launch_bounds__`), which caps registers.
    pub min_blocks: u32,
}

impl Tile {
    /// Dynamic shared memory: the Q tile and one K and one V tile, rows padded by 16 bytes,
    /// and for a wide head dim the exchange of partial scores (`TileConfig::kSmemElems`).
    pub fn smem_bytes(&self) -> u32 {
        let rows = (self.block_m + 2 * self.block_n) * (self.head_dim * self.elem_bytes + 16);
        let exchange = if self.is_wide() {
            // Each warp's S accumulators (fp32): its m-tiles × block_n keys × 16 rows.
            let m_tiles = self.block_m / (16 * self.warps / 2);
            self.warps * m_tiles * self.block_n * 16 * 4
        } else {
            0
        };
        rows + exchange
    }

    /// Whether two warps share each row, each half of the columns (head dims above 256).
    pub fn is_wide(&self) -> bool {
        column_halves(self.head_dim) == 2
    }
}

/// The tile of a wide head dim ([`WIDE_HEAD_DIMS`], 16-bit elements): 64 query rows a block,
/// 8 warps in pairs (4 × 16 rows, two halves of the columns), one block an SM, and 64 keys a
/// tile where shared memory holds them (Hopper: 232,448 bytes at head dim 512, all there is),
/// else 32. A warp's half of O at head dim 512 is 128 registers a thread, as at 256's 8 warps.
/// Measured (H100, bf16, 4 × 4096 × 16 heads, 2026-12-07, `UFA_CUDA_WIDE_TILE`): 64 keys
/// against 32: d512 216 / 197 TFLOP/s, d384 182 / 170 (40 bytes spilled), d320 184 / 163;
/// blocks of 32 rows and 4 warps, two an SM, 156 / 146 / 149; 16 keys 120-160. Devices with
/// less shared memory (sm_86/89, 99 KB) take 32 rows, then 16 keys.
fn wide_tile(head_dim: usize, max_smem: u32) -> Option<Tile> {
    let shapes = [
        (64, 64, 8, 1),
        (64, 32, 8, 1),
        (32, 32, 4, 1),
        (32, 16, 4, 1),
    ];
    let overridden = wide_tile_override().map(|[m, n, w, b]| (m, n, w, b));
    overridden
        .into_iter()
        .chain(shapes)
        .map(|(block_m, block_n, warps, min_blocks)| Tile {
            head_dim: head_dim as u32,
            elem_bytes: 2,
            block_m,
            block_n,
            warps,
            q_in_regs: false,
            min_blocks,
        })
        .find(|t| t.smem_bytes() <= max_smem)
}

/// Environment variable overriding the wide tiles for tuning experiments:
/// `block_m,block_n,warps,min_blocks` (warps in pairs, whole 16-row m-tiles, at most two a
/// warp, whole k-steps of keys), applied where it fits shared memory.
pub const WIDE_TILE_ENV: &str = "UFA_CUDA_WIDE_TILE";

fn wide_tile_override() -> Option<[u32; 4]> {
    static OVERRIDE: std::sync::OnceLock<Option<[u32; 4]>> = std::sync::OnceLock::new();
    *OVERRIDE.get_or_init(|| {
        let [m, n, w, b] = parse_numbers::<4>(&std::env::var(WIDE_TILE_ENV).ok()?)?;
        let mt = m.checked_div(16 * (w / 2))?;
        let ok = w >= 2
            && w.is_multiple_of(2)
            && (1..=2).contains(&mt)
            && m == 16 * (w / 2) * mt
            && n > 0
            && n.is_multiple_of(16);
        ok.then_some([m, n, w, b.max(1)])
    })
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
///
/// fp32 (`elem_bytes` 4, TF32 tensor cores) keeps Q in shared memory (its split operands
/// would not fit registers), one m-tile a warp and 32 keys a tile (H200, 3xTF32, seqlen 8k,
/// 2026-12-04; 64 keys spilled at d128 and ran 33.6 TFLOP/s against 39.5, causal 26.8 vs 37.4):
/// - head dims up to 128: 64 query rows a block, 4 warps, two blocks an SM (128 rows and 8
///   warps measured the same);
/// - larger ones: 128 rows, 8 warps (O alone is 80-128 registers a thread).
pub(crate) fn tile_for(
    head_dim: usize,
    elem_bytes: u32,
    score_mod: bool,
    max_smem: u32,
) -> Option<Tile> {
    if WIDE_HEAD_DIMS.contains(&head_dim) && elem_bytes == 2 {
        // Not overridden by UFA_CUDA_TILE: its shapes are those of one warp a row.
        return wide_tile(head_dim, max_smem);
    }
    if !MMA_HEAD_DIMS.contains(&head_dim) {
        return None;
    }
    let two_m_tiles = head_dim <= 128 && !score_mod;
    let small = head_dim <= 128;
    let mut tile = match tile_override() {
        Some(t) => Tile {
            head_dim: head_dim as u32,
            elem_bytes,
            q_in_regs: t.q_in_regs && elem_bytes == 2,
            ..t
        },
        None if elem_bytes == 4 => Tile {
            head_dim: head_dim as u32,
            elem_bytes,
            block_m: if small { 64 } else { 128 },
            block_n: 32,
            warps: if small { 4 } else { 8 },
            q_in_regs: false,
            min_blocks: if small { 2 } else { 1 },
        },
        None => Tile {
            head_dim: head_dim as u32,
            elem_bytes,
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
        elem_bytes: 2,
        block_m,
        block_n,
        warps,
        q_in_regs: q != 0,
        min_blocks: min_blocks.max(1),
    })
}

/// Tile sizes of one tensor-core backward variant; see [`bwd_tile_for`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct BwdTile {
    pub head_dim: u32,
    /// 2 (f16/bf16, m16n8k16) or 4 (fp32 on TF32 tensor cores, m16n8k8).
    pub elem_bytes: u32,
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
    /// Blocks a key range takes: two for a wide head dim (each half of the columns).
    pub fn column_halves(&self) -> u32 {
        column_halves(self.head_dim)
    }

    /// Dynamic shared memory: K, V, `stages` × (Q, dO), Pᵀ and dSᵀ (in the input dtype, rows
    /// padded by 16 bytes), then fp32 LSE and D per stage; `BwdTileConfig::kSmemElems` (16-bit
    /// units) in kernels/bwd_sm80.cu.
    pub fn smem_bytes(&self) -> u32 {
        let row = self.head_dim * self.elem_bytes + 16;
        let p_row = self.block_m * self.elem_bytes + 16;
        2 * self.block_n * row
            + self.stages * 2 * self.block_m * row
            + 2 * self.block_n * p_row
            + self.stages * 2 * self.block_m * 4
    }

    /// Whether the kernel template's static_asserts accept this shape.
    pub fn is_valid(&self) -> bool {
        // A wide head dim's block computes half of the gradients' columns (bwd_sm80.cu).
        let (m, n, w, d) = (
            self.block_m,
            self.block_n,
            self.warps,
            self.head_dim / self.column_halves(),
        );
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
        // fp32 rows must be ≡ 4 floats mod 32 (kernels/bwd_tf32.cuh).
        let fp32_pitches = self.elem_bytes == 2 || (d % 32 == 0 && m % 32 == 0);
        w > 0
            && (1..=2).contains(&self.stages)
            && m / 2 <= 32 * w
            && fp32_pitches
            && grids.into_iter().all(fits)
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
///
/// fp32 (`elem_bytes` 4, TF32 tensor cores) needs twice the shared memory a row: 128 keys a
/// block up to head_dim 64, 64 keys up to 160 (one Q/dO stage from 128 on), 32 keys above
/// (dK and dV of 64 keys would take 128 registers a thread at head_dim 256).
pub(crate) fn bwd_tile_for(head_dim: usize, elem_bytes: u32, max_smem: u32) -> Option<BwdTile> {
    if WIDE_HEAD_DIMS.contains(&head_dim) && elem_bytes == 2 {
        return wide_bwd_tile(head_dim, max_smem);
    }
    if !MMA_HEAD_DIMS.contains(&head_dim) {
        return None;
    }
    let small = head_dim <= 128;
    let block_n = match (elem_bytes, head_dim) {
        (2, _) if small => 128,
        (2, _) => 64,
        (_, ..=64) => 128,
        (_, ..=160) => 64,
        _ => 32,
    };
    let grids: &[[u32; 3]] = &[
        [4, 4, 2],
        [4, 4, 4],
        [2, 2, 2],
        [2, 4, 4],
        [2, 2, 1],
        [4, 2, 2],
    ];
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
        elem_bytes,
        block_m: 64,
        block_n,
        warps: 8,
        stages: 2,
        grid_rows: [0; 3],
        min_blocks: 1,
    })?;
    let mut tile = bwd_tile_override()
        .map(|t| BwdTile {
            head_dim: head_dim as u32,
            elem_bytes,
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

/// The backward tile of a wide head dim ([`WIDE_HEAD_DIMS`], 16-bit): each block takes half of
/// the gradients' columns (two blocks a key block, kernels/bwd_sm80.cu), so its dK, dV and dQ
/// registers are those of head dim 256's tiles, while K, V, Q and dO rows stay whole (Sᵀ and
/// dPᵀ sum over every column). 32 keys and 64 query rows a step on 8 warps, one Q/dO stage:
/// 209 KB of shared memory at 512; 4 warps where 8 cannot split the columns into whole n8
/// pairs (320's halves of 160), and 32 rows where a block has less (sm_80's 163 KB at 512).
fn wide_bwd_tile(head_dim: usize, max_smem: u32) -> Option<BwdTile> {
    [(64, 8), (64, 4), (32, 4)]
        .into_iter()
        .map(|(block_m, warps)| BwdTile {
            head_dim: head_dim as u32,
            elem_bytes: 2,
            block_m,
            block_n: 32,
            warps,
            stages: 1,
            grid_rows: [2, 2, 2],
            min_blocks: 1,
        })
        .find(|t| t.is_valid() && t.smem_bytes() <= max_smem)
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
        elem_bytes: 2,
        block_m,
        block_n,
        warps,
        stages,
        grid_rows: [wn1, wn2, wq3],
        min_blocks: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_dims_between_the_instantiated_ones_take_the_next_tile() {
        for (d, bytes, want) in [
            (80, 2, Some(96)),
            (72, 2, Some(96)),
            (8, 2, Some(32)),
            (256, 2, Some(256)),
            (36, 2, None), // 72 bytes: not whole 16-byte pieces
            (36, 4, Some(64)),
            (4, 4, Some(32)),
            (2, 4, None),
            (264, 2, None),
            (0, 2, None),
        ] {
            assert_eq!(
                mma_tile_head_dim(d, bytes),
                want,
                "head_dim {d}, {bytes} bytes"
            );
        }
    }

    #[test]
    fn wide_head_dims_take_the_wide_tiles_in_16_bit_only() {
        for (d, dv, bytes, want) in [
            (264, 264, 2, Some(320)),
            (320, 320, 2, Some(320)),
            (328, 328, 2, Some(384)),
            (512, 512, 2, Some(512)),
            (392, 512, 2, Some(512)),
            (576, 512, 2, None), // above 512
            (512, 512, 4, None), // fp32 stays on CUDA cores above 256
            (300, 300, 2, None), // 600 bytes: not whole 16-byte pieces
            (512, 100, 2, None), // V's 200 bytes likewise
            (256, 256, 2, Some(256)),
            (192, 128, 2, Some(192)),
        ] {
            assert_eq!(
                mma_tile_head_dim_pair(d, dv, bytes),
                want,
                "head dims {d}/{dv}, {bytes} bytes"
            );
        }
    }

    #[test]
    fn coverage_names_the_tables_limits() {
        let c = tensor_core_coverage();
        assert!(c.contains("up to 512") && c.contains("320/384/512"), "{c}");
        assert!(c.contains("wgmma at head dims 64/128 for dense"), "{c}");
        assert!(
            c.contains("32/64/96/128/160/192/256") && c.contains("64/128/192/256"),
            "{c}"
        );
    }

    #[test]
    fn wide_backward_tiles_take_half_the_columns_and_fit() {
        for smem in [232_448, 166_912] {
            for d in WIDE_HEAD_DIMS {
                let t = bwd_tile_for(d, 2, smem).expect("a wide backward tile");
                assert!(t.is_valid() && t.smem_bytes() <= smem, "{t:?}");
                assert_eq!(t.column_halves(), 2, "{t:?}");
            }
        }
        let shape = |d, smem| {
            let t = bwd_tile_for(d, 2, smem).unwrap();
            (t.block_m, t.warps)
        };
        assert_eq!(shape(512, 232_448), (64, 8));
        assert_eq!(shape(384, 232_448), (64, 8));
        assert_eq!(shape(320, 232_448), (64, 4));
        assert_eq!(shape(512, 166_912), (32, 4));
        // sm_86/89 (99 KB): 512's rows alone outgrow it; fp32 stays off.
        assert!(bwd_tile_for(512, 2, 101_376).is_none());
        assert!(bwd_tile_for(512, 4, 232_448).is_none());
        assert_eq!(bwd_tile_for(256, 2, 232_448).unwrap().column_halves(), 1);
    }

    #[test]
    fn wide_tiles_fit_each_device_class() {
        // sm_90 (227 KB), sm_80 (163 KB) and sm_86/89 (99 KB) a block.
        for (smem, want_m, want_n) in [(232_448, 64, 64), (166_912, 64, 32), (101_376, 32, 16)] {
            for d in WIDE_HEAD_DIMS {
                let t = tile_for(d, 2, false, smem).expect("a wide tile");
                assert!(t.is_wide() && t.smem_bytes() <= smem, "{t:?}");
                if d == 512 {
                    assert_eq!((t.block_m, t.block_n), (want_m, want_n), "{t:?}");
                }
            }
        }
        // The 512 tile on Hopper: Q 64 rows, K and V 64 rows of 1040 bytes, 32 KB of exchange:
        // a block's whole shared memory.
        let t = tile_for(512, 2, false, 232_448).unwrap();
        assert_eq!(t.smem_bytes(), 192 * 1040 + 32_768);
        assert_eq!(tile_for(320, 2, false, 166_912).unwrap().block_n, 64);
        assert!(tile_for(512, 4, false, 232_448).is_none());
    }
}
