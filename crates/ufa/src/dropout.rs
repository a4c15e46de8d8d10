//! Attention dropout: which probabilities a call keeps, from a counter-based generator, so the
//! backward regenerates exactly the forward's mask without storing it.
//!
//! The generator is Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
//! 3", SC 2011), the one FlashAttention and PyTorch use on GPUs. Probability P[b, h, i, j]
//! (batch b, query head h, query row i, key j) is kept when word `j % 4` of
//! `philox(counter = [j / 4, i, b·heads_q + h, offset_lo], key = [seed_lo, seed_hi ^ offset_hi])`
//! is below `(1 - p)·2^32`, and then scaled by `1 / (1 - p)`; the LSE stays that of the
//! probabilities before dropout. Every backend and the f64 reference call [`Dropout::scale`].

use crate::error::{invalid, Result};

/// Dropout of the attention probabilities: probability `p` of dropping each one, and the
/// generator's `seed` and `offset` (a caller draws them once per call, as PyTorch does from
/// its generator, and passes the same ones to the backward).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
    pub offset: u64,
}

/// A validated [`Dropout`] with its keep threshold and scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct DropoutMask {
    key: [u32; 2],
    offset: u32,
    /// Keep when the random word is below this (a u64: 1 - p = 1 would be 2^32).
    threshold: u64,
    /// 1 / (1 - p), applied to the probabilities kept.
    keep_scale: f32,
}

impl Dropout {
    /// Checks `p` (finite, in [0, 1)); None when `p` is 0 (nothing is dropped).
    pub(crate) fn validate(&self) -> Result<Option<DropoutMask>> {
        if !(self.p.is_finite() && (0.0..1.0).contains(&self.p)) {
            invalid!(
                "dropout p={} must be in [0, 1) (the probability of dropping each attention \
                 probability)",
                self.p
            );
        }
        if self.p == 0.0 {
            return Ok(None);
        }
        let keep = 1.0 - f64::from(self.p);
        Ok(Some(DropoutMask {
            key: [
                self.seed as u32,
                (self.seed >> 32) as u32 ^ (self.offset >> 32) as u32,
            ],
            offset: self.offset as u32,
            threshold: (keep * 4_294_967_296.0).round() as u64,
            keep_scale: (1.0 / keep) as f32,
        }))
    }

    /// The factor probability P[b, h, i, j] is multiplied by: 0 (dropped) or 1 / (1 - p).
    /// `bh` is `b · heads_q + h`. Public for the f64 reference, which must drop exactly what
    /// the backends drop.
    pub fn scale(&self, bh: usize, i: usize, j: usize) -> f64 {
        match self.validate() {
            Ok(Some(m)) => f64::from(m.scale(bh, i, j)),
            _ => 1.0,
        }
    }
}

/// A [`DropoutMask`] as the CUDA kernels read it (kernels/dropout.cuh): the same key and
/// counter word, the threshold as the largest word kept (2^32 does not fit a u32; a threshold
/// is at least 256, as 1 - p is at least 2^-24), and the scale; all zero is no dropout.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct KernelWords {
    pub key: [u32; 2],
    pub offset: u32,
    pub keep_max: u32,
    pub scale: f32,
}

impl DropoutMask {
    pub(crate) fn kernel_words(&self) -> KernelWords {
        KernelWords {
            key: self.key,
            offset: self.offset,
            keep_max: (self.threshold - 1) as u32,
            scale: self.keep_scale,
        }
    }

    /// The random words of keys `4·(j / 4) ..` of row `i` of head `bh`: word `j % 4` is key j's.
    #[inline]
    fn words(&self, bh: usize, i: usize, j: usize) -> [u32; 4] {
        philox4x32_10([(j / 4) as u32, i as u32, bh as u32, self.offset], self.key)
    }

    /// The factor a key whose word is `w` gets: 1 / (1 - p) if kept, else 0.
    #[inline]
    fn factor(&self, w: u32) -> f32 {
        if u64::from(w) < self.threshold {
            self.keep_scale
        } else {
            0.0
        }
    }

    /// See [`Dropout::scale`].
    #[inline]
    pub fn scale(&self, bh: usize, i: usize, j: usize) -> f32 {
        self.factor(self.words(bh, i, j)[j % 4])
    }

    /// Multiplies `row[jj]`, probability P[b, h, i, j0 + jj], by its factor; one generator
    /// call per four keys.
    #[inline]
    pub fn apply(&self, bh: usize, i: usize, j0: usize, row: &mut [f32]) {
        let mut jj = 0;
        while jj < row.len() {
            let j = j0 + jj;
            let end = (jj + 4 - j % 4).min(row.len());
            for (x, &w) in row[jj..end].iter_mut().zip(&self.words(bh, i, j)[j % 4..]) {
                *x *= self.factor(w);
            }
            jj = end;
        }
    }
}

/// Philox4x32 with 10 rounds (Random123's philox4x32_10).
pub(crate) fn philox4x32_10(mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    for round in 0..10 {
        if round > 0 {
            key = [key[0].wrapping_add(W0), key[1].wrapping_add(W1)];
        }
        let p0 = M0 * u64::from(ctr[0]);
        let p1 = M1 * u64::from(ctr[2]);
        ctr = [
            (p1 >> 32) as u32 ^ ctr[1] ^ key[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ ctr[3] ^ key[1],
            p0 as u32,
        ];
    }
    ctr
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's known-answer vectors for philox4x32_10 (kat_vectors).
    #[test]
    fn philox_matches_random123() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
    }
}
