//! Element types and their conversions to and from the fp32 the kernels compute in.

use half::{bf16, f16};
use std::fmt;

/// The element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
    /// One byte per element, zero = false; only for boolean masks.
    Bool,
    /// 32-bit signed integers; only for sequence metadata (cu_seqlens, block tables, lengths).
    I32,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::Bool => 1,
        }
    }

    pub fn is_float(self) -> bool {
        !matches!(self, DType::Bool | DType::I32)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::Bool => "bool",
            DType::I32 => "i32",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f32" | "fp32" | "float32" | "float" => Ok(DType::F32),
            "bool" => Ok(DType::Bool),
            "i32" | "int32" => Ok(DType::I32),
            other => Err(format!("unknown dtype '{other}' (expected f16, bf16, f32)")),
        }
    }
}

/// A Rust type that can back a tensor. Sealed: the library knows how to read every one of them.
pub trait Element: Copy + Send + Sync + 'static + sealed::Sealed {
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for bool {
    const DTYPE: DType = DType::Bool;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for bool {}
    impl Sealed for i32 {}
}

/// Reads `dst.len()` contiguous elements of type `dtype` at `src` as fp32.
///
/// # Safety
/// `src` must point to `dst.len()` readable elements of `dtype`, suitably aligned.
#[inline(always)]
pub(crate) unsafe fn load_row_f32(dtype: DType, src: *const u8, dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let n = dst.len();
    match dtype {
        DType::F32 => dst.copy_from_slice(std::slice::from_raw_parts(src as *const f32, n)),
        DType::F16 => std::slice::from_raw_parts(src as *const f16, n).convert_to_f32_slice(dst),
        // bf16 is the top half of an f32: a shift the caller's SIMD width vectorises (inlined
        // into the kernels, unlike the library call).
        DType::BF16 => {
            let s = std::slice::from_raw_parts(src as *const u16, n);
            for (d, &x) in dst.iter_mut().zip(s) {
                *d = f32::from_bits((x as u32) << 16);
            }
        }
        DType::Bool => {
            for (i, d) in dst.iter_mut().enumerate() {
                *d = if *src.add(i) != 0 { 1.0 } else { 0.0 };
            }
        }
        DType::I32 => {
            for (i, d) in dst.iter_mut().enumerate() {
                *d = *(src as *const i32).add(i) as f32;
            }
        }
    }
}

/// Reads one element of type `dtype` at `src` as f64 (the reference's precision).
///
/// # Safety
/// `src` must point to a readable, aligned element of `dtype`.
pub unsafe fn load_f64(dtype: DType, src: *const u8) -> f64 {
    match dtype {
        DType::F32 => *(src as *const f32) as f64,
        DType::F16 => (*(src as *const f16)).to_f64(),
        DType::BF16 => (*(src as *const bf16)).to_f64(),
        DType::Bool => (*src != 0) as u8 as f64,
        DType::I32 => *(src as *const i32) as f64,
    }
}

/// Writes `src` to `dst` as `dtype`, rounding to nearest even.
///
/// # Safety
/// `dst` must point to `src.len()` writable, aligned elements of `dtype`.
pub(crate) unsafe fn store_row_f32(dtype: DType, src: &[f32], dst: *mut u8) {
    use half::slice::HalfFloatSliceExt;
    let n = src.len();
    match dtype {
        DType::F32 => std::slice::from_raw_parts_mut(dst as *mut f32, n).copy_from_slice(src),
        DType::F16 => {
            std::slice::from_raw_parts_mut(dst as *mut f16, n).convert_from_f32_slice(src)
        }
        DType::BF16 => {
            std::slice::from_raw_parts_mut(dst as *mut bf16, n).convert_from_f32_slice(src)
        }
        DType::Bool | DType::I32 => unreachable!("outputs are floats (validated)"),
    }
}
