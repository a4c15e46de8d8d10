//! One flash work item: a block of query rows (of one batch entry and one KV head) against a
//! range of keys, with the online softmax. Leaves the running max `m`, sum `l` and unnormalised
//! accumulator in [`Scratch`]; the scheduler writes them out or merges split results.

use super::aligned::AlignedBuf;
use super::amx::TILE as AMX_TILE;
use super::isa::Isa;
use super::math::{
    any_lane_above, axpy, dot, exp, exp_sub_sum_lanes, lane_max, max_of_lanes, sum_of_lanes, tanh,
    MulAdd, LANES,
};
use super::microkernel::{gemm, transpose_rows, Strided, BK, R};
use super::parallel::Exec;
use super::spare::{Kept, Spares};
use crate::dtype::{load_f64, load_row_f32, DType};
use crate::problem::{Operand, Problem};
use crate::sequences::Seq;
use head_tiles::HeadTiles;

mod amx_few;
#[cfg(target_arch = "x86_64")]
mod amx_rows;
mod head_tiles;

/// Rows of a work item: rows `row0..row0+nrows` of the (query position × group head) sequence of
/// KV head `hkv`, so the query heads that share a KV head share its packed K/V tiles (GQA).
#[derive(Clone, Copy, Debug)]
pub struct TileRows {
    pub batch: usize,
    pub hkv: usize,
    pub row0: usize,
    pub nrows: usize,
    /// The lengths of sequence `batch`.
    pub seq: Seq,
}

impl TileRows {
    /// Query position and query head of row `r`.
    #[inline(always)]
    pub fn position(&self, p: &Problem, r: usize) -> (usize, usize) {
        let (g, i) = (p.group_size(), self.row0 + r);
        (i / g, self.hkv * g + i % g)
    }

    /// What the score modifiers need to know about row `r`.
    #[inline(always)]
    pub fn row(&self, p: &Problem, r: usize) -> RowInfo {
        let (qpos, head) = self.position(p, r);
        RowInfo {
            qpos,
            head,
            // SAFETY: alibi has one f32 per [batch, head] (validated).
            slope: p.alibi.as_ref().map_or(0.0, |a| unsafe {
                *(a.at([self.batch, head, 0, 0]) as *const f32)
            }),
            band: p.visible_keys(&self.seq, qpos),
        }
    }
}

/// One query row of a tile: position, head, ALiBi slope and the keys its causal/window band
/// lets it see.
#[derive(Clone, Copy, Debug, Default)]
pub struct RowInfo {
    pub qpos: usize,
    pub head: usize,
    pub slope: f32,
    pub band: (usize, usize),
}

/// Widens the key range `keys` by `band` (empty bands change nothing).
#[inline(always)]
pub fn widen(keys: (usize, usize), band: (usize, usize)) -> (usize, usize) {
    match (band.0 < band.1, keys.0 < keys.1) {
        (false, _) => keys,
        (true, false) => band,
        (true, true) => (keys.0.min(band.0), keys.1.max(band.1)),
    }
}

/// Per-thread buffers, reused across work items.
pub struct Scratch {
    pub q: AlignedBuf<f32>,
    kt: AlignedBuf<f32>,
    /// Transposed K tiles of one KV head, kept for the thread's next items of the same head:
    /// slot `j0 / BK` holds keys `j0..j0+nk` as `kt` would. None when K takes the bf16
    /// dot-product path or the head's tiles exceed [`KT_CACHE_BYTES`]. K of other types is
    /// cached converted to fp32, as widened bf16 tiles (`Isa::Avx512Bf16Decode`) use it: bf16
    /// W2-causal and W3 then ran 3% faster (2-core Xeon), as fast as f32.
    kt_cache: HeadTiles<f32>,
    /// The AMX path's packed K and V key tiles of one KV head ([`amx_rows`]): slot
    /// `j0 / AMX_KEYS` holds K (pairs × AMX_KEYS) then V (pairs × dvp, twice where split).
    /// None where the head's tiles exceed [`AMX_KV_CACHE_BYTES`].
    amx_kv: HeadTiles<u32>,
    row: AlignedBuf<f32>,
    /// BK × head_dim: K rows converted to fp32 before they are transposed (non-f32 K only).
    stage: AlignedBuf<f32>,
    s: AlignedBuf<f32>,
    v: AlignedBuf<f32>,
    pub acc: AlignedBuf<f32>,
    pub m: Vec<f32>,
    pub l: Vec<f32>,
    /// The running sums of [`attend`], 16 lanes a row; [`finish`] adds them up into `l`.
    l_lanes: AlignedBuf<f32>,
    rows: Vec<RowInfo>,
    /// Padded width of V and acc rows (head_dim_v rounded up to 16).
    pub dvp: usize,
    /// bf16 pair-packed operands of the AVX-512 BF16 path: Q (rows × d2), K (d2 × BK),
    /// P (rows × BK/2) and V (BK/2 × dvp); on the AMX path P and V of its wider key tiles,
    /// twice as long where the probabilities are split ([`few_columns`]).
    qp: AlignedBuf<u32>,
    kp: AlignedBuf<u32>,
    pp: AlignedBuf<u32>,
    vp: AlignedBuf<u32>,
    /// The AMX path of a few rows' buffers ([`amx_few`]), empty elsewhere.
    amx_few: AmxFewBufs,
    /// The sizes it was made for.
    shape: ScratchShape,
}

/// Buffers of [`amx_few`]: a step's scores transposed (`st`, keys × 16 rows, and a tile of
/// the last run's), their transpose (`pt`, 16 rows × keys), Qᵀ (`qt`, pairs × 16) and a tile
/// of K rows padded with zeros (`tail`).
struct AmxFewBufs {
    st: AlignedBuf<f32>,
    pt: AlignedBuf<f32>,
    qt: AlignedBuf<u32>,
    tail: AlignedBuf<u32>,
}

impl AmxFewBufs {
    fn new(on: bool, head_dim: usize) -> AmxFewBufs {
        let len = |n: usize| if on { n } else { 0 };
        let (keys, d2) = (amx_few::KEYS, head_dim / 2);
        AmxFewBufs {
            st: AlignedBuf::zeroed(len((keys + AMX_TILE) * AMX_TILE)),
            pt: AlignedBuf::zeroed(len(AMX_TILE * keys)),
            qt: AlignedBuf::zeroed(len(d2 * AMX_TILE)),
            tail: AlignedBuf::zeroed(len(AMX_TILE * d2)),
        }
    }

    fn len(&self) -> usize {
        self.st.len() + self.pt.len() + self.qt.len() + self.tail.len()
    }
}

/// What a [`Scratch`]'s buffer sizes follow from. Two problems of the same shape use every
/// buffer alike, so a scratch may serve the next call as it serves the next item of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ScratchShape {
    /// Rows, rounded up to register blocks.
    rows: usize,
    head_dim: usize,
    head_dim_v: usize,
    /// Tiles of `kt_cache`.
    cached_tiles: usize,
    /// Key tiles of `amx_kv`.
    amx_cached_tiles: usize,
    /// K is converted through `stage` (not f32).
    staged: bool,
    /// Every tile takes a few-rows path, which reads K and V rows in place: no buffers for
    /// packed tiles (a decoding job of 32 heads zeroed 3 MB of them a call).
    few: bool,
    /// The bf16 tiles take the AMX path ([`amx_rows`]), whose key tiles are wider.
    amx: bool,
    /// Tiles of a few rows take the AMX path of their own ([`amx_few`]): 16 rows.
    amx_few: bool,
}

pub fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// Rows of scores computed and turned into probabilities together (4-6 KiB of scores): 16,
/// or 24 with 16-lane vectors, where the AVX2 family's products take rows six at a time
/// (microkernel.rs; the portable family's four at a time divide 24 as well).
const fn score_chunk_rows(lanes: usize) -> usize {
    if lanes == 16 {
        24
    } else {
        16
    }
}

/// Rows of a chunk on the AMX path ([`amx_rows`]): two tile rows, the height of the 2 × 2
/// tile blocks of [`super::amx::gemm`]; a chunk's scores stay in L1 between its steps.
const AMX_CHUNK: usize = 32;

/// Keys of a key tile on the AMX path (a multiple of 32, a whole tile of key pairs): eight of
/// the other families' tiles of [`BK`], so that the fixed costs of a row's softmax and the
/// accumulator tile loads and stores of the P·V product come an eighth as often. With K and
/// V packed once a head (`Scratch::amx_kv`), measured on one core of the 2-core Xeon with AMX
/// (bf16, min / median of alternated runs): 256 keys ran W3 in 76.9 / 80.7 ms against
/// 80.8 / 87.6 at 128 (ten runs each), and 512 keys 68.8 / 73.8 against 71.6 / 76.5 at 256
/// (eight), W2 94.8 / 98.8 against 97.9 / 101.5, W1 6.63 / 7.07 against 6.87 / 7.15 (six);
/// W3-causal alike at all three (its diagonal tiles compute more masked keys). 64 keys ran
/// slower than 128. (Before the packing was kept, 128 and 256 ran alike.)
const AMX_KEYS: usize = 512;

/// Words (u32 or f32) a row of the AMX path's key-wide buffers (K pairs, a chunk's scores and
/// probabilities) runs past its keys: one cache line, so that the 16 rows a tile load or
/// store touches fall into 16 sets of L1 (64 sets of 64 bytes) rather than the two that a
/// stride of 2 KiB maps them to.
const AMX_PAD: usize = 16;
/// The row stride of those buffers' K pairs and scores: [`AMX_KEYS`] and the pad.
const AMX_LD: usize = AMX_KEYS + AMX_PAD;

/// Most bytes of transposed K tiles a thread keeps (one KV head's at most; see
/// `Scratch::kt_cache`): each tile is then transposed once a thread rather than once an item.
const KT_CACHE_BYTES: usize = 1 << 20;

/// u32 words of one AMX key tile's packed K (pairs × [`AMX_KEYS`]) and V ([`AMX_KEYS`]/2
/// pairs × head_dim_v to 16, twice where the probabilities are split, [`few_columns`]), as
/// `Scratch::amx_kv` holds them a slot ([`amx_rows`]).
fn amx_slot_len(head_dim: usize, head_dim_v: usize) -> usize {
    let parts = if few_columns(head_dim_v) { 2 } else { 1 };
    head_dim.div_ceil(2) * AMX_LD + parts * AMX_KEYS / 2 * round_up(head_dim_v, 16)
}

/// Most bytes of packed K and V tiles the AMX path keeps a thread (`Scratch::amx_kv`): 4096
/// keys at head dim 128 in bf16, which the thread then packs once a head rather than once
/// an item (W3, 2048 keys over 8 items a head: the packing was 12% of a core's samples).
const AMX_KV_CACHE_BYTES: usize = 2 << 20;

thread_local! {
    static LOCAL_SPARE: std::cell::RefCell<Vec<Scratch>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The forward's scratch kept between calls ([`super::spare`]).
static SPARE: Spares<Scratch> = Spares::new(&LOCAL_SPARE);

impl Kept for Scratch {
    type Shape = ScratchShape;
    fn shape(&self) -> &ScratchShape {
        &self.shape
    }
    fn bytes(&self) -> usize {
        let f32s: [&[f32]; 10] = [
            &self.q,
            &self.kt,
            &self.row,
            &self.stage,
            &self.s,
            &self.v,
            &self.acc,
            &self.m,
            &self.l,
            &self.l_lanes,
        ];
        let u32s = [&self.qp, &self.kp, &self.pp, &self.vp];
        4 * (f32s.iter().map(|v| v.len()).sum::<usize>()
            + u32s.iter().map(|v| v.len()).sum::<usize>()
            + self.kt_cache.elements()
            + self.amx_kv.elements())
            + self.rows.len() * std::mem::size_of::<RowInfo>()
            + 4 * self.amx_few.len()
    }
}

impl Scratch {
    /// A scratch for items of `max_rows` rows of `p` on the kernel family `isa` (whose bf16
    /// tiles, [`super::Isa::bf16_tiles`], and AMX key tiles need buffers of their own): one
    /// kept from an earlier call ([`Scratch::keep`]) where there is one. Its key-tile caches
    /// are emptied: their tags name a batch entry and head, not the call. Every other buffer
    /// is rewritten before it is read, by each work item, as when one scratch serves a call's
    /// items in turn.
    pub fn reuse(p: &Problem, max_rows: usize, isa: Isa, exec: Exec) -> Scratch {
        let shape = ScratchShape::of(p, max_rows, isa);
        match SPARE.take(&shape, exec) {
            Some(mut sc) => {
                sc.kt_cache.clear();
                sc.amx_kv.clear();
                sc
            }
            None => Scratch::of_shape(shape),
        }
    }

    /// Keeps this scratch of a call run as `exec` for a next call of its shape, if it is
    /// small.
    pub fn keep(self, exec: Exec) {
        SPARE.keep(self, exec);
    }

    fn of_shape(shape: ScratchShape) -> Scratch {
        let ScratchShape {
            rows,
            head_dim: d,
            head_dim_v,
            cached_tiles,
            amx_cached_tiles,
            staged,
            few,
            amx,
            amx_few,
        } = shape;
        let dvp = round_up(head_dim_v, 16);
        let tile_len = if few { 0 } else { d * BK };
        let packed = |len: usize| if few { 0 } else { len };
        // The AMX path's buffers (see amx_rows): K and V of a wide key tile, and a chunk's
        // scores and probabilities.
        let wide = |len: usize, amx_len: usize| if amx { len.max(amx_len) } else { len };
        let (chunk, kb) = (AMX_CHUNK, AMX_KEYS);
        // Split probabilities (see few_columns): P and V twice as long.
        let parts = if amx && few_columns(head_dim_v) { 2 } else { 1 };
        Scratch {
            q: AlignedBuf::zeroed(rows * d),
            kt: AlignedBuf::zeroed(tile_len),
            kt_cache: HeadTiles::new(cached_tiles, BK, d * BK),
            amx_kv: HeadTiles::new(amx_cached_tiles, AMX_KEYS, amx_slot_len(d, head_dim_v)),
            row: AlignedBuf::zeroed(d.max(dvp)),
            stage: AlignedBuf::zeroed(if staged { packed(BK * d) } else { 0 }),
            s: AlignedBuf::zeroed(wide(rows * BK, chunk * AMX_LD)),
            v: AlignedBuf::zeroed(packed(BK * dvp)),
            acc: AlignedBuf::zeroed(rows * dvp),
            m: vec![0.0; rows],
            l: vec![0.0; rows],
            l_lanes: AlignedBuf::zeroed(rows * LANES),
            rows: vec![RowInfo::default(); rows],
            dvp,
            qp: AlignedBuf::zeroed(rows * d.div_ceil(2)),
            kp: AlignedBuf::zeroed(packed(wide(d.div_ceil(2) * BK, d.div_ceil(2) * AMX_LD))),
            pp: AlignedBuf::zeroed(if amx_few {
                AMX_TILE * amx_few::KEYS / 2
            } else {
                packed(parts * wide(rows * BK / 2, chunk * (kb / 2 + AMX_PAD)))
            }),
            vp: AlignedBuf::zeroed(if amx_few {
                amx_few::KEYS / 2 * dvp
            } else {
                packed(parts * wide(BK / 2 * dvp, kb / 2 * dvp))
            }),
            amx_few: AmxFewBufs::new(amx_few, d),
            shape,
        }
    }
}

impl ScratchShape {
    fn of(p: &Problem, max_rows: usize, isa: Isa) -> ScratchShape {
        let amx = isa == Isa::AmxBf16;
        let dot_tiles = dot_tiles(isa.bf16_tiles(), amx, p.head_dim_v) && p.k.dtype == DType::BF16;
        // No tile has more rows than max_rows; the bf16 path (in kernel families that take
        // it) takes more than BF16_FEW_ROWS where the few-rows path in registers does not.
        let few = max_rows <= FEW_ROWS
            && (!dot_tiles
                || max_rows <= BF16_FEW_ROWS
                || few_rows_in_registers(p, max_rows, true));
        let cached_tiles = if !few && !dot_tiles {
            HeadTiles::<f32>::slots_for(p, max_rows, BK, p.head_dim * BK, KT_CACHE_BYTES)
        } else {
            0
        };
        let amx_few = amx && dot_tiles && amx_few::fits(p, max_rows);
        let amx_cached_tiles = if !few && dot_tiles && amx && !amx_few {
            let slot_len = amx_slot_len(p.head_dim, p.head_dim_v);
            HeadTiles::<u32>::slots_for(p, max_rows, AMX_KEYS, slot_len, AMX_KV_CACHE_BYTES)
        } else {
            0
        };
        ScratchShape {
            // The AMX path's products take whole tiles of rows.
            rows: if amx_few {
                AMX_TILE
            } else {
                round_up(max_rows, R)
            },
            head_dim: p.head_dim,
            head_dim_v: p.head_dim_v,
            cached_tiles,
            amx_cached_tiles,
            staged: p.k.dtype != DType::F32,
            few,
            amx: dot_tiles && amx,
            amx_few,
        }
    }
}

/// Whether P·V with the probabilities rounded to bf16 can miss the error bound because V has
/// `columns` columns, one vector's worth or fewer. The rounding is off by about 2^-9 of
/// `Σ p·|v|`, large against an output where a column of V nearly cancels, and with one or two
/// columns the output's error has nothing to average out over (property test, head_dim 1, one
/// KV head, bf16: 1.2-2.3e-2 from the f64 reference against a bound of 1e-2, in the
/// avx512bf16 and amx-bf16 families alike; 1.8e-3 at 16 columns, worst of 60 seeds). There
/// the AMX path splits each probability into two bf16 parts
/// ([`super::avx512_bf16::pack_probability_row`]), and the avx512bf16 family takes the fp32
/// FMA tiles, which ran these head dims as fast as its dot products (2-core Xeon with AMX,
/// bf16 B1 H8 S2048, head_dim 1-16), where splitting cost it a third more time against AMX's
/// tenth. (The backward's bound already allows for P and dS rounded to bf16: see
/// `ufa_testkit::Instance::compare_grads`.)
#[inline(always)]
pub(crate) fn few_columns(head_dim_v: usize) -> bool {
    head_dim_v <= LANES
}

/// Whether the kernel family's bf16 tiles (`tiles`: dot products, `amx`: AMX tiles) are
/// taken for a problem with bf16 K and V of `head_dim_v` columns ([`few_columns`]).
#[inline(always)]
fn dot_tiles(tiles: bool, amx: bool, head_dim_v: usize) -> bool {
    amx || (tiles && !few_columns(head_dim_v))
}

/// Whether a tile takes the bf16 path (dot products or AMX tiles): bf16 inputs, a kernel
/// family that takes them for tiles (`tiles`), more rows than [`BF16_FEW_ROWS`], and not the
/// few-rows path in registers, which reads a decoding tile's K and V faster (B1, 32 query
/// heads over 8 KV heads, 4k keys: 16.7 GB/s against 7.2).
#[inline(always)]
fn bf16_path(tiles: bool, p: &Problem, t: &TileRows) -> bool {
    tiles
        && cfg!(target_arch = "x86_64")
        && p.k.dtype == DType::BF16
        && t.nrows > BF16_FEW_ROWS
        && !few_rows_in_registers(p, t.nrows, true)
}

/// Whether the tiles' scores are bf16 dot products of raw bf16 queries, pair-packed by
/// [`begin`]: on the bf16 path and on the few-rows path in registers alike.
#[inline(always)]
fn dot_pairs<const BF16: bool>(p: &Problem) -> bool {
    BF16 && cfg!(target_arch = "x86_64") && p.k.dtype == DType::BF16
}

/// Whether the few-rows scores of a tile of `nrows` rows take bf16 dot products
/// ([`super::few_rows::scores_pairs`]) rather than fp32 FMAs with K widened
/// ([`super::few_rows::scores`]). One or two rows go at the memory's speed, and one dot product
/// does the work of five instructions that widen and multiply; more rows (grouped-query
/// decoding) are bound by the arithmetic, and where the family takes no dot products in its
/// tiles (`!BF16_TILES`: they run at less than 1.4x the FMAs' flops, half of them on Intel's
/// cores) the FMAs are faster. With them, and the keys blocked as in
/// `few_rows::one_key_at_a_time`: a bf16 decoding step of 16/2 heads over 8k keys 608 → 564 µs,
/// 32/4 over 4k 631 → 582, 32/8 over 4k 692 → 663 (2-core Xeon, family 6 model 207, best of
/// six interleaved rounds from Python); one row a KV head (32/32) unchanged.
#[inline(always)]
fn score_pairs<const BF16: bool, const BF16_TILES: bool>(p: &Problem, nrows: usize) -> bool {
    dot_pairs::<BF16>(p) && (BF16_TILES || nrows <= BF16_FEW_ROWS)
}

/// Whether the few-rows path adds the V rows of a tile of `nrows` rows in bf16 pairs
/// ([`super::value_pairs`]) rather than widened to fp32 for FMAs: grouped-query decoding (more
/// than [`BF16_FEW_ROWS`] rows: fewer go at the memory's speed either way) with bf16 V, in a
/// family whose tiles take the dot products (they run at the FMAs' rate there), with a key's
/// rows of consecutive KV heads side by side ([B, S, H, D], where a job takes several heads
/// key by key). 2-core Zen 4, bf16 from Python, 5-6 interleaved rounds against the FMAs: B8,
/// 32/8 heads over 4k keys 1.14x (best) / 1.19-1.25x (median), B1, 16/2 over 8k 1.34-1.54x.
/// [B, H, S, D] keeps the FMAs: there the pairs were slower (0.66-0.96x; its FMA path read
/// near the memory's speed). A problem property, never a job's: jobs of one head and of
/// several must give the same bits, whatever the thread count makes of them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn value_pairs<const BF16: bool, const BF16_TILES: bool>(p: &Problem, nrows: usize) -> bool {
    BF16_TILES
        && dot_pairs::<BF16>(p)
        && p.v.dtype == DType::BF16
        && nrows > BF16_FEW_ROWS
        && super::value_pairs::serves(p.head_dim_v)
        && p.v.strides[2] <= p.v.strides[1]
}

/// Up to this many rows (and off the bf16 path), a tile takes dot products with K rows and
/// adds V rows in place instead of packing K tiles for register blocks. Decoding with GQA
/// has a row per query head of the group: with 4-8 rows, packing every K tile cost 1.4-2.2x
/// (2-core AVX2, f32, head_dim 64/128, 2-4k keys) and 12-16 rows were about as fast either
/// way.
const FEW_ROWS: usize = 8;

/// The bf16 dot-product path (AVX-512 BF16) takes tiles of more rows than this.
const BF16_FEW_ROWS: usize = 2;

/// Whether tiles of `nrows` rows take the few-rows path in AVX-512 registers
/// ([`super::few_rows`]) in a kernel family with (`avx512`) 512-bit registers: few rows, whole
/// vectors a row, and K and V in a type it widens.
#[inline(always)]
pub fn few_rows_in_registers(p: &Problem, nrows: usize, avx512: bool) -> bool {
    let widened = |t: DType| matches!(t, DType::F32 | DType::BF16 | DType::F16);
    cfg!(target_arch = "x86_64")
        && avx512
        && nrows <= FEW_ROWS
        && widened(p.k.dtype)
        && widened(p.v.dtype)
        && p.head_dim.is_multiple_of(16)
        && p.head_dim_v.is_multiple_of(16)
}

/// Runs a job's items of a few rows on the AMX tile unit ([`amx_few`]) in the AMX family
/// (`AMX`) where their scratch was made for it; returns false, doing nothing, elsewhere.
#[inline(always)]
pub fn attend_amx_few<M: MulAdd, const C: usize, const AMX: bool>(
    p: &Problem,
    ts: &[TileRows],
    keys: (usize, usize),
    scs: &mut [Scratch],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if AMX && scs[0].shape.amx_few {
        // SAFETY: AMX is true only in the AMX family, which runs where the tile unit is
        // usable (or emulated), under avx512bf16; the scratch was made for this path, so
        // `amx_few::fits` held for the problem and its rows.
        unsafe { amx_few::attend::<M, C>(p, ts, keys, scs) };
        return true;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, ts, keys, scs);
    false
}

/// Runs [`attend`] for a job's items together, whose rows are the same query positions of
/// consecutive KV heads of one batch entry, key by key: for each key, the K rows of every
/// head, then likewise V. In [batch, seq, heads, dim] layouts a key's rows of all heads are
/// adjacent, so a job of every KV head reads K and V as two streams in address order; head by
/// head it read 512 bytes and skipped the rest of each key's rows, which a core here reads at a
/// third of the speed of a stream (12 against 33 GB/s on this VM, whatever the prefetching).
/// Each row gets the same arithmetic as in [`attend`]. Returns false, doing nothing, where the
/// items do not take the few-rows path in registers.
#[inline(always)]
pub fn attend_heads<M: MulAdd, const C: usize, const BF16: bool, const BF16_TILES: bool>(
    p: &Problem,
    ts: &[TileRows],
    keys: (usize, usize),
    scs: &mut [Scratch],
) -> bool {
    let t0 = ts[0];
    if ts.len() < 2 || !few_rows_in_registers(p, t0.nrows, C == 64) {
        return false;
    }
    debug_assert!(ts.iter().enumerate().all(
        |(h, t)| (t.batch, t.hkv, t.row0, t.nrows) == (t0.batch, t0.hkv + h, t0.row0, t0.nrows)
    ));
    #[cfg(target_arch = "x86_64")]
    {
        use super::few_rows::{accumulate_heads, scores, scores_pairs, HeadRows};
        use super::value_pairs::{self, PairOrder};
        let (d, dv, dvp) = (p.head_dim, p.head_dim_v, scs[0].dvp);
        let rows = round_up(t0.nrows, R);
        let step = |x: &Operand| x.strides[2] * x.dtype.size_in_bytes();
        // Each head's buffers, addressed afresh after the softmax has written through `scs`.
        let (mut qs, mut qps) = (Vec::with_capacity(ts.len()), Vec::with_capacity(ts.len()));
        let mut ss = Vec::with_capacity(ts.len());
        let (mut ps, mut accs) = (Vec::with_capacity(ts.len()), Vec::with_capacity(ts.len()));
        let pairs = value_pairs::<BF16, BF16_TILES>(p, t0.nrows);
        let reorder = |scs: &mut [Scratch], order: PairOrder| {
            for sc in scs.iter_mut() {
                // SAFETY: `pairs` holds only in families compiled with avx512f; each scratch
                // holds the job's rows.
                unsafe { reorder_pairs(sc, t0.nrows, dv, order) };
            }
        };
        if pairs {
            reorder(scs, PairOrder::Into);
        }
        let ahead = rows_ahead(p, t0.nrows);
        // The bytes of a key's row of a head, hinted ahead (none without).
        let bytes = |x: &Operand, len: usize| {
            if ahead {
                len * x.dtype.size_in_bytes()
            } else {
                0
            }
        };
        let (v_bytes, k_bytes) = (bytes(&p.v, dv), bytes(&p.k, d));
        let mut j0 = keys.0;
        while j0 < keys.1 {
            let nk = (keys.1 - j0).min(BK);
            let mut k_rows = [std::ptr::null::<u8>(); BK];
            let mut v_rows = [std::ptr::null::<u8>(); BK];
            let mut k_next = [std::ptr::null::<u8>(); BK];
            let nk_next = if ahead { (keys.1 - j0 - nk).min(BK) } else { 0 };
            key_rows(&p.k, &t0, j0, &mut k_rows[..nk]);
            key_rows(&p.v, &t0, j0, &mut v_rows[..nk]);
            key_rows(&p.k, &t0, j0 + nk, &mut k_next[..nk_next]);
            let v_ahead = SpanAhead {
                rows: &v_rows[..nk],
                step: step(&p.v),
                bytes: v_bytes,
            };
            let k_ahead = SpanAhead {
                rows: &k_next[..nk_next],
                step: step(&p.k),
                bytes: k_bytes,
            };
            qs.clear();
            qps.clear();
            ss.clear();
            for sc in scs.iter_mut() {
                qs.push(sc.q.as_ptr());
                qps.push(sc.qp.as_ptr());
                ss.push(sc.s.as_mut_ptr());
            }
            let k = HeadRows {
                rows: &k_rows[..nk],
                step: step(&p.k),
            };
            // SAFETY: few_rows_in_registers holds only for C = 64, in functions compiled with
            // avx512f, and checked the dtypes and widths; keys j0..j0+nk of the job's heads
            // lie in the validated views, each head's row `step` bytes after the previous
            // head's; each scratch holds the job's rows.
            unsafe {
                if score_pairs::<BF16, BF16_TILES>(p, t0.nrows) {
                    scores_pairs(t0.nrows, d, k, &qps, &ss, BK, p.scale, v_ahead);
                } else {
                    scores(p.k.dtype, t0.nrows, d, k, &qs, &ss, BK, v_ahead);
                }
            }
            for (t, sc) in ts.iter().zip(scs.iter_mut()) {
                softmax_rows::<M, C>(p, t, (j0, nk), (0, rows), sc);
            }
            ps.clear();
            accs.clear();
            for sc in scs.iter_mut() {
                ps.push(sc.s.as_ptr());
                accs.push(sc.acc.as_mut_ptr());
            }
            let v = HeadRows {
                rows: &v_rows[..nk],
                step: step(&p.v),
            };
            // SAFETY: as for the scores; `pairs` holds only for bf16 V in a family compiled
            // with avx512bf16 and avx512bw.
            unsafe {
                match pairs {
                    true => {
                        value_pairs::accumulate_heads(t0.nrows, dv, v, &ps, &accs, BK, dvp, k_ahead)
                    }
                    false => {
                        accumulate_heads(p.v.dtype, t0.nrows, dv, v, &ps, &accs, BK, dvp, k_ahead)
                    }
                }
            };
            j0 += nk;
        }
        if pairs {
            reorder(scs, PairOrder::Back);
        }
    }
    true
}

/// Loads the tile's queries (pre-multiplied by the softmax scale; raw bf16 pairs on the bf16
/// path), resets the accumulators and returns the union of the rows' visible key ranges.
/// Items on the AMX family's tile path ([`amx_rows`], `AMX`) read only the pairs, so their
/// fp32 queries are not made (4% of a core's time on bf16 W3).
#[inline(always)]
pub fn begin<M: MulAdd, const BF16: bool, const AMX: bool>(
    p: &Problem,
    t: &TileRows,
    sc: &mut Scratch,
) -> (usize, usize) {
    let d = p.head_dim;
    let rows = round_up(t.nrows, R);
    let fp32_rows = !(AMX && bf16_path(true, p, t));
    let mut keys = (0, 0);
    for r in 0..rows {
        let qrow = &mut sc.q[r * d..][..d];
        if r >= t.nrows {
            qrow.fill(0.0);
            let d2 = d.div_ceil(2);
            sc.qp[r * d2..][..d2].fill(0);
            continue;
        }
        let info = t.row(p, r);
        let (qpos, head) = (info.qpos, info.head);
        sc.rows[r] = info;
        keys = widen(keys, info.band);
        if fp32_rows {
            // SAFETY: indices are in bounds of the validated q view.
            unsafe { load_row_f32(p.q.dtype, p.q.at([t.batch, qpos, head, 0]), qrow) };
            qrow.iter_mut().for_each(|x| *x *= p.scale);
        }
        #[cfg(target_arch = "x86_64")]
        if dot_pairs::<BF16>(p) {
            let d2 = d.div_ceil(2);
            // SAFETY: as above; bf16 elements.
            unsafe {
                super::avx512_bf16::pack_row_pairs(
                    p.q.at([t.batch, qpos, head, 0]) as *const u16,
                    d,
                    &mut sc.qp[r * d2..][..d2],
                )
            };
        }
    }
    sc.m[..rows].fill(f32::NEG_INFINITY);
    sc.l[..rows].fill(0.0);
    sc.l_lanes[..rows * LANES].fill(0.0);
    sc.acc[..rows * sc.dvp].fill(0.0);
    keys
}

/// Runs the online softmax over keys `keys.0..keys.1` for the rows loaded by [`begin`].
/// `C` is the SIMD width (in f32 lanes) of the register blocks.
#[inline(always)]
pub fn attend<
    M: MulAdd,
    const C: usize,
    const BF16: bool,
    const BF16_TILES: bool,
    const AMX: bool,
>(
    p: &Problem,
    t: &TileRows,
    keys: (usize, usize),
    sc: &mut Scratch,
) {
    let (d, dv, dvp) = (p.head_dim, p.head_dim_v, sc.dvp);
    let rows = round_up(t.nrows, R);
    // With few rows (decoding) most of a register block would be padding and packing K would
    // cost more than the products: take dot products with K rows and add V rows in place.
    let bf16 = bf16_path(dot_tiles(BF16_TILES, AMX, dv), p, t);
    #[cfg(target_arch = "x86_64")]
    if bf16 && AMX {
        // SAFETY: AMX is true only in the AMX family, which runs where the tile unit is
        // usable (or emulated), under avx512bf16; the bf16 path has bf16 K and V.
        unsafe { amx_rows::attend::<M, C>(p, t, keys, sc) };
        return;
    }
    let few_rows = !bf16 && t.nrows <= FEW_ROWS;
    let registers = few_rows && few_rows_in_registers(p, t.nrows, C == 64);
    #[cfg(target_arch = "x86_64")]
    let pairs = registers && value_pairs::<BF16, BF16_TILES>(p, t.nrows);
    #[cfg(target_arch = "x86_64")]
    if pairs {
        // SAFETY: `pairs` holds only in families compiled with avx512f; `sc` holds the tile's
        // rows.
        unsafe { reorder_pairs(sc, t.nrows, dv, super::value_pairs::PairOrder::Into) };
    }
    let mut j0 = keys.0;
    while j0 < keys.1 {
        let nk = (keys.1 - j0).min(BK);
        // Score columns computed: the tile's keys rounded up to whole vectors. A short last
        // tile (or a short sequence) costs what its keys do, not a full tile.
        let nkp = round_up(nk, LANES);
        // The few-rows path reads K and V row by row: their addresses, found once a tile.
        let mut k_rows = [std::ptr::null::<u8>(); BK];
        let mut v_rows = [std::ptr::null::<u8>(); BK];
        if few_rows {
            key_rows(&p.k, t, j0, &mut k_rows[..nk]);
            key_rows(&p.v, t, j0, &mut v_rows[..nk]);
        }
        if registers {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `registers` holds only for C = 64, in functions compiled with avx512f,
            // and checked the dtypes, widths and rows; the rows are keys j0..j0+nk of the
            // validated k view.
            unsafe {
                let k = super::few_rows::HeadRows {
                    rows: &k_rows[..nk],
                    step: 0,
                };
                let ahead = RowsAhead {
                    t,
                    now: (&p.k, &k_rows[..nk], d),
                    then: (&p.v, j0, dv),
                };
                let s = sc.s.as_mut_ptr();
                if score_pairs::<BF16, BF16_TILES>(p, t.nrows) {
                    let q = sc.qp.as_ptr();
                    super::few_rows::scores_pairs(t.nrows, d, k, &[q], &[s], BK, p.scale, ahead);
                } else {
                    let q = sc.q.as_ptr();
                    super::few_rows::scores(p.k.dtype, t.nrows, d, k, &[q], &[s], BK, ahead);
                }
            }
        } else if few_rows {
            for jj in 0..nk {
                prefetch_ahead(t, jj, (&p.k, &k_rows[..nk], d), (&p.v, j0, dv), false);
                // SAFETY: key j0+jj < seqlen_kv, in bounds of the validated k view.
                let k = unsafe { row_f32(p.k.dtype, k_rows[jj], &mut sc.row[..d]) };
                for r in 0..t.nrows {
                    sc.s[r * BK + jj] = dot::<M>(&sc.q[r * d..][..d], k);
                }
            }
        } else if bf16 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the bf16 path runs only under avx512bf16 (BF16_TILES is true only
            // there).
            unsafe {
                let row = |jj: usize| p.k.at([t.batch, j0 + jj, t.hkv, 0]) as *const u16;
                super::avx512_bf16::pack_transposed_pairs(row, nk, d, nkp, &mut sc.kp, BK);
                let d2 = d.div_ceil(2);
                super::avx512_bf16::gemm::<false>(
                    Strided::rows(&sc.qp, d2),
                    Strided::rows(&sc.kp, BK),
                    &mut sc.s,
                    BK,
                    [rows, nkp, d2],
                    p.scale,
                );
            }
        } else {
            scores_softmax_values_by_chunks::<M, C>(p, t, (j0, nk), rows, sc);
        }
        if few_rows || bf16 {
            softmax_rows::<M, C>(p, t, (j0, nk), (0, rows), sc);
        }
        if registers {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as for the scores.
            unsafe {
                use super::few_rows::{accumulate, accumulate_heads, HeadRows};
                let ahead = RowsAhead {
                    t,
                    now: (&p.v, &v_rows[..nk], dv),
                    then: (&p.k, j0 + nk, d),
                };
                let v = &v_rows[..nk];
                let (n, acc) = (t.nrows, &mut sc.acc);
                if n <= 2 && dv <= 128 {
                    accumulate(p.v.dtype, &sc.s, BK, n, v, dv, acc, dvp, ahead);
                } else {
                    let (v, ps) = (HeadRows { rows: v, step: 0 }, [sc.s.as_ptr()]);
                    let accs = [acc.as_mut_ptr()];
                    // `pairs`: bf16 V in a family compiled with avx512bf16 and avx512bw.
                    match pairs {
                        true => super::value_pairs::accumulate_heads(
                            n, dv, v, &ps, &accs, BK, dvp, ahead,
                        ),
                        false => accumulate_heads(p.v.dtype, n, dv, v, &ps, &accs, BK, dvp, ahead),
                    }
                }
            }
        } else if few_rows {
            for jj in 0..nk {
                prefetch_ahead(t, jj, (&p.v, &v_rows[..nk], dv), (&p.k, j0 + nk, d), false);
                // SAFETY: as for K.
                let v = unsafe { row_f32(p.v.dtype, v_rows[jj], &mut sc.row[..dv]) };
                for r in 0..t.nrows {
                    axpy::<M>(sc.s[r * BK + jj], v, &mut sc.acc[r * dvp..][..dv]);
                }
            }
        } else if bf16 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above; rows j0..j0+nk of the validated v view hold bf16.
            unsafe {
                super::avx512_bf16::pack_probabilities(&sc.s, &mut sc.pp, rows);
                let nk2 = nk.div_ceil(2);
                let row = |jj: usize| p.v.at([t.batch, j0 + jj, t.hkv, 0]) as *const u16;
                super::avx512_bf16::pack_interleaved(row, nk, dv, &mut sc.vp, dvp);
                super::avx512_bf16::gemm::<true>(
                    Strided::rows(&sc.pp, BK / 2),
                    Strided::rows(&sc.vp, dvp),
                    &mut sc.acc,
                    dvp,
                    [rows, dvp, nk2],
                    1.0,
                );
            }
        }
        j0 += nk;
    }
    #[cfg(target_arch = "x86_64")]
    if pairs {
        // SAFETY: as at the start.
        unsafe { reorder_pairs(sc, t.nrows, dv, super::value_pairs::PairOrder::Back) };
    }
}

/// The keys of `keys` that rows `r0..r1` of `t` see (empty where none).
#[inline(always)]
pub(super) fn chunk_keys(
    t: &TileRows,
    sc: &Scratch,
    (r0, r1): (usize, usize),
    keys: (usize, usize),
) -> (usize, usize) {
    let band = (r0..r1.min(t.nrows)).fold((0, 0), |b, r| widen(b, sc.rows[r].band));
    (band.0.max(keys.0), band.1.min(keys.1))
}

/// [`attend`]'s step over key tile `j0..j0+nk` for f32 products (the families without bf16
/// pairs): K packed transposed once for the tile, then a few rows at a time (while they are
/// in L1; a whole tile of scores is larger) their scores, softmax and P·V.
///
/// A chunk computes only the keys its rows see (causal and windowed bands): from the first
/// whole vector of keys one of its rows sees to the last key one sees, none where no row sees
/// any. The keys left out are those whose probabilities are zero in every row of the chunk,
/// and the lanes of the row sums keep their keys, so the results are those of the whole tile,
/// bit for bit; an edge tile costs what its rows see (it cost the whole tile: W3-causal ran
/// at 0.63x W3 on an AMD Zen 3, 2026-12-07).
#[inline(always)]
fn scores_softmax_values_by_chunks<M: MulAdd, const C: usize>(
    p: &Problem,
    t: &TileRows,
    (j0, nk): (usize, usize),
    rows: usize,
    sc: &mut Scratch,
) {
    let (d, dv, dvp) = (p.head_dim, p.head_dim_v, sc.dvp);
    let nkp = round_up(nk, LANES);
    let slot = sc.kt_cache.slot(j0);
    let stage = &mut sc.stage;
    match slot {
        Some(slot) => {
            if let Some(tile) = sc.kt_cache.stale(slot, (t.batch, t.hkv, nk)) {
                pack_transposed::<C>(&p.k, t, (j0, nk), d, nkp, stage, tile);
            }
        }
        None => pack_transposed::<C>(&p.k, t, (j0, nk), d, nkp, stage, &mut sc.kt),
    }
    // Taken out of `sc` while softmax_rows borrows it (moves, not copies).
    let (cache, own) = (std::mem::take(&mut sc.kt_cache), std::mem::take(&mut sc.kt));
    let kt = match slot {
        Some(slot) => cache.get(slot),
        None => &own[..d * BK],
    };
    // f32 V rows whose width needs no padding are read in place (a copy cost ~3% of an f32
    // forward); others (and a paged cache's, whose pages lie anywhere) are converted or padded
    // into `sc.v`.
    let mut staged = std::mem::take(&mut sc.v);
    let ld = p.v.strides[1];
    let in_place = p.v.dtype == DType::F32
        && p.v.strides[3] == 1
        && dv == dvp
        && ld >= dvp
        && p.v.rows.rows_are_evenly_spaced();
    if !in_place {
        for jj in 0..nk {
            let dst = &mut staged[jj * dvp..][..dv];
            // SAFETY: key j0+jj < seqlen_kv, in bounds of the validated v view.
            unsafe { load_row_f32(p.v.dtype, p.v.at([t.batch, j0 + jj, t.hkv, 0]), dst) };
        }
    }
    let (v, ldv) = match in_place {
        // SAFETY: keys j0..j0+nk of this head lie in the validated v view: row jj's dv f32
        // values start ld·jj elements after row 0's.
        true => unsafe {
            let row0 = p.v.at([t.batch, j0, t.hkv, 0]) as *const f32;
            (std::slice::from_raw_parts(row0, (nk - 1) * ld + dv), ld)
        },
        false => (&staged[..], dvp),
    };
    for r0 in (0..rows).step_by(score_chunk_rows(C)) {
        let n = score_chunk_rows(C).min(rows - r0);
        let seen = chunk_keys(t, sc, (r0, r0 + n), (j0, j0 + nk));
        if seen.0 >= seen.1 {
            continue;
        }
        let off = (seen.0 - j0) / LANES * LANES;
        let (jc, nkc) = (j0 + off, seen.1 - j0 - off);
        // Score columns: the keys rounded up to the family's widest block where the tile has
        // them (a 64-column block of the AVX-512 families takes 16 sums in flight, a 16-column
        // one 4: fewer columns would cost more), else to whole vectors, which it always has
        // (`off` is a whole number of vectors and off + nkc <= nk).
        let cols = round_up(nkc, C).min(nkp - off);
        let q = Strided::rows(&sc.q[r0 * d..], d);
        let k = Strided::rows(&kt[off..], BK);
        gemm::<M, C, false>(q, k, &mut sc.s[r0 * BK..], BK, [n, cols, d], 1.0);
        softmax_rows::<M, C>(p, t, (jc, nkc), (r0, r0 + n), sc);
        let probs = Strided::rows(&sc.s[r0 * BK..], BK);
        let values = Strided::rows(&v[off * ldv..], ldv);
        let acc = &mut sc.acc[r0 * dvp..];
        gemm::<M, C, true>(probs, values, acc, dvp, [n, dvp, nkc], 1.0);
    }
    (sc.kt_cache, sc.kt, sc.v) = (cache, own, staged);
}

/// The accumulators of `sc`'s first `nrows` rows (`dv` values each) into or out of the column
/// order the pairs path ([`value_pairs`]) adds in.
///
/// # Safety
/// Needs avx512f; `sc` holds `nrows` rows of `sc.dvp` values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn reorder_pairs(
    sc: &mut Scratch,
    nrows: usize,
    dv: usize,
    order: super::value_pairs::PairOrder,
) {
    super::value_pairs::reorder(sc.acc.as_mut_ptr(), nrows, dv, sc.dvp, order);
}

/// How far ahead the row-by-row path asks for K and V rows. Decoding streams K and V once, and
/// in [batch, seq, heads, dim] layouts consecutive keys of one head are a page apart, which the
/// hardware prefetchers do not follow. Not much further: rows asked for too early (a whole
/// tile of V during the pass over K) evict each other from L1 before they are read.
const PREFETCH_KEYS: usize = 8;

/// The row-by-row path reads one stream of rows: K of a tile, V of the tile, K of the next.
/// While it reads row `jj` of `now` (operand, the addresses of the tile's rows, row length),
/// this asks for the row PREFETCH_KEYS places ahead, which may be one of `then` (operand,
/// first key, row length). Adjacent rows (`[batch, heads, seq, dim]`) are asked for only
/// where `adjacent_too` (see [`prefetch_row`]).
#[inline(always)]
fn prefetch_ahead(
    t: &TileRows,
    jj: usize,
    now: (&Operand, &[*const u8], usize),
    then: (&Operand, usize, usize),
    adjacent_too: bool,
) {
    let (x, rows, len) = now;
    let ahead = jj + PREFETCH_KEYS;
    if ahead < rows.len() {
        if adjacent_too || x.strides[1] > len {
            prefetch(rows[ahead], len * x.dtype.size_in_bytes());
        }
    } else {
        let (x, j0, len) = then;
        prefetch_row(x, t, j0 + ahead - rows.len(), len, adjacent_too);
    }
}

/// [`prefetch_ahead`] for the few-rows path in registers, adjacent rows included: its loop
/// does more work a byte with several rows (GQA), and the hardware prefetchers alone left
/// it short of the memory's rate (B8, 32 query heads over 8 KV heads, 4k keys, bf16 over
/// [B, H, S, D], 2-core Zen 4: 16.5 GB/s, 23.5 with the hints; fp32 21 and 21, one KV head a
/// query head 25 and 30).
#[cfg(target_arch = "x86_64")]
struct RowsAhead<'a> {
    t: &'a TileRows,
    now: (&'a Operand, &'a [*const u8], usize),
    then: (&'a Operand, usize, usize),
}

#[cfg(target_arch = "x86_64")]
impl super::few_rows::Ahead for RowsAhead<'_> {
    #[inline(always)]
    fn ahead(&self, jj: usize, _: usize) {
        prefetch_ahead(self.t, jj, self.now, self.then, true);
    }
}

/// Whether a job of several KV heads hints the cache to load its rows ahead ([`SpanAhead`]):
/// where the arithmetic is the bound (more than two rows a head; one or two read at the
/// memory's speed, and hints slowed them: B1, 32 heads, 4k keys, bf16, 2.0 -> 2.9 ms) and K and
/// V are read from memory, beyond the last-level cache (from it, the hints' instructions cost
/// more than they hid: B1, 16/2 heads over 8k keys, 8 MiB, 0.46 -> 0.58 ms; over 64 MiB, B4,
/// 32/8 heads over 4k keys, 3.6 -> 3.4 ms; 2-core Zen 4, bf16, medians of 16 and best of 12
/// interleaved rounds).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn rows_ahead(p: &Problem, nrows: usize) -> bool {
    let row_bytes =
        p.head_dim * p.k.dtype.size_in_bytes() + p.head_dim_v * p.v.dtype.size_in_bytes();
    let kv_bytes = [p.batch, p.heads_kv, p.seqlen_kv]
        .iter()
        .try_fold(row_bytes, |acc, &x| acc.checked_mul(x))
        .unwrap_or(usize::MAX);
    nrows > 2 && super::last_level_cache().is_some_and(|llc| kv_bytes > llc)
}

/// For a job of several KV heads: while it reads one operand's rows of a tile of keys, hints
/// the cache to load the rows it reads next (the other operand's rows of the same keys, or the
/// next tile's K), into L2: for key `jj` and head `h`, the `bytes` at `rows[jj]` + `h · step`
/// (none where `bytes` is 0).
#[cfg(target_arch = "x86_64")]
struct SpanAhead<'a> {
    rows: &'a [*const u8],
    step: usize,
    bytes: usize,
}

#[cfg(target_arch = "x86_64")]
impl super::few_rows::Ahead for SpanAhead<'_> {
    #[inline(always)]
    fn ahead(&self, jj: usize, h: usize) {
        if let Some(&row) = self.rows.get(jj) {
            prefetch_into::<true>(row.wrapping_add(h * self.step), self.bytes);
        }
    }
}

/// The addresses of rows `j0..j0 + rows.len()` of `x` for this tile's KV head. The row map is
/// consulted once a run of evenly spaced rows (a page of a paged cache): a lookup per row cost
/// a paged decode 15-30% beside a dense one.
#[inline(always)]
fn key_rows(x: &Operand, t: &TileRows, j0: usize, rows: &mut [*const u8]) {
    let (mask, step) = (x.rows.run_mask(), x.strides[1] * x.dtype.size_in_bytes());
    let mut at = std::ptr::null::<u8>();
    for (jj, row) in rows.iter_mut().enumerate() {
        let j = j0 + jj;
        at = if jj == 0 || j & mask == 0 {
            x.at([t.batch, j, t.hkv, 0])
        } else {
            at.wrapping_add(step)
        };
        *row = at;
    }
}

/// Hints the cache to load row `key` of `x` (K or V) for this tile's KV head, where one head's
/// rows are apart or `adjacent_too`: adjacent rows are a stream the hardware prefetchers
/// follow, and for the portable few-rows path explicit hints for them only competed for the
/// same miss buffers (fp32 decoding ran 1.4x slower).
#[inline(always)]
fn prefetch_row(x: &Operand, t: &TileRows, key: usize, len: usize, adjacent_too: bool) {
    if key >= t.seq.seqlen_kv || (x.strides[1] <= len && !adjacent_too) {
        return;
    }
    prefetch(
        x.at([t.batch, key, t.hkv, 0]),
        len * x.dtype.size_in_bytes(),
    );
}

/// Hints the cache to load `bytes` bytes at `base`.
#[inline(always)]
pub(super) fn prefetch(base: *const u8, bytes: usize) {
    prefetch_into::<false>(base, bytes);
}

/// Hints the cache to load `bytes` bytes at `base`: into L1, or where `L2`, into L2 only (rows
/// wanted a whole pass over a tile later, which L1 would evict first).
#[inline(always)]
fn prefetch_into<const L2: bool>(base: *const u8, bytes: usize) {
    for off in (0..bytes).step_by(64) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch never faults.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
            let at = base.wrapping_add(off) as *const i8;
            match L2 {
                true => _mm_prefetch::<_MM_HINT_T1>(at),
                false => _mm_prefetch::<_MM_HINT_T0>(at),
            }
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = off;
    }
}

/// The online softmax over rows `r0..r1` of a tile of scores (`sc.s`, keys `j0..j0+nk`): P in
/// place of S, the running maxima and sums updated, the accumulators rescaled.
///
/// A row whose scores all stay at or below its running maximum keeps that maximum, so its
/// rescaling factor would be exactly 1 (exp(0) = 1 here, and l·1 + sum = l + sum): the
/// maximum across lanes, the factor and the rescaling are computed only for rows whose
/// maximum moves, with the same results as computing them always. On most tiles past the
/// first few, few rows move.
#[inline(always)]
fn softmax_rows<M: MulAdd, const C: usize>(
    p: &Problem,
    t: &TileRows,
    (j0, nk): (usize, usize),
    (r0, r1): (usize, usize),
    sc: &mut Scratch,
) {
    let dvp = sc.dvp;
    // Columns past the tile's keys rounded up to a vector are neither computed nor read.
    let width = round_up(nk, LANES);
    for r in r0..r1 {
        let s = &mut sc.s[r * BK..][..width];
        if r >= t.nrows {
            s.fill(0.0); // padding: P = 0
            continue;
        }
        let l: &mut [f32; LANES] = (&mut sc.l_lanes[r * LANES..][..LANES]).try_into().unwrap();
        let acc = &mut sc.acc[r * dvp..][..dvp];
        softmax_row::<M, C>(p, t, &sc.rows[r], (j0, nk), s, (&mut sc.m[r], l, acc));
    }
}

/// The online softmax of one row's scores `s` (keys `j0..j0+nk`, then padding to a whole
/// vector) against its running max, sums in lanes and accumulator: `s` becomes the row's
/// probabilities (after dropout), the accumulator is rescaled where the max grows.
#[inline(always)]
fn softmax_row<M: MulAdd, const C: usize>(
    p: &Problem,
    t: &TileRows,
    row: &RowInfo,
    (j0, nk): (usize, usize),
    s: &mut [f32],
    (m, l, acc): (&mut f32, &mut [f32; LANES], &mut [f32]),
) {
    apply_score_mods::<M>(p, t, row, j0, nk, s, None);
    let Some((m_new, corr)) = update_max::<M>(lane_max_of::<M, C>(s), s, m, acc) else {
        s.fill(0.0); // nothing visible yet: P = 0, state unchanged
        return;
    };
    *l = exp_sub_sum_lanes::<M>(s, m_new, l, corr);
    // Dropout after the sum: the LSE is that of the probabilities before it.
    if let Some(d) = &p.dropout {
        d.apply(t.batch * p.heads_q + row.head, row.qpos, j0, &mut s[..nk]);
    }
}

/// A row's running maximum `m` after a tile whose scores `s` have lane maxima `lanes`, and
/// the factor exp(m_old - m_new) its output `acc` was rescaled by; None, with nothing changed,
/// while the row has seen no key (every score so far -inf).
#[inline(always)]
pub(super) fn update_max<M: MulAdd>(
    lanes: [f32; LANES],
    s: &[f32],
    m: &mut f32,
    acc: &mut [f32],
) -> Option<(f32, f32)> {
    let m_old = *m;
    if any_lane_above(&lanes, m_old) {
        let m_new = m_old.max(max_of_lanes(lanes));
        // m_new > m, so m - m_new is never NaN (m = -inf gives exactly 0).
        let corr = exp::<M>(m_old - m_new);
        acc.iter_mut().for_each(|a| *a *= corr);
        *m = m_new;
        Some((m_new, corr))
    } else if m_old == f32::NEG_INFINITY {
        // No lane above -inf: the row has seen no key yet, unless some score is NaN (a NaN
        // is never a maximum). Then the row's result is NaN, as in the reference: a
        // maximum of NaN keeps every later P, the sum and the output NaN.
        if !s.iter().any(|x| x.is_nan()) {
            return None;
        }
        *m = f32::NAN;
        Some((f32::NAN, 1.0))
    } else {
        Some((m_old, 1.0))
    }
}

/// [`lane_max`] of a row of scores; the AVX-512 families (`C` = 64) take it in 512-bit
/// registers and the AVX2 family ([`super::isa::avx2_family`]) in two 256-bit ones (the compiler's
/// own version of the loop moved two lanes at a time).
#[inline(always)]
pub(super) fn lane_max_of<M: MulAdd, const C: usize>(s: &[f32]) -> [f32; LANES] {
    #[cfg(target_arch = "x86_64")]
    if C == 64 {
        // SAFETY: C = 64 only in functions compiled with avx512f; `s` is read in bounds.
        return unsafe { x86::lane_max(s) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::isa::avx2_family::<M, C>() {
        // SAFETY: the AVX2 family runs inside isa.rs's run_avx2 (avx2, fma); read in bounds.
        return unsafe { x86::lane_max_avx2(s) };
    }
    lane_max(s)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::LANES;
    use std::arch::x86_64::*;

    /// Lane-wise maxima of `s` (length a multiple of 16), as [`super::lane_max`] takes them.
    ///
    /// # Safety
    /// Needs avx512f.
    #[inline(always)]
    pub unsafe fn lane_max(s: &[f32]) -> [f32; LANES] {
        let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
        for chunk in s.chunks_exact(LANES) {
            // max(x, acc) is x where x > acc, else acc (also where x is NaN), as lane_max.
            acc = _mm512_max_ps(_mm512_loadu_ps(chunk.as_ptr()), acc);
        }
        std::mem::transmute::<__m512, [f32; LANES]>(acc)
    }

    /// [`lane_max`] in two 256-bit halves (lanes 0-7 and 8-15 of each 16).
    ///
    /// # Safety
    /// Needs avx2.
    #[inline(always)]
    pub unsafe fn lane_max_avx2(s: &[f32]) -> [f32; LANES] {
        let mut acc = [_mm256_set1_ps(f32::NEG_INFINITY); 2];
        for chunk in s.chunks_exact(LANES) {
            for (h, a) in acc.iter_mut().enumerate() {
                // As above: the new value where it is greater, else the running one.
                *a = _mm256_max_ps(_mm256_loadu_ps(chunk.as_ptr().add(8 * h)), *a);
            }
        }
        std::mem::transmute::<[__m256; 2], [f32; LANES]>(acc)
    }
}

/// Forms the sums `l` of the rows [`attend`] ran over, once it has seen all their keys.
#[inline(always)]
pub fn finish(t: &TileRows, sc: &mut Scratch) {
    for r in 0..t.nrows {
        sc.l[r] = sum_of_lanes(&sc.l_lanes[r * LANES..][..LANES]);
    }
}

/// Packs keys `j0..j0+nk` of `x` (K or V, `len` elements a row) transposed (`len` × BK) into
/// `dst`; columns `nk..width` are zero. Rows that are not f32 are converted into `stage`
/// (BK × `len`) first.
#[inline(always)]
pub(super) fn pack_transposed<const C: usize>(
    x: &Operand,
    t: &TileRows,
    (j0, nk): (usize, usize),
    len: usize,
    width: usize,
    stage: &mut [f32],
    dst: &mut [f32],
) {
    let at = |jj: usize| x.at([t.batch, j0 + jj, t.hkv, 0]);
    // SAFETY: keys j0+jj < seqlen_kv lie in the validated view; staged rows hold `len` values.
    unsafe {
        if x.dtype == DType::F32 {
            transpose_rows::<C, f32>(|jj| at(jj) as *const f32, nk, len, width, dst, BK);
        } else {
            for jj in 0..nk {
                load_row_f32(x.dtype, at(jj), &mut stage[jj * len..][..len]);
            }
            let rows = stage.as_ptr();
            transpose_rows::<C, f32>(|jj| rows.add(jj * len), nk, len, width, dst, BK);
        }
    }
}

/// Row `ptr` of `buf.len()` elements as fp32: read in place for f32 data, converted into `buf`
/// otherwise.
///
/// # Safety
/// `ptr` must address `buf.len()` readable, aligned elements of `dtype`.
#[inline(always)]
unsafe fn row_f32(dtype: DType, ptr: *const u8, buf: &mut [f32]) -> &[f32] {
    if dtype == DType::F32 {
        std::slice::from_raw_parts(ptr as *const f32, buf.len())
    } else {
        load_row_f32(dtype, ptr, buf);
        buf
    }
}

/// Softcap, ALiBi, the additive or boolean mask and the causal/window band, applied to one row
/// of raw scores for keys `j0..j0+nk`; columns past `nk` become -inf.
#[inline(always)]
pub(super) fn apply_score_mods<M: MulAdd>(
    p: &Problem,
    t: &TileRows,
    row: &RowInfo,
    j0: usize,
    nk: usize,
    s: &mut [f32],
    cap_slope: Option<&mut [f32]>,
) {
    let RowInfo {
        qpos,
        head,
        slope,
        band,
    } = *row;
    if p.softcap > 0.0 {
        let (cap, inv) = (p.softcap, 1.0 / p.softcap);
        match cap_slope {
            // The backward pass needs d(score)/d(raw score) = 1 - tanh².
            Some(ds) => {
                for (x, d) in s[..nk].iter_mut().zip(ds.iter_mut()) {
                    let t = tanh::<M>(*x * inv);
                    *x = cap * t;
                    *d = 1.0 - t * t;
                }
            }
            None => s[..nk]
                .iter_mut()
                .for_each(|x| *x = cap * tanh::<M>(*x * inv)),
        }
    }
    if p.alibi.is_some() {
        let c = qpos as i64 + t.seq.diag_offset;
        for (jj, x) in s[..nk].iter_mut().enumerate() {
            *x -= slope * (c - (j0 + jj) as i64).unsigned_abs() as f32;
        }
    }
    if let Some(mask) = &p.mask {
        let base = mask.at([t.batch, head, qpos, j0]);
        let step = mask.strides[3] * mask.dtype.size_in_bytes();
        for (jj, x) in s[..nk].iter_mut().enumerate() {
            // SAFETY: the mask view broadcasts over [batch, heads_q, seqlen_q, seqlen_kv].
            let mv = unsafe { load_f64(mask.dtype, base.wrapping_add(jj * step)) };
            if mask.dtype == DType::Bool {
                if mv == 0.0 {
                    *x = f32::NEG_INFINITY;
                }
            } else {
                *x += mv as f32;
            }
        }
    }
    let (lo, hi) = band;
    if j0 < lo || j0 + nk > hi {
        for (jj, x) in s[..nk].iter_mut().enumerate() {
            let j = j0 + jj;
            if j < lo || j >= hi {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    s[nk..].fill(f32::NEG_INFINITY);
}
