//! Attention dropout: which probabilities a call keeps, from a counter-based generator, so the
//! backward regenerates exactly the forward's mask without storing it.
//!
//! The generator is Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
//! 3", SC 2011), the one FlashAttention and PyTorch use on GPUs. One call yields 128 random
//! bits, which decide eight probabilities of one row, 16 bits each: probability P[b, h, i, j]
//! (batch b, query head h, query row i, key j) is kept when 16-bit piece `j % 8` (piece k is
//! bits 16·(k % 2) .. of word k / 2) of
//! `philox(counter = [j / 8, i, b·heads_q + h, offset_lo], key = [seed_lo, seed_hi ^ offset_hi])`
//! is below `t = round((1 - p)·2^16)` (at least 1), and is then scaled by `2^16 / t`; the LSE
//! stays that of the probabilities before dropout.
//!
//! Sixteen bits per probability, not 32, halve the generator's work, which is most of what
//! dropout costs a GPU kernel; FlashAttention-2 takes 8 (rates in steps of 1/256). Here the
//! rate applied is p rounded to a multiple of 2^-16 (within 2^-17 of it), and the scale is the
//! exact inverse of the keep rate applied, so the output's expectation is unchanged. Every
//! backend and the f64 reference call [`Dropout::scale`] or the same words.

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

/// Keys one generator call decides (16 bits each).
pub(crate) const KEYS_PER_CALL: usize = 8;

/// A validated [`Dropout`] with its keep threshold and scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct DropoutMask {
    key: [u32; 2],
    offset: u32,
    /// Keep when the 16-bit piece is below this, in [1, 2^16].
    threshold: u32,
    /// 2^16 / threshold, applied to the probabilities kept.
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
        let threshold = ((keep * 65536.0).round() as u32).max(1);
        Ok(Some(DropoutMask {
            key: [
                self.seed as u32,
                (self.seed >> 32) as u32 ^ (self.offset >> 32) as u32,
            ],
            offset: self.offset as u32,
            threshold,
            keep_scale: (65536.0 / f64::from(threshold)) as f32,
        }))
    }

    /// The factor probability P[b, h, i, j] is multiplied by: 0 (dropped) or the keep scale.
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
/// counter word, the threshold as the largest piece kept, and the scale; all zero is no
/// dropout.
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
            keep_max: self.threshold - 1,
            scale: self.keep_scale,
        }
    }

    /// The random bits of keys `8·(j / 8) ..` of row `i` of head `bh`.
    #[inline]
    fn words(&self, bh: usize, i: usize, j: usize) -> [u32; 4] {
        let call = (j / KEYS_PER_CALL) as u32;
        philox4x32_10([call, i as u32, bh as u32, self.offset], self.key)
    }

    /// The factor of the key whose 16-bit piece is `k` of `words`.
    #[inline]
    fn factor(&self, words: &[u32; 4], k: usize) -> f32 {
        let piece = (words[k / 2] >> (16 * (k % 2))) & 0xffff;
        if piece < self.threshold {
            self.keep_scale
        } else {
            0.0
        }
    }

    /// See [`Dropout::scale`].
    #[inline]
    pub fn scale(&self, bh: usize, i: usize, j: usize) -> f32 {
        self.factor(&self.words(bh, i, j), j % KEYS_PER_CALL)
    }

    /// Multiplies `row[jj]`, probability P[b, h, i, j0 + jj], by its factor; one generator
    /// call per eight keys.
    #[inline]
    pub fn apply(&self, bh: usize, i: usize, j0: usize, row: &mut [f32]) {
        let mut jj = 0;
        while jj < row.len() {
            let j = j0 + jj;
            let first = j % KEYS_PER_CALL;
            let end = (jj + KEYS_PER_CALL - first).min(row.len());
            let words = self.words(bh, i, j);
            for (k, x) in (first..).zip(&mut row[jj..end]) {
                *x *= self.factor(&words, k);
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

    /// The rate applied is p within 2^-17, and the scale its exact inverse; rates so close to
    /// 1 that no piece would be kept keep one in 2^16.
    #[test]
    fn threshold_and_scale() {
        for p in [1e-9f32, 0.1, 0.5, 0.9, 1.0 - 1e-6, 1.0 - f32::EPSILON / 2.0] {
            let m = Dropout {
                p,
                seed: 1,
                offset: 2,
            }
            .validate()
            .unwrap()
            .unwrap();
            let keep = f64::from(m.threshold) / 65536.0;
            assert!(m.threshold >= 1 && m.threshold <= 65536);
            assert!(
                (keep - (1.0 - f64::from(p))).abs() <= 0.5 / 65536.0 || m.threshold == 1,
                "p {p}: keeps {keep}"
            );
            assert_eq!(f64::from(m.keep_scale), (1.0 / keep) as f32 as f64);
            assert_eq!(m.kernel_words().keep_max, m.threshold - 1);
        }
    }

    /// `apply` over any span of keys gives each key the factor `scale` gives it.
    #[test]
    fn apply_agrees_with_scale() {
        let m = Dropout {
            p: 0.3,
            seed: 7,
            offset: 1 << 33,
        }
        .validate()
        .unwrap()
        .unwrap();
        for (j0, n) in [(0, 8), (3, 1), (5, 20), (16, 7), (9, 64)] {
            let mut row = vec![1.0f32; n];
            m.apply(5, 11, j0, &mut row);
            for (jj, &x) in row.iter().enumerate() {
                assert_eq!(x, m.scale(5, 11, j0 + jj), "j0 {j0} jj {jj}");
            }
        }
    }
}
