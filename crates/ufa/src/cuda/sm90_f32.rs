//! The fp32 forward on Hopper tensor cores (kernels/fwd_sm90_f32.cu): its tile table, the TF32
//! wgmma wrappers it calls and its entry-point call.

use super::sm90::{entry_call, tf32_wrapper, AOperand};

/// Head dims the kernel serves: those it has run at on a GPU. The template takes any whole
/// 32-float swizzle rows; 32 and 96 compile without spills (NVRTC 13.0, 2026-12-07) but have not
/// run yet. Wider ones stay on mma.sync: at 192 and 256 no tile of 128 query rows fits shared
/// memory (Q, K and Vᵀ in high and low TF32 parts beside the V tile as it lands, `smem_bytes`),
/// and with 64 rows O and each tile's fresh P V sums spill 40-500 bytes at 160 and 192.
pub(crate) const F32_WGMMA_HEAD_DIMS: [usize; 2] = [64, 128];

/// Tile sizes of one fp32 Hopper forward variant; see [`f32_wgmma_tile_for`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct F32WgmmaTile {
    pub head_dim: u32,
    /// Query rows a block: 64 per warpgroup.
    pub block_m: u32,
    /// Keys a tile.
    pub block_n: u32,
}

impl F32WgmmaTile {
    pub fn threads(&self) -> u32 {
        self.block_m / 64 * 128
    }

    /// `F32WgmmaConfig::kSmemBytes`: Q (and its low part with `split`), K (low), the V tile as
    /// it lands, Vᵀ (low), and 1024 bytes to align them.
    pub fn smem_bytes(&self, split: bool) -> u32 {
        let parts = if split { 2 } else { 1 };
        (parts * self.block_m + (2 * parts + 1) * self.block_n) * self.head_dim * 4 + 1024
    }

    /// Whether the kernel template's static_asserts accept this shape.
    pub fn is_valid(&self) -> bool {
        self.block_m >= 64
            && self.block_m.is_multiple_of(64)
            && self.block_m <= 256
            && self.block_n >= 32
            && self.block_n.is_multiple_of(32)
            && self.block_n <= 256
            && F32_WGMMA_HEAD_DIMS.contains(&(self.head_dim as usize))
            // The K and V tiles' 16-byte pieces are split in whole rounds of the block.
            && (self.block_n * self.head_dim / 4).is_multiple_of(self.threads())
    }
}

/// Environment variable overriding the tile table for tuning experiments: `block_m,block_n`,
/// applied to both head dims where it fits.
pub const F32_WGMMA_TILE_ENV: &str = "UFA_CUDA_WGMMA_F32_TILE";

/// The tile of a problem with these flags, where the kernel serves it. It serves dense batches
/// without dropout: the template's sequence and dropout paths (the other Hopper forwards'
/// shared helpers) have not run on a GPU yet, so those calls keep mma.sync.
///
/// The tile table: two warpgroups (128 query rows) a block share each K/V tile's split and
/// transpose; 64 keys a tile at head dim 64 (144 KiB), 32 at 128 (208 KiB: 64 keys would not
/// fit beside 128 rows of Q in two parts). One block an SM.
pub(crate) fn f32_wgmma_tile_for(
    head_dim: usize,
    seqs: bool,
    dropout: bool,
    max_smem: u32,
) -> Option<F32WgmmaTile> {
    if !F32_WGMMA_HEAD_DIMS.contains(&head_dim) || seqs || dropout {
        return None;
    }
    let default = F32WgmmaTile {
        head_dim: head_dim as u32,
        block_m: 128,
        block_n: if head_dim <= 64 { 64 } else { 32 },
    };
    // Both precisions launch the same tile; the split one takes the most memory.
    let fits = |t: &F32WgmmaTile| t.is_valid() && t.smem_bytes(true) <= max_smem;
    tile_override()
        .map(|[block_m, block_n]| F32WgmmaTile {
            head_dim: head_dim as u32,
            block_m,
            block_n,
        })
        .into_iter()
        .chain([default])
        .find(fits)
}

fn tile_override() -> Option<[u32; 2]> {
    static OVERRIDE: std::sync::OnceLock<Option<[u32; 2]>> = std::sync::OnceLock::new();
    *OVERRIDE.get_or_init(|| super::tiles::parse_numbers(&std::env::var(F32_WGMMA_TILE_ENV).ok()?))
}

/// `wgmma_qk_tf32` (N = block_n, both operands in shared memory) and `wgmma_pv_tf32` (N = the
/// head dim, P in registers, Vᵀ in shared memory).
pub(crate) fn wrappers(tile: &F32WgmmaTile) -> String {
    format!(
        "{}\n{}",
        tf32_wrapper("wgmma_qk_tf32", tile.block_n, AOperand::Shared),
        tf32_wrapper("wgmma_pv_tf32", tile.head_dim, AOperand::Registers)
    )
}

/// The call the generated entry point makes; `split`: three TF32 products a product (fp32
/// accuracy) rather than one.
pub(crate) fn call(
    tile: &F32WgmmaTile,
    split: bool,
    score_mod: bool,
    seqs: bool,
    dropout: bool,
) -> String {
    let config = format!(
        "F32WgmmaConfig<{}, {}, {}, {split}>",
        tile.head_dim, tile.block_m, tile.block_n
    );
    entry_call(
        "fwd_sm90_f32",
        config,
        tile.smem_bytes(split),
        &format!("{score_mod}, {seqs}, {dropout}"),
        if split { "Float32" } else { "Tf32" },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_hopper_shared_memory() {
        for d in F32_WGMMA_HEAD_DIMS {
            let t = f32_wgmma_tile_for(d, false, false, 232_448).expect("a tile");
            assert_eq!(f32_wgmma_tile_for(d, true, false, 232_448), None);
            assert_eq!(f32_wgmma_tile_for(d, false, true, 232_448), None);
            assert!(t.is_valid());
            assert!(t.smem_bytes(true) <= 232_448 && t.smem_bytes(false) < t.smem_bytes(true));
        }
        // d128: Q 2 x 64 KiB, K 2 x 16 KiB, V 16 KiB, Vᵀ 2 x 16 KiB, alignment.
        let t = f32_wgmma_tile_for(128, false, false, 232_448).unwrap();
        assert_eq!(t.smem_bytes(true), 131_072 + 81_920 + 1024);
        let c = call(&t, true, false, true, false);
        assert!(
            c.contains("using Cfg = F32WgmmaConfig<128, 128, 32, true>;"),
            "{c}"
        );
        assert!(
            c.contains("fwd_sm90_f32<Float32, Cfg, false, true, false>(p)"),
            "{c}"
        );
        assert!(call(&t, false, false, false, false)
            .contains("static_assert(Cfg::kSmemBytes == 115712"));
        // Three warpgroups over 32 keys at d64: 512 pieces of K for 384 threads.
        assert!(!F32WgmmaTile {
            head_dim: 64,
            block_m: 192,
            block_n: 32
        }
        .is_valid());
        for d in [16, 32, 48, 80, 96, 160, 192, 256] {
            assert_eq!(f32_wgmma_tile_for(d, false, false, 232_448), None, "{d}");
        }
        assert_eq!(f32_wgmma_tile_for(128, false, false, 101_376), None);
    }

    #[test]
    fn wrappers_take_tf32_k8_steps() {
        let src = wrappers(&f32_wgmma_tile_for(128, false, false, 232_448).unwrap());
        // qk: N = 32 keys, 16 accumulators, desc_a %16, desc_b %17, flag %18; no transposes.
        assert!(src.contains("void wgmma_qk_tf32(float (&d)[16], uint64_t desc_a"));
        assert!(src.contains("m64n32k8.f32.tf32.tf32 {%0,"));
        assert!(src.contains("%15}, %16, %17, p, 1, 1;"));
        // pv: N = 128, A registers %64..%67, desc_b %68, flag %69.
        assert!(src.contains("void wgmma_pv_tf32(float (&d)[64], const uint32_t (&a)[4]"));
        assert!(src.contains("%63}, {%64, %65, %66, %67}, %68, p, 1, 1;"));
        assert!(src.contains("setp.ne.b32 p, %69, 0;"));
        assert!(!src.contains("template"));
    }
}
