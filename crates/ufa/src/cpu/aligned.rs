//! Zeroed scratch buffers whose first element starts a cache line.
//!
//! A `Vec<f32>` of the sizes the kernels use comes from the allocator 16 bytes past a line
//! (glibc's large chunks), so every AMX tile row and 512-bit vector that a kernel reads or
//! writes at a multiple of 64 bytes from the start crossed two lines. On a Sapphire-Rapids-class
//! Xeon a tile product whose operands and sums sat 16 bytes off ran at half the speed of the
//! same product on aligned ones (32 × 256 scores over d128: 4.0 against 2.0 µs, 2026-12-06).

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

/// A cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Element types whose all-zero bit pattern is zero and any bit pattern is a value.
pub trait Plain: Copy {}
impl Plain for f32 {}
impl Plain for u32 {}

/// `len` elements of `T`, zeroed, the first 64-byte aligned; a slice by `Deref`.
pub struct AlignedBuf<T: Plain> {
    lines: Vec<Line>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Plain> AlignedBuf<T> {
    pub fn zeroed(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<T>();
        AlignedBuf {
            lines: vec![Line([0; 64]); bytes.div_ceil(64)],
            len,
            _t: PhantomData,
        }
    }
}

impl<T: Plain> Default for AlignedBuf<T> {
    fn default() -> Self {
        AlignedBuf::zeroed(0)
    }
}

impl<T: Plain> Deref for AlignedBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the lines hold at least `len` elements of T (plain data, zero-initialised
        // or written through `deref_mut`), and a line's alignment is a multiple of T's.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const T, self.len) }
    }
}

impl<T: Plain> DerefMut for AlignedBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut T, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_aligned_and_as_long_as_asked() {
        for len in [0, 1, 15, 16, 17, 1000] {
            let mut b = AlignedBuf::<f32>::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0.0));
            assert_eq!(b.as_ptr() as usize % 64, 0);
            b.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
            assert!(b.iter().enumerate().all(|(i, &x)| x == i as f32));
            let u = AlignedBuf::<u32>::zeroed(len);
            assert_eq!((u.len(), u.as_ptr() as usize % 64), (len, 0));
        }
    }
}
