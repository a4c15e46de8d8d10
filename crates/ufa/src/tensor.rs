//! Tensor views: borrowed memory described by dtype, device, shape and strides (in elements).
//!
//! Views never own memory. The safe constructors borrow Rust slices and check that every element
//! the view can address lies inside the slice; the `unsafe` ones take raw pointers (for the C ABI
//! and device memory) and leave that promise to the caller.

use crate::device::Device;
use crate::dtype::{DType, Element};
use crate::error::{invalid, Result};
use std::marker::PhantomData;

/// Most dimensions any ufa tensor has (Q/K/V/O: 4, LSE: 3, masks: up to 4, ALiBi: 1 or 2).
pub const MAX_DIMS: usize = 4;

/// Largest element offset (and element count) a view may have: offsets times the widest element
/// (8 bytes) stay within `isize`, so no byte arithmetic on a valid view overflows.
const MAX_ELEMENT_OFFSET: usize = isize::MAX as usize / 8;

/// Shape and strides of a view, in elements. Strides are non-negative.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    ndim: usize,
    shape: [usize; MAX_DIMS],
    strides: [usize; MAX_DIMS],
}

impl Layout {
    /// A layout from explicit shape and strides.
    pub fn new(shape: &[usize], strides: &[usize]) -> Result<Self> {
        if shape.is_empty() || shape.len() > MAX_DIMS {
            invalid!(
                "a tensor needs 1 to {MAX_DIMS} dimensions, got {} (shape {shape:?})",
                shape.len()
            );
        }
        if strides.len() != shape.len() {
            invalid!(
                "shape {shape:?} has {} dimensions but strides {strides:?} has {}",
                shape.len(),
                strides.len()
            );
        }
        // A stride of a dimension of size 0 or 1 addresses nothing, so the extent check below
        // lets any value through; but kernels still scale every stride by the element size
        // (a row step, a prefetch distance), which must not overflow.
        if let Some((i, &s)) = strides
            .iter()
            .enumerate()
            .find(|&(_, &s)| s > MAX_ELEMENT_OFFSET)
        {
            invalid!(
                "shape {shape:?} with strides {strides:?}: strides[{i}]={s} is past the largest \
                 element offset any memory has ({MAX_ELEMENT_OFFSET})"
            );
        }
        let mut l = Layout {
            ndim: shape.len(),
            shape: [1; MAX_DIMS],
            strides: [0; MAX_DIMS],
        };
        l.shape[..shape.len()].copy_from_slice(shape);
        l.strides[..shape.len()].copy_from_slice(strides);
        l.span()?;
        Ok(l)
    }

    /// The row-major contiguous layout of `shape`.
    pub fn contiguous(shape: &[usize]) -> Result<Self> {
        let mut strides = [0usize; MAX_DIMS];
        let mut acc = 1usize;
        for i in (0..shape.len().min(MAX_DIMS)).rev() {
            strides[i] = acc;
            acc = match acc.checked_mul(shape[i].max(1)) {
                Some(a) => a,
                None => invalid!("shape {shape:?} has more elements than fit in memory"),
            };
        }
        Layout::new(shape, &strides[..shape.len().min(MAX_DIMS)])
    }

    pub fn ndim(&self) -> usize {
        self.ndim
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape[..self.ndim]
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides[..self.ndim]
    }

    /// Number of elements the view covers.
    pub fn numel(&self) -> usize {
        // span() succeeded at construction, so the product of dims cannot overflow unless strides
        // are zero; saturate rather than panic in that case.
        self.shape()
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX)
    }

    /// One past the largest element offset the view addresses (0 for an empty view), checked.
    pub fn span(&self) -> Result<usize> {
        let mut last = 0usize;
        for (&d, &s) in self.shape().iter().zip(self.strides()) {
            if d == 0 {
                return Ok(0);
            }
            let step = (d - 1).checked_mul(s);
            last = match step.and_then(|st| last.checked_add(st)) {
                Some(x) => x,
                None => invalid!(
                    "shape {:?} with strides {:?} addresses more memory than exists",
                    self.shape(),
                    self.strides()
                ),
            };
        }
        match last.checked_add(1) {
            Some(s) if s <= MAX_ELEMENT_OFFSET => Ok(s),
            _ => invalid!(
                "shape {:?} with strides {:?} addresses more memory than exists",
                self.shape(),
                self.strides()
            ),
        }
    }

    /// Whether two different indices can reach the same element (writing through such a view
    /// from several threads would race). Dimensions of size 1 never alias, nor do the
    /// elements of an empty view (there are none).
    pub fn has_overlap(&self) -> bool {
        if self.shape().contains(&0) {
            return false;
        }
        let mut dims: Vec<(usize, usize)> = self
            .shape()
            .iter()
            .zip(self.strides())
            .filter(|(&d, _)| d > 1)
            .map(|(&d, &s)| (s, d))
            .collect();
        dims.sort_unstable();
        let mut extent = 1usize; // elements covered by the dims with smaller strides
        for (stride, size) in dims {
            if stride < extent {
                return true;
            }
            extent = stride.saturating_mul(size);
        }
        false
    }
}

/// A read-only view of a tensor.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    ptr: *const u8,
    dtype: DType,
    device: Device,
    layout: Layout,
    _borrow: PhantomData<&'a [u8]>,
}

/// A writable view of a tensor.
#[derive(Debug)]
pub struct TensorViewMut<'a> {
    ptr: *mut u8,
    dtype: DType,
    device: Device,
    layout: Layout,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: views are plain descriptions of memory whose access rules are those of the borrow
// they were made from (`&[T]` / `&mut [T]`), or the caller's promise for raw pointers.
unsafe impl Send for TensorView<'_> {}
unsafe impl Sync for TensorView<'_> {}
unsafe impl Send for TensorViewMut<'_> {}
unsafe impl Sync for TensorViewMut<'_> {}

/// What a raw data pointer must be: non-null unless the view is empty (PyTorch, NumPy and C
/// callers hand out NULL for those), and aligned to its element size, because the kernels read
/// elements through typed slices. Both were found by fuzzing: an odd mfa buffer address, and
/// NULL data with elements through DLPack.
fn check_data(ptr: *const u8, dtype: DType, layout: &Layout) -> Result<()> {
    if ptr.is_null() && layout.numel() > 0 {
        invalid!(
            "data is NULL but shape {:?} has {} elements",
            layout.shape(),
            layout.numel()
        );
    }
    let align = dtype.size_in_bytes();
    if !(ptr as usize).is_multiple_of(align) {
        invalid!("data={ptr:p} is not aligned to {align} bytes, as {dtype} elements must be");
    }
    Ok(())
}

fn check_fits(layout: &Layout, len: usize) -> Result<()> {
    let span = layout.span()?;
    if span > len {
        invalid!(
            "shape {:?} with strides {:?} needs {span} elements but the slice has {len}",
            layout.shape(),
            layout.strides()
        );
    }
    Ok(())
}

macro_rules! view_common {
    ($t:ident) => {
        impl<'a> $t<'a> {
            pub fn dtype(&self) -> DType {
                self.dtype
            }
            pub fn device(&self) -> Device {
                self.device
            }
            pub fn layout(&self) -> &Layout {
                &self.layout
            }
            pub fn shape(&self) -> &[usize] {
                self.layout.shape()
            }
            pub fn strides(&self) -> &[usize] {
                self.layout.strides()
            }
            pub fn ndim(&self) -> usize {
                self.layout.ndim()
            }
        }
    };
}
view_common!(TensorView);
view_common!(TensorViewMut);

impl<'a> TensorView<'a> {
    /// A contiguous (row-major) view of `data` with `shape`.
    pub fn new<T: Element>(data: &'a [T], shape: &[usize]) -> Result<Self> {
        let layout = Layout::contiguous(shape)?;
        check_fits(&layout, data.len())?;
        Ok(Self::from_layout(
            data.as_ptr() as *const u8,
            T::DTYPE,
            Device::Cpu,
            layout,
        ))
    }

    /// A strided view of `data`; every addressed element must lie inside the slice.
    pub fn with_strides<T: Element>(
        data: &'a [T],
        shape: &[usize],
        strides: &[usize],
    ) -> Result<Self> {
        let layout = Layout::new(shape, strides)?;
        check_fits(&layout, data.len())?;
        Ok(Self::from_layout(
            data.as_ptr() as *const u8,
            T::DTYPE,
            Device::Cpu,
            layout,
        ))
    }

    /// A view of raw memory (host or device); a `ptr` not aligned for `dtype` is an error.
    ///
    /// # Safety
    /// `ptr` must address, for the lifetime `'a`, every element the shape and strides reach,
    /// on `device`, aligned for `dtype`, and nothing may write to it while the view is used.
    pub unsafe fn from_raw_parts(
        ptr: *const std::ffi::c_void,
        dtype: DType,
        device: Device,
        shape: &[usize],
        strides: &[usize],
    ) -> Result<Self> {
        let layout = Layout::new(shape, strides)?;
        check_data(ptr as *const u8, dtype, &layout)?;
        Ok(Self::from_layout(ptr as *const u8, dtype, device, layout))
    }

    fn from_layout(ptr: *const u8, dtype: DType, device: Device, layout: Layout) -> Self {
        TensorView {
            ptr,
            dtype,
            device,
            layout,
            _borrow: PhantomData,
        }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// The view with its dimensions reordered: `perm[i]` is the old dimension that becomes `i`.
    pub fn permute(&self, perm: &[usize]) -> Result<Self> {
        let layout = permute_layout(&self.layout, perm)?;
        Ok(Self::from_layout(self.ptr, self.dtype, self.device, layout))
    }
}

impl<'a> TensorViewMut<'a> {
    /// A contiguous (row-major) writable view of `data` with `shape`.
    pub fn new<T: Element>(data: &'a mut [T], shape: &[usize]) -> Result<Self> {
        let layout = Layout::contiguous(shape)?;
        check_fits(&layout, data.len())?;
        Ok(Self::from_layout(
            data.as_mut_ptr() as *mut u8,
            T::DTYPE,
            Device::Cpu,
            layout,
        ))
    }

    /// A strided writable view of `data`; every addressed element must lie inside the slice.
    pub fn with_strides<T: Element>(
        data: &'a mut [T],
        shape: &[usize],
        strides: &[usize],
    ) -> Result<Self> {
        let layout = Layout::new(shape, strides)?;
        check_fits(&layout, data.len())?;
        Ok(Self::from_layout(
            data.as_mut_ptr() as *mut u8,
            T::DTYPE,
            Device::Cpu,
            layout,
        ))
    }

    /// A writable view of raw memory (host or device).
    ///
    /// # Safety
    /// As [`TensorView::from_raw_parts`], and no one else may read or write the memory while
    /// the view is used.
    pub unsafe fn from_raw_parts(
        ptr: *mut std::ffi::c_void,
        dtype: DType,
        device: Device,
        shape: &[usize],
        strides: &[usize],
    ) -> Result<Self> {
        let layout = Layout::new(shape, strides)?;
        check_data(ptr as *const u8, dtype, &layout)?;
        Ok(Self::from_layout(ptr as *mut u8, dtype, device, layout))
    }

    fn from_layout(ptr: *mut u8, dtype: DType, device: Device, layout: Layout) -> Self {
        TensorViewMut {
            ptr,
            dtype,
            device,
            layout,
            _borrow: PhantomData,
        }
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    /// A read-only view of the same memory.
    pub fn as_view(&self) -> TensorView<'_> {
        TensorView::from_layout(self.ptr, self.dtype, self.device, self.layout)
    }

    /// The view with its dimensions reordered: `perm[i]` is the old dimension that becomes `i`.
    pub fn permute(self, perm: &[usize]) -> Result<Self> {
        let layout = permute_layout(&self.layout, perm)?;
        Ok(Self::from_layout(self.ptr, self.dtype, self.device, layout))
    }
}

fn permute_layout(l: &Layout, perm: &[usize]) -> Result<Layout> {
    let n = l.ndim();
    let mut seen = [false; MAX_DIMS];
    if perm.len() != n
        || perm
            .iter()
            .any(|&p| p >= n || std::mem::replace(&mut seen[p], true))
    {
        invalid!("permutation {perm:?} is not a permutation of {n} dimensions");
    }
    let shape: Vec<usize> = perm.iter().map(|&p| l.shape()[p]).collect();
    let strides: Vec<usize> = perm.iter().map(|&p| l.strides()[p]).collect();
    Layout::new(&shape, &strides)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_strides_are_row_major() {
        let l = Layout::contiguous(&[2, 3, 4, 5]).unwrap();
        assert_eq!(l.strides(), &[60, 20, 5, 1]);
        assert_eq!(l.span().unwrap(), 120);
        assert!(!l.has_overlap());
    }

    #[test]
    fn overflowing_shape_is_an_error() {
        let e = Layout::contiguous(&[usize::MAX / 2, 4]).unwrap_err();
        assert!(e.message().contains("more"), "{e}");
        let e = Layout::new(&[1 << 40, 1 << 30], &[1 << 30, 1]).unwrap_err();
        assert!(e.message().contains("addresses more memory"), "{e}");
    }

    #[test]
    fn huge_stride_of_a_size_one_dimension_is_an_error() {
        // Found by fuzzing the C ABI: it addresses nothing, but a kernel multiplied it by the
        // element size and overflowed.
        let e = Layout::new(&[1, 1, 1, 1], &[usize::MAX >> 1, 1, 1, 1]).unwrap_err();
        assert!(
            e.message()
                .contains("strides[0]=9223372036854775807 is past the largest element offset"),
            "{e}"
        );
        let e = Layout::new(&[0, 4], &[1, 1 << 62]).unwrap_err();
        assert!(
            e.message().contains("strides[1]=4611686018427387904"),
            "{e}"
        );
        assert!(Layout::new(&[1, 4], &[MAX_ELEMENT_OFFSET, 1]).is_ok());
    }

    #[test]
    fn misaligned_raw_pointer_is_an_error() {
        let data = [0f32; 4];
        let odd = unsafe { data.as_ptr().cast::<u8>().add(1) };
        let e =
            unsafe { TensorView::from_raw_parts(odd.cast(), DType::F32, Device::Cpu, &[2], &[1]) }
                .unwrap_err();
        assert!(e.message().contains("is not aligned to 4 bytes"), "{e}");
        let ok =
            unsafe { TensorView::from_raw_parts(odd.cast(), DType::Bool, Device::Cpu, &[2], &[1]) };
        assert!(ok.is_ok());
    }

    /// NULL is the data of an empty view only (the Python fuzz target found NULL with elements
    /// read through DLPack: fuzz/regressions/python-dlpack/null-data-with-elements).
    #[test]
    fn null_data_is_for_empty_views_only() {
        let null = std::ptr::null_mut::<std::ffi::c_void>();
        let e = unsafe {
            TensorViewMut::from_raw_parts(null, DType::F32, Device::Cpu, &[2, 3], &[3, 1])
        }
        .unwrap_err();
        assert!(
            e.message()
                .contains("data is NULL but shape [2, 3] has 6 elements"),
            "{e}"
        );
        let empty =
            unsafe { TensorView::from_raw_parts(null, DType::F32, Device::Cpu, &[2, 0], &[0, 1]) };
        assert!(empty.is_ok());
        assert!(!Layout::new(&[2, 0], &[0, 1]).unwrap().has_overlap());
    }

    #[test]
    fn overlap_detection() {
        assert!(Layout::new(&[4, 8], &[0, 1]).unwrap().has_overlap());
        assert!(Layout::new(&[4, 8], &[4, 1]).unwrap().has_overlap());
        assert!(!Layout::new(&[4, 8], &[8, 1]).unwrap().has_overlap());
        assert!(!Layout::new(&[1, 8], &[0, 1]).unwrap().has_overlap());
        assert!(!Layout::new(&[3, 4, 2], &[2, 6, 1]).unwrap().has_overlap());
    }

    #[test]
    fn slice_too_short_is_rejected() {
        let data = vec![0f32; 10];
        let e = TensorView::new(&data, &[1, 1, 2, 8]).unwrap_err();
        assert!(
            e.message()
                .contains("needs 16 elements but the slice has 10"),
            "{e}"
        );
    }
}
