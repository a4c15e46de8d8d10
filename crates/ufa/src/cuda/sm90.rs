//! The Hopper kernels (kernels/fwd_sm90.cu, bwd_sm90.cu): their tile tables and the inline-PTX
//! wgmma wrappers each variant needs (generated into its wgmma_ops.cuh).
//!
//! A wgmma names every accumulator register in its operand list, so each shape (m64nNk16) needs
//! its own asm statement; they are generated here for the two N a variant uses instead of
//! keeping a hand-written list of 64- to 128-operand statements in the repository.

/// Whether code compiled for `arch` may use wgmma: only the sm_90a target has it (which
/// [`super::driver::arch_name`] gives compute capability 9.0; later chips have other MMAs).
pub(crate) fn runs_wgmma(arch: &str) -> bool {
    arch == "sm_90a"
}

/// Head dims the Hopper kernel handles: whole 64-element (128-byte) swizzle atoms.
pub(crate) const WGMMA_HEAD_DIMS: [usize; 4] = [64, 128, 192, 256];

/// Tile sizes of one Hopper forward variant; see [`wgmma_tile_for`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct WgmmaTile {
    pub head_dim: u32,
    /// Query rows a block: 64 per warpgroup.
    pub block_m: u32,
    /// Keys a tile: the N of S = Q Kᵀ.
    pub block_n: u32,
    /// K/V buffers in shared memory.
    pub stages: u32,
    pub min_blocks: u32,
}

impl WgmmaTile {
    pub fn threads(&self) -> u32 {
        self.block_m / 64 * 128
    }

    /// `WgmmaConfig::kSmemBytes`: Q, `stages` K and V tiles, and 1024 bytes to align them.
    pub fn smem_bytes(&self) -> u32 {
        (self.block_m + 2 * self.stages * self.block_n) * self.head_dim * 2 + 1024
    }

    /// Whether the kernel template's static_asserts accept this shape.
    pub fn is_valid(&self) -> bool {
        self.block_m >= 64
            && self.block_m.is_multiple_of(64)
            && self.block_m <= 256
            && self.block_n >= 16
            && self.block_n.is_multiple_of(16)
            && self.block_n <= 256
            && self.stages >= 2
            && WGMMA_HEAD_DIMS.contains(&(self.head_dim as usize))
    }
}

/// Environment variable overriding the Hopper tile table for tuning experiments:
/// `block_m,block_n,stages,min_blocks`, applied to every head dim where it is valid.
pub const WGMMA_TILE_ENV: &str = "UFA_CUDA_WGMMA_TILE";

/// `UFA_CUDA_WGMMA=0` sends Hopper problems to the sm_80 kernel (to test and time it there).
pub const WGMMA_ENV: &str = "UFA_CUDA_WGMMA";

/// Whether the Hopper kernel may be used (not switched off by [`WGMMA_ENV`]).
pub(crate) fn wgmma_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var(WGMMA_ENV).map_or(true, |v| v.trim() != "0"))
}

/// The tile table (H200, bf16, seqlen 4096, 2026-11-26; `scripts/gpu-tune fwd`):
/// - two warpgroups (128 query rows) a block: while one runs its softmax the other's MMAs
///   keep the tensor cores busy. Three (192 rows) gained 5% at d64/d128 without causal
///   masking and lost as much with it;
/// - head dims 64 and 128: two blocks an SM (four warpgroups to interleave), which caps
///   registers at 128 a thread: 128 keys a tile at d64 (431 TFLOP/s against 304 with one
///   block), 64 at d128 (489 against 408 with 128 keys and one block; 128 keys and two blocks
///   make ptxas serialise the wgmmas for lack of registers);
/// - larger head dims: one block of 64 keys a tile (O alone takes 96 or 128 registers);
///   80 keys measured the same at d256;
/// - score-modifying variants (softcap, ALiBi, masks): one block an SM, since under the
///   two-block register cap their per-element work spilled 300 bytes;
/// - variants with sequence metadata (packed batches, caches read in place or through
///   `cache_batch_idx`) as the dense ones: under the two-block cap they spill 40 bytes at d128
///   where the dense variant spills 12 (ptxas of NVRTC 13.0, 2026-12-03), and with one block
///   a packed batch ran at 0.77x of the same tokens dense (H200);
/// - paged variants: one block an SM, since the block-table loads under the two-block cap
///   spilled 124 bytes at d128;
/// - dropout variants: one block an SM, for the generator's registers;
/// - two K/V stages: the next pair loads during the whole of this one's math.
pub(crate) fn wgmma_tile_for(
    head_dim: usize,
    score_mod: bool,
    paged: bool,
    dropout: bool,
    max_smem: u32,
) -> Option<WgmmaTile> {
    if !WGMMA_HEAD_DIMS.contains(&head_dim) {
        return None;
    }
    let default = WgmmaTile {
        head_dim: head_dim as u32,
        block_m: 128,
        block_n: if head_dim <= 64 { 128 } else { 64 },
        stages: 2,
        min_blocks: if head_dim <= 128 && !score_mod && !paged && !dropout {
            2
        } else {
            1
        },
    };
    let fits = |t: &WgmmaTile| t.is_valid() && t.smem_bytes() <= max_smem;
    let over = tile_override().map(|t| WgmmaTile {
        head_dim: head_dim as u32,
        ..t
    });
    over.into_iter().chain([default]).find(fits)
}

fn tile_override() -> Option<WgmmaTile> {
    static OVERRIDE: std::sync::OnceLock<Option<WgmmaTile>> = std::sync::OnceLock::new();
    *OVERRIDE.get_or_init(|| parse_wgmma_tile(&std::env::var(WGMMA_TILE_ENV).ok()?))
}

/// Parses `block_m,block_n,stages,min_blocks` (head_dim left 0, not validated).
pub(crate) fn parse_wgmma_tile(s: &str) -> Option<WgmmaTile> {
    let [block_m, block_n, stages, min_blocks] = super::tiles::parse_numbers(s)?;
    Some(WgmmaTile {
        head_dim: 0,
        block_m,
        block_n,
        stages,
        min_blocks: min_blocks.max(1),
    })
}

/// Tile sizes of one warp-specialised Hopper forward variant (kernels/fwd_sm90_tma.cu); see
/// [`tma_tile_for`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TmaFwdTile {
    /// The columns S = Q Kᵀ sums over: the Q/K head dim rounded up to the wgmma k-step (16).
    pub head_dim: u32,
    /// O's columns: the V head dim (a multiple of 8, the wgmma n-step; MLA's 192/128 pair has
    /// 128 here).
    pub head_dim_v: u32,
    /// Query rows a block: 64 per consumer warpgroup.
    pub block_m: u32,
    /// Keys a tile: the N of S = Q Kᵀ.
    pub block_n: u32,
    /// K and V buffers of the ring.
    pub stages: u32,
    /// Two consumers take turns issuing their MMAs.
    pub pingpong: bool,
    /// One block an SM walks the tiles (grid: [`TmaFwdTile::grid`]).
    pub persistent: bool,
}

impl TmaFwdTile {
    fn consumers(&self) -> u32 {
        self.block_m / 64
    }

    /// Width of Q's and K's tiles in shared memory: whole 128-byte swizzle rows
    /// (`sw128_width` of the kernel); TMA fills the columns past the head dim with zeros.
    pub fn qk_tile_width(&self) -> u32 {
        self.head_dim.div_ceil(64) * 64
    }

    /// Width of V's tiles in shared memory, likewise.
    pub fn v_tile_width(&self) -> u32 {
        self.head_dim_v.div_ceil(64) * 64
    }

    /// The consumers and the producer warpgroup.
    pub fn threads(&self) -> u32 {
        (self.consumers() + 1) * 128
    }

    /// `TmaFwdConfig::kSmemBytes`: Q, the K and V rings, four barriers a stage and Q's two,
    /// and 1024 bytes to align the tiles.
    pub fn smem_bytes(&self) -> u32 {
        let (qk, v) = (self.qk_tile_width(), self.v_tile_width());
        (self.block_m * qk + self.stages * self.block_n * (qk + v)) * 2
            + (2 + 4 * self.stages) * 8
            + 1024
    }

    /// The launch grid, given the grid of a block a (query block, head, batch) tile: that
    /// one, or (persistent) a block an SM for at most as many tiles.
    pub fn grid(&self, dense: (u32, u32, u32), sms: u32) -> (u32, u32, u32) {
        if !self.persistent {
            return dense;
        }
        let tiles = dense.0 as u64 * dense.1 as u64 * dense.2 as u64;
        (tiles.min(sms as u64) as u32, 1, 1)
    }

    /// Whether the kernel template's static_asserts accept this shape.
    pub fn is_valid(&self) -> bool {
        (64..=256).contains(&self.block_m)
            && self.block_m.is_multiple_of(64)
            && (16..=256).contains(&self.block_n)
            && self.block_n.is_multiple_of(16)
            && self.stages >= 2
            && (!self.pingpong || self.consumers() == 2)
            && (16..=256).contains(&self.head_dim)
            && self.head_dim.is_multiple_of(16)
            && (8..=256).contains(&self.head_dim_v)
            && self.head_dim_v.is_multiple_of(8)
    }
}

/// `UFA_CUDA_OFF_TILE=1` (the default) lets the Hopper wgmma kernels take head dims off their
/// tile widths as their own: the warp-specialised forward Q/K and V of different head dims (MLA's
/// 192/128) and MMAs of the real widths on padded tiles ([`tma_tile_for`]), the backward head
/// dims between its tiles and unequal pairs ([`bwd_tile_head_dim`]); `0` keeps them to what
/// ran before (the forward equal head dims above 32, its MMAs spanning whole tiles; the
/// backward 64, 128 and 256 exactly), the rest on mma.sync. Unset, [`OFF_TILE_DEFAULT`]
/// decides.
pub const OFF_TILE_ENV: &str = "UFA_CUDA_OFF_TILE";

/// Whether the wgmma kernels take head dims off their tile widths by default: yes since the
/// forward, backward and dropout suites passed with it on an H100 and compute-sanitizer's
/// memcheck and racecheck of the forward and backward cases were clean (2026-12-05), where it
/// ran the forward at head dims 48, 80 and 96 at 0.82-1.13x the TFLOP/s of the nearest tile
/// width, MLA's 192/128 at 1.10-1.13x cuDNN's (3.3-3.4x what mma.sync ran), and the backward
/// at head dims between the tiles and MLA's pair 1.55-1.72x faster
/// (`bench/results/head_dims_2026-12-05_h100_off_tile.md`). `scripts/gpu-check` runs the
/// forward and dropout suites with it off too.
pub const OFF_TILE_DEFAULT: bool = true;

/// Whether head dims off the tile widths take the wgmma kernels ([`OFF_TILE_ENV`], else
/// [`OFF_TILE_DEFAULT`]).
pub fn off_tile_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| env_switch(OFF_TILE_ENV, OFF_TILE_DEFAULT))
}

/// The (Q/K, V) head dims the warp-specialised forward runs a problem's with: its own
/// (`off_tile`), or as before off-tile dims were its own: equal head dims above 32 on the
/// whole tile that holds them.
pub(crate) fn tma_head_dims(
    head_dim: usize,
    head_dim_v: usize,
    off_tile: bool,
) -> Option<(usize, usize)> {
    if off_tile {
        return Some((head_dim, head_dim_v));
    }
    let tile = WGMMA_HEAD_DIMS.into_iter().find(|&t| t >= head_dim)?;
    (head_dim == head_dim_v && head_dim > 32 && head_dim.is_multiple_of(8)).then_some((tile, tile))
}

/// (Q/K, V) head dims off the tile widths whose warp-specialised forward the variant catalogue
/// holds (and CI compiles), and whether with every score and dropout flag or plain only:
/// DeepSeek-V2/V3's MLA (192/128) in training and prefill, and head dims of common models
/// between the tile widths (Phi-2's 80, Phi-3's 96; 32 and 48). Every other pair instantiates
/// the same template with other extents, compiled when a call first needs it, as every
/// variant is.
#[cfg(any(test, feature = "testkit"))]
pub(crate) const TMA_FWD_OFF_TILE_DIMS: [(usize, usize, bool); 5] = [
    (192, 128, true),
    (96, 96, false),
    (80, 80, false),
    (48, 48, false),
    (32, 32, false),
];

/// The query rows and keys from which a problem without a band counts as long for
/// [`tma_tile_for`].
pub(crate) const WIDE_FWD_MIN_SEQLEN: usize = 2048;

/// Environment variable overriding the warp-specialised forward's tiles for tuning
/// experiments: `block_m,block_n,stages,pingpong,persistent` (the last two 0 or 1).
pub const TMA_FWD_TILE_ENV: &str = "UFA_CUDA_TMA_FWD_TILE";

/// `UFA_CUDA_TMA_FWD=1` sends dense Hopper problems to the warp-specialised forward
/// (fwd_sm90_tma.cu), `0` to the cp.async one (fwd_sm90.cu); unset, [`TMA_FWD_DEFAULT`]
/// decides.
pub const TMA_FWD_ENV: &str = "UFA_CUDA_TMA_FWD";

/// Whether dense Hopper problems take the warp-specialised forward by default: yes since it
/// passed the forward suites on an H100 (2026-12-05: `cuda_forward` and `cuda_dropout` with it
/// on, compute-sanitizer memcheck and racecheck clean) and ran 1.05-1.52x the cp.async kernel's
/// TFLOP/s at head dims 64-256 and 1.6-2.1x at the padded ones
/// (`bench/results/gpu_hopper_fwd_ws_2026-12-05_h100.md`).
pub const TMA_FWD_DEFAULT: bool = true;

/// Whether the warp-specialised forward is used ([`TMA_FWD_ENV`], else [`TMA_FWD_DEFAULT`]).
pub fn tma_fwd_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| env_switch(TMA_FWD_ENV, TMA_FWD_DEFAULT))
}

/// `UFA_CUDA_BWD_PDL=0` launches a backward call's kernels in plain stream order instead of
/// as programmatic dependents (mod.rs), for profiling: a dependent's profiled time includes
/// its wait for the kernel before it.
pub const BWD_PDL_ENV: &str = "UFA_CUDA_BWD_PDL";

/// Whether a backward call's kernels after its first launch as programmatic dependents
/// ([`BWD_PDL_ENV`], else yes).
pub(crate) fn bwd_pdl_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| env_switch(BWD_PDL_ENV, true))
}

/// The on/off switch environment variable `var` sets (`1` on, `0` off), else `default`.
fn env_switch(var: &str, default: bool) -> bool {
    std::env::var(var).map_or(default, |v| match v.trim() {
        "0" => false,
        "1" => true,
        _ => default,
    })
}

/// The warp-specialised forward's tiles: one persistent block an SM (a producer and two
/// consumers take its registers), 128 query rows, two K/V stages, the consumers taking turns;
/// keys a tile as many as the consumers' registers hold beside O (D / 2 floats), S (N / 2)
/// and P (N / 4): 128 at head dims 64 and 128, 96 at 192, 80 at 256 (whose two stages
/// then just fit 227 KiB), 64 there for the score-modifying and dropout variants (with 80
/// keys their per-element work spilled 80-90 bytes; ptxas of NVRTC 13.0, 2026-12-05).
///
/// Any head dims that are multiples of 8 up to 256: the tiles in shared memory are whole
/// 128-byte swizzle rows (64, 128, 192 or 256 columns; the tensor maps span the real head
/// dims, so TMA fills the columns past them with zeros), but the MMAs span only the real
/// columns, to the wgmma k-step of 16 for Q·K and the n-step of 8 for O, and the epilogue
/// stores only the real ones.
///
/// Q/K and V may differ (`head_dim_v`, MLA's 192/128). The keys a tile follow V's tile
/// width, since O's registers are what the consumers hold beside S and P, then shrink by 16
/// until the two rings fit shared memory (192/128: 128 keys, 209 KiB).
///
/// `long_unbanded`: no causal or window band and at least [`WIDE_FWD_MIN_SEQLEN`] query rows
/// and keys. Plain head dim 64 then takes three consumers (192 query rows a block) that do not
/// take turns: on an H200 (bf16, 2026-12-06, `scripts/gpu-tune fwd`) 1.07x the two-consumer
/// tile's TFLOP/s at 8 x 2048 x 32 heads, 1.07x at 4 x 4096, 1.17x at 2 x 8192 (541
/// TFLOP/s), but 0.985x at 16 x 1024, and 0.82-0.98x under a causal band up to 4096 keys
/// (more query blocks with little work each, not interleaved).
pub(crate) fn tma_tile_for(
    head_dim: usize,
    head_dim_v: usize,
    score_mod: bool,
    dropout: bool,
    long_unbanded: bool,
    max_smem: u32,
) -> Option<TmaFwdTile> {
    // Tensor-map rows are whole 16-byte pieces; a tile is at most 256 columns.
    let mappable = |d: usize| d > 0 && d.is_multiple_of(8) && d <= 256;
    if !mappable(head_dim) || !mappable(head_dim_v) {
        return None;
    }
    let mut default = TmaFwdTile {
        head_dim: head_dim.next_multiple_of(16) as u32,
        head_dim_v: head_dim_v as u32,
        block_m: 128,
        block_n: 0,
        stages: 2,
        pingpong: true,
        persistent: true,
    };
    default.block_n = match default.v_tile_width() {
        64 | 128 => 128,
        192 => 96,
        _ if score_mod || dropout => 64,
        _ => 80,
    };
    while default.smem_bytes() > max_smem && default.block_n > 64 {
        default.block_n -= 16;
    }
    if long_unbanded && (head_dim, head_dim_v) == (64, 64) && !score_mod && !dropout {
        default.block_m = 192;
        default.pingpong = false;
    }
    let fits = |t: &TmaFwdTile| t.is_valid() && t.smem_bytes() <= max_smem;
    let over = tma_tile_override().map(|t| TmaFwdTile {
        head_dim: default.head_dim,
        head_dim_v: default.head_dim_v,
        ..t
    });
    over.into_iter().chain([default]).find(fits)
}

fn tma_tile_override() -> Option<TmaFwdTile> {
    static OVERRIDE: std::sync::OnceLock<Option<TmaFwdTile>> = std::sync::OnceLock::new();
    *OVERRIDE.get_or_init(|| {
        let [block_m, block_n, stages, pingpong, persistent] =
            super::tiles::parse_numbers(&std::env::var(TMA_FWD_TILE_ENV).ok()?)?;
        Some(TmaFwdTile {
            head_dim: 0,
            head_dim_v: 0,
            block_m,
            block_n,
            stages,
            pingpong: pingpong != 0,
            persistent: persistent != 0,
        })
    })
}

/// The warp-specialised forward's entry-point call.
pub(crate) fn tma_call(
    tile: &TmaFwdTile,
    score_mod: bool,
    dropout: bool,
    type_tag: &str,
) -> String {
    let config = format!(
        "TmaFwdConfig<{}, {}, {}, {}, {}, {}, {}>",
        tile.head_dim,
        tile.head_dim_v,
        tile.block_m,
        tile.block_n,
        tile.stages,
        tile.pingpong,
        tile.persistent
    );
    entry_call(
        "fwd_sm90_tma",
        config,
        tile.smem_bytes(),
        &format!("{score_mod}, {dropout}"),
        type_tag,
    )
}

/// How a wrapper takes its A operand.
#[derive(Clone, Copy)]
pub(crate) enum AOperand {
    /// A shared-memory descriptor (`uint64_t desc_a`).
    Shared,
    /// Four registers of packed 16-bit pairs (`const uint32_t (&a)[4]`), the mma.sync A
    /// fragment layout.
    Registers,
}

impl AOperand {
    /// The wrapper's parameter for A.
    fn param(self) -> &'static str {
        match self {
            AOperand::Shared => "uint64_t desc_a",
            AOperand::Registers => "const uint32_t (&a)[4]",
        }
    }
}

/// The asm statement of one m64nN wgmma with fp32 accumulators `d` (`shape_types`: the rest of
/// the shape and the types, e.g. `k16.f32.bf16.bf16`), A as `a` says, B from `desc_b`, and the
/// scale/transpose immediates `imms`; `accumulate == 0` overwrites `d`.
fn wgmma_statement(n: u32, a: AOperand, shape_types: &str, imms: &str) -> String {
    let acc = n / 2;
    let regs = (0..acc)
        .map(|i| format!("%{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let outputs = (0..acc)
        .map(|i| format!("\"+f\"(d[{i}])"))
        .collect::<Vec<_>>()
        .join(", ");
    let (a_text, a_inputs, next) = match a {
        AOperand::Shared => (format!("%{acc}"), "\"l\"(desc_a)".to_string(), acc + 1),
        AOperand::Registers => (
            format!("{{%{}, %{}, %{}, %{}}}", acc, acc + 1, acc + 2, acc + 3),
            "\"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3])".to_string(),
            acc + 4,
        ),
    };
    format!(
        "asm volatile(\"{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{acc_flag}, 0;\\n\"\n\
         \"wgmma.mma_async.sync.aligned.m64n{n}{shape_types} {{{regs}}}, {a_text}, \
         %{desc_b}, p, {imms};\\n}}\\n\"\n        : {outputs}\n        : {a_inputs}, \
         \"l\"(desc_b), \"r\"(accumulate));",
        acc_flag = next + 1,
        desc_b = next,
    )
}

/// `template <typename T> void NAME(float (&d)[n/2], A, uint64_t desc_b, int accumulate)`:
/// one m64nNk16 wgmma of f16 or bf16 operands (T::is_bf16) with fp32 accumulators;
/// `accumulate == 0` overwrites `d`. `trans_a`/`trans_b`: the shared operand is MN-major (read
/// transposed); a register A never is.
fn wrapper(name: &str, n: u32, a: AOperand, trans_a: bool, trans_b: bool) -> String {
    // Scale and transpose immediates (A and B unscaled); the register form has no A transpose.
    let imms = match a {
        AOperand::Shared => format!("1, 1, {}, {}", trans_a as u8, trans_b as u8),
        AOperand::Registers => {
            debug_assert!(!trans_a);
            format!("1, 1, {}", trans_b as u8)
        }
    };
    format!(
        "template <typename T>\n__device__ __forceinline__ void {name}(float (&d)[{}], \
         {}, uint64_t desc_b, int accumulate) {{\n    if constexpr (T::is_bf16) {{\n        \
         {}\n    }} else {{\n        {}\n    }}\n}}\n",
        n / 2,
        a.param(),
        wgmma_statement(n, a, "k16.f32.bf16.bf16", &imms),
        wgmma_statement(n, a, "k16.f32.f16.f16", &imms),
    )
}

/// `void NAME(float (&d)[n/2], A, uint64_t desc_b, int accumulate)`: one m64nNk8 wgmma of TF32
/// operands, which have no transposed form (both K-major).
pub(crate) fn tf32_wrapper(name: &str, n: u32, a: AOperand) -> String {
    format!(
        "__device__ __forceinline__ void {name}(float (&d)[{}], {}, uint64_t desc_b, int \
         accumulate) {{\n    {}\n}}\n",
        n / 2,
        a.param(),
        wgmma_statement(n, a, "k8.f32.tf32.tf32", "1, 1"),
    )
}

/// The wrappers both forward kernels (fwd_sm90.cu, fwd_sm90_tma.cu) call for their tile:
/// `wgmma_qk` (N = block_n, both operands in shared memory) and `wgmma_pv` (N = V's tile
/// width `head_dim_v`, P in registers, V transposed).
pub(crate) fn wrappers(head_dim_v: u32, block_n: u32) -> String {
    format!(
        "{}\n{}",
        wrapper("wgmma_qk", block_n, AOperand::Shared, false, false),
        wrapper("wgmma_pv", head_dim_v, AOperand::Registers, false, true)
    )
}

/// Tile sizes of one Hopper backward variant; see [`bwd_tile_for`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct WgmmaBwdTile {
    pub head_dim: u32,
    /// Query rows a step.
    pub block_m: u32,
    /// Keys a block: 64 per consumer warpgroup.
    pub block_n: u32,
    pub min_blocks: u32,
}

/// Pipeline stages of Q, dO, LSE and D (`BwdWgmmaConfig::kStages`).
const BWD_STAGES: u32 = 2;

impl WgmmaBwdTile {
    /// Two consumers share 64 keys, each with half the head dim (`BwdWgmmaConfig::kSplitD`):
    /// dK and dV of 64 keys and 256 columns would take every register a thread has.
    pub fn split_head_dim(&self) -> bool {
        self.head_dim > 128
    }

    /// Consumer warpgroups (the producer is one more).
    pub fn consumers(&self) -> u32 {
        if self.split_head_dim() {
            2
        } else {
            self.block_n / 64
        }
    }

    /// Consumers that share one 64-key block: 2 when the head dim is split, else 1.
    fn sharing(&self) -> u32 {
        if self.split_head_dim() {
            2
        } else {
            1
        }
    }

    /// Queries a consumer's Sᵀ and dPᵀ cover (the wgmma N of `wgmma_sdp`).
    fn sdp_n(&self) -> u32 {
        self.block_m / self.sharing()
    }

    /// dK and dV columns a consumer accumulates (the wgmma N of `wgmma_dkv`).
    fn dkv_cols(&self) -> u32 {
        self.head_dim / self.sharing()
    }

    /// The consumers split dQ's rows, 64 each, rather than its columns
    /// (`BwdWgmmaConfig::kDqByRows`): 128 query rows a step.
    fn dq_by_rows(&self) -> bool {
        self.block_m > 64
    }

    /// dQ tiles the consumers fill in turn for the writer (`BwdWgmmaConfig::kDqTiles`): two,
    /// or one of 128 rows (two would not fit beside the larger Q, dO and dSᵀ tiles).
    fn dq_tiles(&self) -> u32 {
        if self.dq_by_rows() {
            1
        } else {
            2
        }
    }

    /// fp32 dQ tiles in shared memory of their own, for the TMA reductions
    /// (`BwdWgmmaConfig::kDqInStage`): with the split head dim a step's tile takes the place
    /// of its stage's Q and dO instead.
    fn own_dq_tiles(&self) -> u32 {
        if self.split_head_dim() {
            0
        } else {
            self.dq_tiles()
        }
    }

    /// A consumer's dQ columns (the wgmma N of `wgmma_dq`, in passes of at most 64).
    fn dq_cols(&self) -> u32 {
        if self.dq_by_rows() {
            self.head_dim
        } else {
            self.head_dim / self.consumers()
        }
    }

    /// The query rows a step the kernel template accepts (`BwdWgmmaConfig`'s assertion): 64,
    /// or 128 at head dim 64 with two consumers.
    fn block_m_allowed(&self) -> bool {
        self.block_m == 64 || (self.block_m == 128 && self.head_dim == 64 && self.block_n == 128)
    }

    pub fn threads(&self) -> u32 {
        (self.consumers() + 1) * 128
    }

    /// `BwdWgmmaConfig::kSmemBytes`: K and V, the stages' Q and dO, two dSᵀ buffers (with Pᵀ
    /// when the head dim is split), the fp32 dQ tiles unless they are the stages, the stages'
    /// LSE and D, the transaction barriers, and 1024 bytes to align the tiles.
    pub fn smem_bytes(&self) -> u32 {
        let (d, m, n, s) = (self.head_dim, self.block_m, self.block_n, BWD_STAGES);
        // Two buffers of dSᵀ, each with Pᵀ beside it when the head dim is split.
        let ds_buffers = 2 * self.sharing();
        2 * n * d * 2
            + s * 2 * m * d * 2
            + ds_buffers * n * m * 2
            + self.own_dq_tiles() * m * d * 4
            + s * 2 * m * 4
            + (1 + 2 * s + 2 * self.dq_tiles()) * 8
            + 1024
    }

    /// Whether the block's register share leaves the consumers enough after the producer's 24
    /// a thread (setmaxnreg: at most 248 at launch, 240 a consumer, multiples of 8).
    fn registers_fit(&self) -> bool {
        let per_thread = (65536 / self.min_blocks / self.threads()) & !7;
        let consumers = self.consumers() * 128;
        per_thread <= 248 && (per_thread * self.threads() - 24 * 128) / consumers >= 232
    }
}

/// Head dims the Hopper backward takes.
pub(crate) const WGMMA_HEAD_DIMS_BWD: [usize; 3] = [64, 128, 256];

/// The Hopper backward's tile head dim for Q/K of `head_dim` and V/dO of `head_dim_v`: the
/// smallest of [`WGMMA_HEAD_DIMS_BWD`] that holds both (the tensor maps zero-fill the columns
/// past each, and the kernel stores none of them), for multiples of 8 (whole 16-byte map rows)
/// above 32. At 32 and below the padding would be half the tile or more, and the mma.sync d32
/// tile takes them.
/// Without `off_tile` ([`off_tile_enabled`]) only equal head dims 64, 128 and 256 take it.
pub(crate) fn bwd_tile_head_dim(
    head_dim: usize,
    head_dim_v: usize,
    off_tile: bool,
) -> Option<usize> {
    if !off_tile {
        return (head_dim == head_dim_v && WGMMA_HEAD_DIMS_BWD.contains(&head_dim))
            .then_some(head_dim);
    }
    let widest = head_dim.max(head_dim_v);
    if !head_dim.is_multiple_of(8) || !head_dim_v.is_multiple_of(8) || widest <= 32 {
        return None;
    }
    WGMMA_HEAD_DIMS_BWD.into_iter().find(|&d| d >= widest)
}

/// Environment variable overriding the Hopper backward's tiles for tuning experiments:
/// `block_m,block_n,min_blocks`.
pub const WGMMA_BWD_TILE_ENV: &str = "UFA_CUDA_WGMMA_BWD_TILE";

/// The Hopper backward's tiles (H200, bf16, seqlen 4096, 2026-11-26, `scripts/gpu-tune
/// bwd|bwd-det`, unless said):
/// - d64 without a band (causal or window rules) and not deterministic: one block of two
///   consumer warpgroups over 128 queries a step and 128 keys (FlashAttention-3's tile): H100,
///   `gpu_bench 4 4096 32 64 0 bf16 30 bwd` beside cuDNN (PyTorch SDPA) in one run
///   (2026-12-06): 407-421 TFLOP/s against 363 with 64 queries, cuDNN 408-430. With a band
///   the 64-query tile stays: at the GPT step of issue #18 (8 x 2048, 12 heads, causal) the
///   128-query tile ran the backward call 3.5% faster alone (519-525 against 539-543 µs) but
///   the whole training step slower in five of six paired runs, by up to 13%, for reasons
///   not yet found (`bench/gpt_step.py`, bf16 and fp16, H100);
/// - d64 otherwise: blocks of one consumer warpgroup (64 keys), two an SM: 366 TFLOP/s
///   against 334 with one block of two (310 against 283 causal); deterministic mode takes
///   the block of two, whose query blocks have half as many key blocks to take turns: 305
///   against 211 (262 against 238 causal);
/// - d128: one block of two consumer warpgroups (128 keys; dK and dV take 128 registers a
///   thread): 475 TFLOP/s, 431 deterministic;
/// - d256: two consumers share 64 keys, each with half the head dim.
pub(crate) fn bwd_tile_for(
    head_dim: usize,
    max_smem: u32,
    deterministic: bool,
    band: bool,
) -> Option<WgmmaBwdTile> {
    if !WGMMA_HEAD_DIMS_BWD.contains(&head_dim) {
        return None;
    }
    let wide_queries = head_dim == 64 && !deterministic && !band;
    // d64 deterministic or wide, and d128: two consumers of 64 keys; d256: two consumers
    // share 64.
    let two_consumers = head_dim >= 128 || deterministic || wide_queries;
    let default = WgmmaBwdTile {
        head_dim: head_dim as u32,
        block_m: if wide_queries { 128 } else { 64 },
        block_n: if two_consumers && head_dim <= 128 {
            128
        } else {
            64
        },
        min_blocks: if two_consumers { 1 } else { 2 },
    };
    let over = bwd_tile_override().map(|[block_m, block_n, min_blocks]| WgmmaBwdTile {
        block_m,
        block_n,
        min_blocks: min_blocks.max(1),
        ..default
    });
    let fits = |t: &WgmmaBwdTile| {
        t.block_n.is_multiple_of(64)
            && (64..=128).contains(&t.block_n)
            && t.block_m_allowed()
            && (!t.split_head_dim() || t.block_n == 64)
            && t.smem_bytes() <= max_smem
            // An SM has a block's maximum plus the 1 KiB each block reserves.
            && (t.smem_bytes() + 1024) * t.min_blocks <= max_smem + 1024
            && t.registers_fit()
    };
    over.into_iter().chain([default]).find(fits)
}

fn bwd_tile_override() -> Option<[u32; 3]> {
    static OVERRIDE: std::sync::OnceLock<Option<[u32; 3]>> = std::sync::OnceLock::new();
    *OVERRIDE.get_or_init(|| super::tiles::parse_numbers(&std::env::var(WGMMA_BWD_TILE_ENV).ok()?))
}

/// The wrappers `bwd_sm90` calls: `wgmma_sdp` (Sᵀ, dPᵀ: N = the consumer's queries,
/// K-major operands), `wgmma_dkv` (dK, dV: N = the consumer's head-dim columns, A in registers
/// or, split, in shared memory; Q/dO transposed) and `wgmma_dq` (N = the consumer's share of
/// head_dim, in passes of at most 64; dSᵀ and K both transposed).
pub(crate) fn bwd_wrappers(tile: &WgmmaBwdTile) -> String {
    format!(
        "{}\n{}\n{}",
        wrapper("wgmma_sdp", tile.sdp_n(), AOperand::Shared, false, false),
        wrapper(
            "wgmma_dkv",
            tile.dkv_cols(),
            if tile.split_head_dim() {
                AOperand::Shared
            } else {
                AOperand::Registers
            },
            false,
            true
        ),
        wrapper(
            "wgmma_dq",
            tile.dq_cols().min(64),
            AOperand::Shared,
            true,
            true
        )
    )
}

/// The entry point's body: `function<type_tag, config, flags>(p)`, after a check that the
/// config's shared-memory size is the `smem` bytes the host launches it with.
pub(crate) fn entry_call(
    function: &str,
    config: String,
    smem: u32,
    flags: &str,
    type_tag: &str,
) -> String {
    format!(
        "using Cfg = {config};\n  static_assert(Cfg::kSmemBytes == {smem}, \"the host's \
         shared-memory size\");\n  {function}<{type_tag}, Cfg, {flags}>(p)"
    )
}

/// The backward's entry-point call.
pub(crate) fn bwd_call(
    tile: &WgmmaBwdTile,
    score_mod: bool,
    dropout: bool,
    type_tag: &str,
) -> String {
    let config = format!(
        "BwdWgmmaConfig<{}, {}, {}, {}>",
        tile.head_dim, tile.block_m, tile.block_n, tile.min_blocks
    );
    entry_call(
        "bwd_sm90",
        config,
        tile.smem_bytes(),
        &format!("{score_mod}, {dropout}"),
        type_tag,
    )
}

/// The call the generated entry point makes.
pub(crate) fn call(
    tile: &WgmmaTile,
    score_mod: bool,
    seqs: bool,
    paged: bool,
    dropout: bool,
    type_tag: &str,
) -> String {
    let config = format!(
        "WgmmaConfig<{}, {}, {}, {}>",
        tile.head_dim, tile.block_m, tile.block_n, tile.stages
    );
    entry_call(
        "fwd_sm90",
        config,
        tile.smem_bytes(),
        &format!("{score_mod}, {seqs}, {paged}, {dropout}"),
        type_tag,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrappers_number_their_operands_in_order() {
        let t = WgmmaTile {
            head_dim: 64,
            block_m: 128,
            block_n: 128,
            stages: 2,
            min_blocks: 1,
        };
        let src = wrappers(t.head_dim, t.block_n);
        // qk: 64 accumulators %0..%63, desc_a %64, desc_b %65, flag %66.
        assert!(src.contains("m64n128k16.f32.bf16.bf16 {%0, %1,"));
        assert!(src.contains("%62, %63}, %64, %65, p, 1, 1, 0, 0;"));
        assert!(src.contains("setp.ne.b32 p, %66, 0;"));
        assert!(src.contains("float (&d)[64], uint64_t desc_a"));
        // pv: 32 accumulators, A registers %32..%35, desc_b %36, flag %37, B transposed.
        assert!(src.contains("m64n64k16.f32.f16.f16 {%0,"));
        assert!(src.contains("%31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;"));
        assert!(src.contains("setp.ne.b32 p, %37, 0;"));
        assert_eq!(src.matches("asm volatile").count(), 4);

        let b = bwd_wrappers(&bwd_tile_for(128, 232_448, false, false).unwrap());
        // dq: N = 64 (half of d128), both operands transposed.
        assert!(b.contains("void wgmma_dq(float (&d)[32], uint64_t desc_a"));
        assert!(b.contains("%31}, %32, %33, p, 1, 1, 1, 1;"));
        assert!(b.contains("void wgmma_dkv(float (&d)[64], const uint32_t (&a)[4]"));
        assert!(b.contains("void wgmma_sdp(float (&d)[32], uint64_t desc_a"));
        assert!(b.contains("%31}, %32, %33, p, 1, 1, 0, 0;"));
    }

    #[test]
    fn backward_tiles_cover_the_head_dims_within_hopper_shared_memory() {
        for d in WGMMA_HEAD_DIMS_BWD {
            for (det, band) in [(false, false), (false, true), (true, false), (true, true)] {
                let t = bwd_tile_for(d, 232_448, det, band).unwrap();
                assert_eq!(t.threads(), t.consumers() * 128 + 128);
                assert!((t.smem_bytes() + 1024) * t.min_blocks <= 232_448 + 1024);
                assert!(t.registers_fit());
            }
        }
        // K, V 64 KiB; Q, dO of two stages 64 KiB; dSᵀ 2 x 16 KiB; dQ 2 x 32 KiB; LSE, D 1 KiB.
        assert_eq!(
            bwd_tile_for(128, 232_448, false, false)
                .unwrap()
                .smem_bytes(),
            231_496
        );
        // d256: two consumers of the same 64 keys; K, V 64 KiB; Q, dO 128 KiB; dSᵀ and Pᵀ
        // 2 x 16 KiB; the dQ tiles in the stages (their barriers 32 bytes).
        let t = bwd_tile_for(256, 232_448, false, false).unwrap();
        assert_eq!((t.block_n, t.consumers(), t.own_dq_tiles()), (64, 2, 0));
        assert_eq!(t.smem_bytes(), 231_496);
        // The kernel checks the size it is launched with against its own layout.
        assert!(bwd_call(&t, false, false, "bf16_t")
            .contains("static_assert(Cfg::kSmemBytes == 231496"));
        let b = bwd_wrappers(&t);
        // sdp: N = 32 queries; dkv: N = 128 columns, A from shared memory.
        assert!(b.contains("void wgmma_sdp(float (&d)[16], uint64_t desc_a"));
        assert!(b.contains("void wgmma_dkv(float (&d)[64], uint64_t desc_a"));
        assert!(bwd_tile_for(256, 166_912, false, false).is_none());
        // Two blocks of two consumers would leave them 112 registers.
        let two = WgmmaBwdTile {
            min_blocks: 2,
            ..bwd_tile_for(64, 232_448, false, true).unwrap()
        };
        assert!(!WgmmaBwdTile {
            block_n: 128,
            ..two
        }
        .registers_fit());
        assert!(bwd_tile_for(96, 232_448, false, false).is_none());
        // d64: 128 queries a step without a band and not deterministic; K, V 32 KiB; Q, dO of
        // two stages 64 KiB; dSᵀ 2 x 32 KiB; one dQ tile 32 KiB; LSE, D 2 KiB.
        let wide = bwd_tile_for(64, 232_448, false, false).unwrap();
        assert_eq!((wide.block_m, wide.block_n, wide.min_blocks), (128, 128, 1));
        assert_eq!(
            (wide.consumers(), wide.dq_tiles(), wide.dq_cols()),
            (2, 1, 64)
        );
        assert_eq!(wide.smem_bytes(), 199_736);
        assert!(bwd_wrappers(&wide).contains("void wgmma_sdp(float (&d)[64], uint64_t desc_a"));
        assert!(bwd_wrappers(&wide).contains("void wgmma_dq(float (&d)[32], uint64_t desc_a"));
        for (det, band, tile) in [(false, true, (64, 64, 2)), (true, false, (64, 128, 1))] {
            let t = bwd_tile_for(64, 232_448, det, band).unwrap();
            assert_eq!((t.block_m, t.block_n, t.min_blocks), tile);
        }
        // 128 queries a step only at d64 with two consumers.
        for (d, block_n) in [(128, 128), (64, 64)] {
            let t = WgmmaBwdTile {
                head_dim: d,
                block_m: 128,
                block_n,
                min_blocks: 1,
            };
            assert!(!t.block_m_allowed());
        }
    }

    #[test]
    fn tile_table_covers_the_head_dims_within_hopper_shared_memory() {
        for d in WGMMA_HEAD_DIMS {
            for score_mod in [false, true] {
                let t = wgmma_tile_for(d, score_mod, false, false, 232_448).expect("a Hopper tile");
                assert!(t.is_valid(), "{t:?}");
                assert!(t.smem_bytes() * t.min_blocks <= 232_448, "{t:?}");
            }
        }
        assert_eq!(wgmma_tile_for(96, false, false, false, 232_448), None);
        assert_eq!(wgmma_tile_for(256, false, false, false, 101_376), None);
    }

    #[test]
    fn warp_specialised_tiles_cover_the_head_dims_within_hopper_shared_memory() {
        for d in WGMMA_HEAD_DIMS {
            for (score_mod, dropout) in [(false, false), (true, false), (false, true)] {
                let t =
                    tma_tile_for(d, d, score_mod, dropout, false, 232_448).expect("a Hopper tile");
                assert!(t.is_valid(), "{t:?}");
                assert!(t.smem_bytes() <= 232_448, "{t:?}");
                // A producer warpgroup beside two consumers taking turns.
                assert_eq!((t.threads(), t.pingpong), (384, true));
            }
        }
        // d256: Q 64 KiB, two stages of K and V of 80 keys 160 KiB, 10 barriers, alignment.
        let t = tma_tile_for(256, 256, false, false, false, 232_448).unwrap();
        assert_eq!(t.smem_bytes(), 65_536 + 163_840 + 80 + 1024);
        assert!(tma_call(&t, false, false, "BFloat16")
            .contains("static_assert(Cfg::kSmemBytes == 230480"));
        // Persistent: one block an SM, or one a tile when there are fewer.
        let t = tma_tile_for(128, 128, false, false, false, 232_448).unwrap();
        assert_eq!(t.grid((32, 16, 4), 132), (132, 1, 1));
        assert_eq!(t.grid((2, 3, 4), 132), (24, 1, 1));
        let t = TmaFwdTile {
            persistent: false,
            ..t
        };
        assert_eq!(t.grid((32, 16, 4), 132), (32, 16, 4));
        // Head dims between the tile dims run on the next larger tile width, the MMAs
        // spanning the real columns (Q·K to the k-step of 16, O to the n-step of 8); head dims
        // that are no whole 16-byte pieces, or wider than 256, have no tensor map.
        for (d, qk, width, block_n) in [
            (96, 96, 128, 128),
            (40, 48, 64, 128),
            (8, 16, 64, 128),
            (200, 208, 256, 80),
            (80, 80, 128, 128),
        ] {
            let t = tma_tile_for(d, d, false, false, false, 232_448).unwrap();
            assert_eq!((t.head_dim, t.head_dim_v), (qk, d as u32), "{d}");
            assert_eq!((t.qk_tile_width(), t.v_tile_width()), (width, width), "{d}");
            assert_eq!(t.block_n, block_n, "{d}");
            assert!(tma_call(&t, false, false, "Half").contains(&format!(
                "TmaFwdConfig<{qk}, {d}, 128, {block_n}, 2, true, true>"
            )));
            assert!(wrappers(t.head_dim_v, t.block_n).contains(&format!("m64n{d}k16")));
        }
        for d in [0, 4, 12, 100, 264, 512] {
            assert_eq!(
                tma_tile_for(d, d, false, false, false, 232_448),
                None,
                "{d}"
            );
        }
        assert_eq!(tma_tile_for(256, 256, false, false, false, 101_376), None);
        // Long problems without a band: three consumers at head dim 64, plain only.
        let t = tma_tile_for(64, 64, false, false, true, 232_448).unwrap();
        assert_eq!(
            (t.block_m, t.block_n, t.pingpong, t.threads()),
            (192, 128, false, 512)
        );
        assert!(t.is_valid());
        for (d, dv, score_mod, dropout) in [
            (64, 64, true, false),
            (64, 64, false, true),
            (128, 128, false, false),
            (48, 48, false, false),
        ] {
            let t = tma_tile_for(d, dv, score_mod, dropout, true, 232_448).unwrap();
            assert_eq!(
                t,
                tma_tile_for(d, dv, score_mod, dropout, false, 232_448).unwrap()
            );
        }
        // Ping-pong needs exactly two consumers.
        let t = tma_tile_for(64, 64, false, false, false, 232_448).unwrap();
        assert!(!TmaFwdTile { block_m: 192, ..t }.is_valid());
        assert!(TmaFwdTile {
            block_m: 192,
            pingpong: false,
            ..t
        }
        .is_valid());
    }

    #[test]
    fn only_hopper_targets_run_wgmma() {
        use super::super::driver::arch_name;
        assert!(runs_wgmma(&arch_name((9, 0))));
        for cc in [(8, 0), (8, 6), (8, 9), (10, 0), (12, 0)] {
            assert!(!runs_wgmma(&arch_name(cc)), "{cc:?}");
        }
    }

    #[test]
    fn tile_override_parsing() {
        let t = parse_wgmma_tile("192, 128, 2, 1").unwrap();
        assert_eq!((t.block_m, t.block_n, t.stages), (192, 128, 2));
        assert!(WgmmaTile { head_dim: 128, ..t }.is_valid());
        assert!(parse_wgmma_tile("128,128,2").is_none());
        assert!(!WgmmaTile {
            head_dim: 128,
            block_m: 96,
            ..t
        }
        .is_valid());
        assert!(!WgmmaTile {
            head_dim: 128,
            stages: 1,
            ..t
        }
        .is_valid());
    }
}
