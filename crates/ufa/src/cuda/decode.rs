//! Decoding on CUDA (kernels/fwd_decode.cu): when it runs instead of the prefill kernels, its
//! tiles, how many key splits a call gets, and the scratch memory of the splits' partial
//! states.
//!
//! A decoding step has few query rows per KV head (query rows × GQA group), so the prefill
//! kernels, whose blocks own 64 or 128 query rows of one head, read every K/V byte once per
//! query head and use a row or two of each tile. The decoding kernel packs the group's rows into
//! one tile and splits the keys across blocks until the device is full.

use super::abi::{DECODE_CLUSTER_MAX, DECODE_MAX_SPLITS};
use super::tiles::{mma_tile_head_dim, parse_numbers, MMA_HEAD_DIMS};
use super::variants::rows_aligned16;
use crate::dtype::DType;
use crate::problem::Problem;

/// Packed rows (query rows × query heads of one KV head) up to which a call decodes: beyond,
/// the prefill kernels' tiles are full enough.
pub(crate) const DECODE_MAX_ROWS: usize = 64;

/// A split should give every warp of its block a few key tiles to stream; shorter splits spend
/// more on filling the pipeline and on the combine than they gain in parallelism.
const MIN_TILES_PER_WARP: usize = 2;

/// The partial states a call may write are bounded by `splits × batch ≤ SPLIT_BUDGET` (fewer
/// sequences are split more), which bounds the scratch memory by the problem's shape alone
/// ([`workspace_bound`]): a caller can size a workspace without knowing the device.
const SPLIT_BUDGET: usize = 256;

/// Below this many keys a call on a device with clusters keeps its splits within one cluster
/// (at most [`DECODE_CLUSTER_MAX`]) even where more would fill the device: such a call is
/// short, and the second launch of a combine costs more than the extra splits save (H100,
/// bf16, d128, from Python: 16-18 µs a call against 22-24 with the combine, at 1k keys;
/// bench/results/decode_cluster_2026-12-07_h100.md). Longer calls merge within clusters of at
/// most [`LONG_CALL_CLUSTER_MAX`] blocks.
const CLUSTER_ONLY_BELOW_KEYS: usize = 8192;

/// The largest cluster a call of [`CLUSTER_ONLY_BELOW_KEYS`] keys or more merges in. A GPC holds
/// whole clusters, and these tiles run one block an SM, so clusters of 4 may leave SMs idle that
/// single blocks fill and run the excess after the first wave: on an H100, 128 blocks in
/// clusters of 4 (32 KV heads, one sequence, 8k and 32k keys) took 1.08-1.10x the combine's
/// time, clusters of 2 at 128 blocks 0.97-0.99x (same run,
/// bench/results/decode_cluster_2026-12-07_h100.md).
const LONG_CALL_CLUSTER_MAX: usize = 2;

/// Environment variable overriding the tile table for tuning: `warps,block_n,stages`.
pub const DECODE_TILE_ENV: &str = "UFA_CUDA_DECODE_TILE";
/// Environment variable forcing the number of key splits (clamped to what the call allows);
/// `0` turns the decoding kernel off (the prefill kernels serve every call).
pub const DECODE_SPLITS_ENV: &str = "UFA_CUDA_DECODE_SPLITS";
/// Environment variable choosing how splits merge on devices with clusters: `cluster` (every
/// call's splits within one cluster, at most [`DECODE_CLUSTER_MAX`]) or `combine` (the
/// combine kernel, as before sm_90); unset, the rule of [`DecodePlan::new`].
pub const DECODE_MERGE_ENV: &str = "UFA_CUDA_DECODE_MERGE";

/// Tile sizes of one decoding variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct DecodeTile {
    pub head_dim: u32,
    /// 16-row mma tiles of packed rows a block owns.
    pub m_tiles: u32,
    pub warps: u32,
    /// Keys of one warp's tile.
    pub block_n: u32,
    /// Ring buffers of each warp: `stages - 1` tiles load while one is computed.
    pub stages: u32,
    pub q_in_regs: bool,
}

impl DecodeTile {
    pub fn rows(&self) -> u32 {
        16 * self.m_tiles
    }

    /// Elements between shared rows (`DecodeConfig`'s ROW_PITCH; kernels/smem_rows.cuh). Where
    /// rows fill whole 128-byte lines, or pack one (32 and 64 bytes), they are unpadded and
    /// swizzled, so that each quarter warp of a copy writes one line: rows padded by 16
    /// bytes cost each copy 2.6 times the L2 requests and 1.5 times the sectors (ncu, H100,
    /// bench/results/decode_copy_2026-12-06_h100.md). Other head dims (96, 160) pad by 8
    /// elements, which keeps ldmatrix free of bank conflicts.
    pub fn row_pitch(&self) -> u32 {
        let chunks = self.head_dim / 8;
        if chunks.is_multiple_of(8) || 8 % chunks == 0 {
            self.head_dim
        } else {
            self.head_dim + 8
        }
    }

    /// Dynamic shared memory: the packed Q tile and every warp's ring of K and V tiles
    /// (`DecodeConfig::kSmemElems`).
    pub fn smem_bytes(&self) -> u32 {
        (self.rows() + self.warps * self.stages * 2 * self.block_n) * self.row_pitch() * 2
    }

    /// Whether the warps' closing merge (fp32 rows, maxima and sums, then the block's LSEs
    /// for a cluster's merge) fits in the buffers, as the template asserts (kMergeFloats).
    fn merge_fits(&self) -> bool {
        (self.warps * self.rows() * (self.head_dim + 2) + self.rows()) * 4 <= self.smem_bytes()
    }
}

/// The tile of a decoding variant: warps each with their own ring of K/V tiles, as deep as
/// shared memory allows, one block an SM. Measured on an H200 (bf16, 32 query heads; see
/// bench/results/decode_notes_2026-12-04.md): at head dim 128, 4 warps of 32-key tiles in rings
/// of 3 read 92% of the card's measured bandwidth at batch 32, and deeper rings of narrower
/// tiles (4 × 16 × 6), more warps (8 × 16 × 3, 8 × 32 × 2) and L2 prefetches beyond the ring
/// did no better; at 64, 8 warps in rings of 2 read 5% more than 4 in rings of 4. A paged
/// cache (`paged`) costs each row a block-table lookup and its offsets' arithmetic before its
/// copies issue, which one warp a scheduler cannot hide: at head dim 128, 8 warps of 16-key
/// tiles read pages of 16 rows at 87–91% of the bandwidth at batch 32 against 78–83% for
/// 4 × 32 (bench/results/decode_paged_2026-12-05_h200.md). Rings are shallower, then tiles
/// narrower, then warps fewer on devices with less shared memory.
pub(crate) fn decode_tile_for(
    head_dim: usize,
    m_tiles: u32,
    paged: bool,
    max_smem: u32,
) -> Option<DecodeTile> {
    if !MMA_HEAD_DIMS.contains(&head_dim) || !(1..=2).contains(&m_tiles) {
        return None;
    }
    let d = head_dim as u32;
    let (warps, block_n, stages) = tile_override().unwrap_or(match d {
        0..=64 => (8, 32, 2),
        65..=128 if paged => (8, 16, 3),
        65..=128 => (4, 32, 3),
        _ => (4, 16, 3),
    });
    let mut tile = DecodeTile {
        head_dim: d,
        m_tiles,
        warps,
        block_n,
        stages,
        // Q fragments in registers beside O's accumulators only while both fit.
        q_in_regs: m_tiles * d <= 128,
    };
    while tile.smem_bytes() > max_smem || !tile.merge_fits() {
        if tile.stages > 2 {
            tile.stages -= 1;
        } else if tile.block_n > 16 {
            tile.block_n /= 2;
        } else if tile.warps > 1 {
            tile.warps /= 2;
        } else {
            return None;
        }
    }
    Some(tile)
}

fn tile_override() -> Option<(u32, u32, u32)> {
    static OVERRIDE: std::sync::OnceLock<Option<(u32, u32, u32)>> = std::sync::OnceLock::new();
    *OVERRIDE.get_or_init(|| {
        let [w, n, s] = parse_numbers(&std::env::var(DECODE_TILE_ENV).ok()?)?;
        // Tiles of at most 32 keys: one lane looks up each row's page (fwd_decode.cu).
        (w > 0 && n > 0 && n <= 32 && n % 16 == 0 && s >= 2).then_some((w, n, s))
    })
}

fn merge_override() -> Option<SplitMerge> {
    static OVERRIDE: std::sync::OnceLock<Option<SplitMerge>> = std::sync::OnceLock::new();
    *OVERRIDE.get_or_init(|| match std::env::var(DECODE_MERGE_ENV).ok()?.trim() {
        "cluster" => Some(SplitMerge::Cluster),
        "combine" => Some(SplitMerge::Combine),
        _ => None,
    })
}

fn splits_override() -> Option<usize> {
    static OVERRIDE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *OVERRIDE.get_or_init(|| std::env::var(DECODE_SPLITS_ENV).ok()?.trim().parse().ok())
}

/// How the key splits of a decoding call become its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SplitMerge {
    /// One split: its blocks write the output.
    None,
    /// The splits of a (batch entry, KV head, row block) are one thread-block cluster and
    /// merge in distributed shared memory (sm_90+): one launch, no scratch memory.
    Cluster,
    /// The splits write partial states to scratch memory and the combine kernel, a second
    /// launch, merges them.
    Combine,
}

/// How a call decodes: its tile, key splits, how they merge, and blocks of packed rows per
/// (batch entry, KV head).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DecodePlan {
    pub tile: DecodeTile,
    pub splits: usize,
    pub merge: SplitMerge,
    pub row_blocks: usize,
}

impl DecodePlan {
    /// The plan for `p` on a device with `sms` multiprocessors, `max_smem` bytes of shared
    /// memory a block and thread-block clusters or not (sm_90+); None when the prefill kernels
    /// serve it (more rows, dtypes or layouts the tensor cores do not take).
    pub fn new(p: &Problem, sms: u32, max_smem: u32, clusters: bool) -> Option<DecodePlan> {
        let half = matches!(p.q.dtype, DType::F16 | DType::BF16);
        let rows = p.seqlen_q * p.group_size();
        let eligible = half
            && p.out.dtype == p.q.dtype
            && p.head_dim == p.head_dim_v
            && rows <= DECODE_MAX_ROWS
            && rows_aligned16(p)
            && p.dropout.is_none() // the prefill kernel drops (Variant::FwdSm80)
            && splits_override() != Some(0);
        if !eligible {
            return None;
        }
        // Head dims between the built tiles run on the next larger one (zero padding).
        let d = mma_tile_head_dim(p.head_dim, p.q.dtype.size_in_bytes())?;
        let m_tiles = m_tiles_for(rows, d);
        let tile = decode_tile_for(d, m_tiles, p.k.rows.is_paged(), max_smem)?;
        let row_blocks = rows.div_ceil(tile.rows() as usize);
        let blocks = p.batch * p.heads_kv * row_blocks;
        let per_sm = ((max_smem + 1024) / (tile.smem_bytes() + 1024)).max(1) as usize;
        let slots = sms as usize * per_sm;
        let keys_per_split = (tile.warps * tile.block_n) as usize * MIN_TILES_PER_WARP;
        let cap = split_cap(p.batch).min(p.seqlen_kv.div_ceil(keys_per_split).max(1));
        let clusters = clusters && merge_override() != Some(SplitMerge::Combine);
        // Whether the call keeps all its splits within one cluster: fewer of them are then
        // chosen, as if the rest of the device were not there.
        let one_cluster = clusters
            && (p.seqlen_kv < CLUSTER_ONLY_BELOW_KEYS
                || merge_override() == Some(SplitMerge::Cluster));
        let splits = match splits_override() {
            Some(n) => n.clamp(1, split_cap(p.batch)),
            None if one_cluster => choose_splits(blocks, slots, cap.min(DECODE_CLUSTER_MAX)),
            None => choose_splits(blocks, slots, cap),
        };
        let largest_cluster = if one_cluster {
            DECODE_CLUSTER_MAX
        } else {
            LONG_CALL_CLUSTER_MAX
        };
        let merge = match splits {
            1 => SplitMerge::None,
            n if clusters && n <= largest_cluster => SplitMerge::Cluster,
            _ => SplitMerge::Combine,
        };
        Some(DecodePlan {
            tile,
            splits,
            merge,
            row_blocks,
        })
    }

    /// Scratch bytes of the splits' partial states (0 where none are written: one split, or a
    /// merge within clusters).
    pub fn scratch_bytes(&self, p: &Problem) -> usize {
        if self.merge != SplitMerge::Combine {
            return 0;
        }
        self.scratch_layout(p).bytes
    }

    /// Where the partial states of `p`'s splits lie in their scratch memory.
    pub fn scratch_layout(&self, p: &Problem) -> PartialLayout {
        PartialLayout::new(self.splits, p.batch, p.heads_q, p.seqlen_q, p.head_dim_v)
    }
}

/// 16-row mma tiles of a block for `rows` packed rows: two where more rows are packed, so
/// that each K/V fragment feeds two mmas, while two tiles of O's accumulators fit in registers.
pub(crate) fn m_tiles_for(rows: usize, head_dim: usize) -> u32 {
    if rows <= 16 || head_dim > 128 {
        1
    } else {
        2
    }
}

/// The most splits a batch of `batch` sequences may get.
fn split_cap(batch: usize) -> usize {
    (SPLIT_BUDGET / batch.max(1)).clamp(1, DECODE_MAX_SPLITS)
}

/// The partial states of `splits` splits in scratch memory: fp32 outputs
/// [splits, batch, heads, seqlen_q, dim], then their LSEs at a 256-byte boundary.
pub(crate) struct PartialLayout {
    pub lse_offset: usize,
    pub bytes: usize,
}

impl PartialLayout {
    fn new(splits: usize, batch: usize, heads: usize, seqlen_q: usize, dim: usize) -> Self {
        let rows = splits * batch * heads * seqlen_q;
        let lse_offset = (rows * dim * 4).div_ceil(256) * 256;
        PartialLayout {
            lse_offset,
            bytes: lse_offset + (rows * 4).div_ceil(256) * 256,
        }
    }
}

/// Scratch bytes that cover any decoding call whose q is [batch, seqlen_q, heads_q, head_dim],
/// whatever its device and KV heads ([`crate::kvcache_workspace_bytes`]).
pub(crate) fn workspace_bound(
    dtype: DType,
    batch: usize,
    seqlen_q: usize,
    heads_q: usize,
    head_dim: usize,
) -> usize {
    let half = matches!(dtype, DType::F16 | DType::BF16);
    if !half
        || seqlen_q > DECODE_MAX_ROWS
        || mma_tile_head_dim(head_dim, dtype.size_in_bytes()).is_none()
    {
        return 0;
    }
    PartialLayout::new(split_cap(batch), batch, heads_q, seqlen_q, head_dim).bytes
}

/// The split count for `blocks` blocks on `slots` resident block slots: the fewest splits
/// (at most `cap`) whose last wave is nearly as full as the best count's (FlashAttention's
/// rule), since every extra split costs a partial state and a share of the combine.
fn choose_splits(blocks: usize, slots: usize, cap: usize) -> usize {
    if blocks == 0 || blocks * 10 >= slots * 8 {
        return 1;
    }
    let efficiency = |s: usize| {
        let n = blocks * s;
        n as f64 / (n.div_ceil(slots) * slots) as f64
    };
    let best = (1..=cap).map(efficiency).fold(0.0, f64::max);
    (1..=cap)
        .find(|&s| efficiency(s) >= 0.95 * best)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_the_device_and_stay_within_their_cap() {
        // One sequence of 8 KV heads on 132 SMs: 16 splits fill 128 of them.
        assert_eq!(choose_splits(8, 132, 128), 16);
        // Enough blocks already: no split.
        assert_eq!(choose_splits(256, 132, 128), 1);
        assert_eq!(choose_splits(120, 132, 128), 1);
        // A cap (short keys, a large batch) wins.
        assert_eq!(choose_splits(8, 132, 3), 3);
        for blocks in 1..300 {
            let s = choose_splits(blocks, 132, 40);
            assert!((1..=40).contains(&s), "{blocks}: {s}");
        }
    }

    #[test]
    fn tiles_fit_the_device_and_their_merge() {
        for d in MMA_HEAD_DIMS {
            for mt in [1, 2] {
                for paged in [false, true] {
                    for smem in [232_448, 101_376, 49_152] {
                        if let Some(t) = decode_tile_for(d, mt, paged, smem) {
                            assert!(t.smem_bytes() <= smem, "{t:?}");
                            assert!(t.merge_fits(), "{t:?}");
                            assert_eq!(t.block_n % 16, 0);
                            assert!(t.block_n <= 32, "one lane per row of a paged tile: {t:?}");
                        }
                    }
                    assert!(
                        decode_tile_for(d, mt, paged, 232_448).is_some(),
                        "d{d} m{mt}"
                    );
                }
            }
        }
        assert!(decode_tile_for(72, 1, false, 232_448).is_none());
    }

    #[test]
    fn rows_are_swizzled_where_they_pack_whole_lines_and_padded_elsewhere() {
        let pitch = |d| decode_tile_for(d, 1, false, 232_448).unwrap().row_pitch();
        // Unpadded rows must fill 128-byte lines or pack one (smem_rows.cuh's SwizzledRows).
        for d in [32, 64, 128, 192, 256] {
            assert_eq!(pitch(d), d as u32, "d{d}");
        }
        // Padded rows are an odd number of 16-byte chunks apart (PaddedRows).
        for d in [96, 160] {
            assert_eq!(pitch(d), d as u32 + 8, "d{d}");
            assert_eq!(pitch(d) / 8 % 2, 1, "d{d}");
        }
    }

    /// The plan of a bf16 decoding step on 132 SMs of 227 KiB: one query row of 32 heads over
    /// `kv` keys of `heads_kv` heads, head dim 128, batch `batch`.
    fn plan(batch: usize, kv: usize, heads_kv: usize, clusters: bool) -> DecodePlan {
        use crate::problem::validate_forward;
        use crate::{AttentionParams, TensorView, TensorViewMut};
        use half::bf16;
        let d = 128;
        let q = vec![bf16::ZERO; batch * 32 * d];
        let kvs = vec![bf16::ZERO; batch * kv * heads_kv * d];
        let mut out = q.clone();
        let qv = TensorView::new(&q, &[batch, 1, 32, d]).unwrap();
        let k = TensorView::new(&kvs, &[batch, kv, heads_kv, d]).unwrap();
        let o = TensorViewMut::new(&mut out, &[batch, 1, 32, d]).unwrap();
        let p = validate_forward(&qv, &k, &k, &o, None, &AttentionParams::default()).unwrap();
        DecodePlan::new(&p, 132, 232_448, clusters).unwrap()
    }

    #[test]
    fn splits_merge_within_a_cluster_where_they_fit_one() {
        // Short calls: every split within one cluster, however few blocks.
        for (batch, kv, hkv) in [(1, 1024, 8), (1, 4096, 4), (1, 8191, 8), (2, 2048, 1)] {
            let pl = plan(batch, kv, hkv, true);
            assert!(pl.splits > 1 && pl.splits <= DECODE_CLUSTER_MAX, "{pl:?}");
            assert_eq!(pl.merge, SplitMerge::Cluster, "{batch} {kv} {hkv}");
            let before = plan(batch, kv, hkv, false);
            assert_eq!(
                before.merge,
                SplitMerge::Combine,
                "no clusters before sm_90"
            );
        }
        // Long calls of few blocks take as many splits as fill the device, and the combine.
        let long = plan(1, 32768, 8, true);
        assert!(long.splits > DECODE_CLUSTER_MAX, "{long:?}");
        assert_eq!(long.merge, SplitMerge::Combine);
        // Long calls merge within clusters of 2 (32 KV heads over 8 sequences: 2 splits), and
        // with the combine where they take more splits (32 KV heads of one sequence: 4).
        let pair = plan(8, 8192, 8, true);
        assert_eq!(
            (pair.splits, pair.merge),
            (2, SplitMerge::Cluster),
            "{pair:?}"
        );
        let four = plan(1, 8192, 32, true);
        assert_eq!(
            (four.splits, four.merge),
            (4, SplitMerge::Combine),
            "{four:?}"
        );
        // Enough blocks: one split, no merge.
        assert_eq!(plan(32, 8192, 8, true).merge, SplitMerge::None);
    }

    #[test]
    fn the_workspace_bound_covers_every_split_count() {
        for batch in [1, 3, 8, 32, 128, 1000] {
            let cap = split_cap(batch);
            assert!(cap * batch <= SPLIT_BUDGET.max(batch));
            for splits in 1..=cap {
                assert!(
                    PartialLayout::new(splits, batch, 32, 2, 128).bytes
                        <= workspace_bound(DType::BF16, batch, 2, 32, 128)
                );
            }
        }
        assert_eq!(workspace_bound(DType::F32, 1, 1, 32, 128), 0);
    }
}
