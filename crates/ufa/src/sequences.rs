//! How the rows of a call's tensors belong to sequences: a dense batch (every sequence the same
//! length, batch entry `b` at `b · stride`), a packed variable-length batch (sequence `b` starts
//! at row `cu_seqlens[b]`), a paged KV cache (key `j` of sequence `b` in page
//! `block_table[b][j / page_size]`) or a dense cache read through `cache_batch_idx`.
//!
//! One description serves every backend: the CPU reads the metadata arrays in place through
//! [`RowMap`] and [`Lengths`]; the CUDA parameter blocks carry the same pointers and the kernels
//! apply the same rules. The metadata is int32, as FlashAttention's.

use crate::params::CausalAlignment;
use crate::problem::Operand;

/// A validated int32 array (host or device memory): element `[i]` at `ptr + i·stride`, element
/// `[i][j]` of a 2-d array at `ptr + i·stride + j` (its last dim contiguous).
#[derive(Clone, Copy, Debug)]
pub(crate) struct IntArray {
    pub ptr: *const i32,
    pub len: usize,
    pub stride: usize,
    /// Columns of a 2-d array (block tables); 1 for 1-d ones.
    pub cols: usize,
}

// SAFETY: a read-only description of memory the caller keeps valid for the call.
unsafe impl Send for IntArray {}
unsafe impl Sync for IntArray {}

impl IntArray {
    /// Element `i` (host memory only).
    ///
    /// # Safety
    /// The array must live in host memory and `i < len`.
    #[inline(always)]
    pub unsafe fn get(&self, i: usize) -> i32 {
        *self.ptr.add(i * self.stride)
    }

    /// Element `[i][j]` of a 2-d array (host memory only).
    ///
    /// # Safety
    /// As [`IntArray::get`], and `j < cols`.
    #[inline(always)]
    pub unsafe fn get2(&self, i: usize, j: usize) -> i32 {
        *self.ptr.add(i * self.stride + j)
    }

    /// Every element, copied row by row into `len × cols` values (host memory only).
    ///
    /// # Safety
    /// The array must live in host memory.
    pub unsafe fn copy_dense(&self) -> Vec<i32> {
        (0..self.len)
            .flat_map(|i| (0..self.cols).map(move |j| self.get2(i, j)))
            .collect()
    }

    /// Bytes from the first element to one past the last.
    pub fn span_bytes(&self) -> usize {
        match self.len {
            0 => 0,
            n => ((n - 1) * self.stride + self.cols) * 4,
        }
    }
}

/// Where row `pos` of sequence `b` of an operand lives. Dimension 0 of an operand's strides is
/// its batch (or page) stride, dimension `seq_dim` its row stride.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) enum RowMap {
    /// `b · strides[0] + pos · strides[seq_dim]`: a dense batch.
    #[default]
    Strided,
    /// `(cu[b] + pos) · strides[seq_dim]`: a packed variable-length batch (`strides[0]` is 0)
    /// of `rows` rows.
    Packed { cu: IntArray, rows: usize },
    /// `table[b][pos >> shift] · strides[0] + (pos & (2^shift − 1)) · strides[1]`: a paged
    /// cache `[pages, page_size, heads, dim]` with `page_size = 2^shift`.
    Paged {
        table: IntArray,
        shift: u32,
        pages: usize,
    },
    /// `index[b] · strides[0] + pos · strides[1]`: a dense cache of `entries` sequences read
    /// through `cache_batch_idx`.
    Gathered { index: IntArray, entries: usize },
}

impl RowMap {
    /// The (batch or page, row) coordinates of row `pos` of sequence `b` (host metadata only).
    ///
    /// # Safety
    /// The metadata must be host memory, validated for `b` and `pos`.
    #[inline(always)]
    pub unsafe fn locate(&self, b: usize, pos: usize) -> (usize, usize) {
        match *self {
            RowMap::Strided => (b, pos),
            RowMap::Packed { cu, .. } => (0, cu.get(b) as usize + pos),
            RowMap::Paged { table, shift, .. } => (
                table.get2(b, pos >> shift) as usize,
                pos & ((1usize << shift) - 1),
            ),
            RowMap::Gathered { index, .. } => (index.get(b) as usize, pos),
        }
    }

    pub fn is_paged(&self) -> bool {
        matches!(self, RowMap::Paged { .. })
    }

    /// Whether rows `pos..pos + n` of a sequence are `strides[seq_dim]` apart in memory.
    pub fn rows_are_evenly_spaced(&self) -> bool {
        !self.is_paged()
    }

    /// A sequence's rows are `strides[seq_dim]` apart in runs that start at the positions
    /// `pos` with `pos & run_mask() == 0`: each page of a paged cache, else the whole sequence.
    #[inline(always)]
    pub fn run_mask(&self) -> usize {
        match *self {
            RowMap::Paged { shift, .. } => (1usize << shift) - 1,
            _ => usize::MAX,
        }
    }
}

/// How many keys each sequence has.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) enum KeyLengths {
    /// Every sequence has `seqlen_kv` keys.
    #[default]
    Uniform,
    /// `cu[b + 1] − cu[b]` keys (packed keys).
    Cumulative(IntArray),
    /// `used[b] + add` keys: `seqused_k`, or a KV cache's `cache_seqlens` plus the keys the
    /// call appends.
    Used { used: IntArray, add: usize },
}

/// The lengths of one sequence, and where its causal diagonal lies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Seq {
    pub seqlen_q: usize,
    pub seqlen_kv: usize,
    /// Query row `i` is aligned with key `i + diag_offset`.
    pub diag_offset: i64,
}

/// The sequences of a problem: query lengths (uniform or from `cu_seqlens_q`), key lengths and
/// the alignment of the causal diagonal.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sequences {
    /// `cu_seqlens_q` of a packed batch; None: every sequence has `seqlen_q` rows.
    pub cu_q: Option<IntArray>,
    pub kv: KeyLengths,
    pub alignment: CausalAlignment,
}

impl Sequences {
    /// Whether every sequence has the problem's (maximum) lengths: a dense batch.
    pub fn is_uniform(&self) -> bool {
        self.cu_q.is_none() && matches!(self.kv, KeyLengths::Uniform)
    }

    /// The diagonal offset of a sequence with these lengths.
    pub fn diag_offset(&self, seqlen_q: usize, seqlen_kv: usize) -> i64 {
        match self.alignment {
            CausalAlignment::BottomRight => seqlen_kv as i64 - seqlen_q as i64,
            CausalAlignment::TopLeft => 0,
        }
    }

    /// The lengths of sequence `b` of a problem whose largest lengths are `max_q`, `max_kv`
    /// (host metadata only; validation bounds them by those).
    ///
    /// # Safety
    /// The metadata must be host memory, and `b` a valid sequence.
    pub unsafe fn seq(&self, b: usize, max_q: usize, max_kv: usize) -> Seq {
        let seqlen_q = match self.cu_q {
            Some(cu) => (cu.get(b + 1) - cu.get(b)) as usize,
            None => max_q,
        };
        let seqlen_kv = match self.kv {
            KeyLengths::Uniform => max_kv,
            KeyLengths::Cumulative(cu) => (cu.get(b + 1) - cu.get(b)) as usize,
            KeyLengths::Used { used, add } => used.get(b) as usize + add,
        };
        Seq {
            seqlen_q,
            seqlen_kv,
            diag_offset: self.diag_offset(seqlen_q, seqlen_kv),
        }
    }
}

impl Operand {
    /// Byte address of element `idx` = [batch, row, head, column] (for an LSE operand,
    /// [batch, head, row]): the row mapped through [`RowMap`].
    #[inline(always)]
    pub fn at(&self, idx: [usize; 4]) -> *mut u8 {
        // No index is written back into an array by a run-time position: that kept the whole
        // index in memory, and its reload as one vector after four scalar stores stalled on
        // store forwarding (12% of a 16x16x64 fp32 call's kernel time, Xeon).
        let [b, i1, i2, i3] = idx;
        let [s0, s1, s2, s3] = self.strides;
        let off = match self.rows {
            RowMap::Strided => b * s0 + i1 * s1 + i2 * s2 + i3 * s3,
            map => {
                let on_dim1 = self.seq_dim == 1;
                debug_assert!(on_dim1 || self.seq_dim == 2);
                // SAFETY: only host problems address elements (the CUDA backend passes the
                // metadata to its kernels), and validation bounds every index it yields.
                let (outer, row) = unsafe { map.locate(b, if on_dim1 { i1 } else { i2 }) };
                let (i1, i2) = if on_dim1 { (row, i2) } else { (i1, row) };
                outer * s0 + i1 * s1 + i2 * s2 + i3 * s3
            }
        };
        // SAFETY (of later dereference): `off` is within the span checked at validation.
        self.ptr.wrapping_add(off * self.dtype.size_in_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    fn arr(v: &[i32], cols: usize) -> IntArray {
        IntArray {
            ptr: v.as_ptr(),
            len: v.len() / cols,
            stride: cols,
            cols,
        }
    }

    #[test]
    fn row_maps_address_rows_as_documented() {
        let cu = [0, 3, 7];
        let table = [5, 2, 9, 0, 1, 4];
        let idx = [2, 0];
        let strides = [1000, 10, 3, 1];
        let op = |rows| Operand {
            ptr: std::ptr::null_mut(),
            dtype: DType::F32,
            strides,
            rows,
            seq_dim: 1,
        };
        let elems = |o: Operand, i| o.at(i) as usize / 4;
        assert_eq!(elems(op(RowMap::Strided), [1, 2, 1, 1]), 1024);
        let packed = op(RowMap::Packed {
            cu: arr(&cu, 1),
            rows: 7,
        });
        assert_eq!(elems(packed, [1, 2, 1, 1]), (3 + 2) * 10 + 4);
        // Page size 4: key 6 of sequence 1 is row 2 of page table[1][1] = 1.
        let paged = op(RowMap::Paged {
            table: arr(&table, 3),
            shift: 2,
            pages: 10,
        });
        assert_eq!(elems(paged, [1, 6, 0, 0]), 1000 + 20);
        let gathered = op(RowMap::Gathered {
            index: arr(&idx, 1),
            entries: 3,
        });
        assert_eq!(elems(gathered, [0, 1, 0, 0]), 2000 + 10);
    }

    #[test]
    fn sequence_lengths_and_diagonals() {
        let cu_q = [0, 2, 2, 7];
        let used = [5, 0, 1];
        let s = Sequences {
            cu_q: Some(arr(&cu_q, 1)),
            kv: KeyLengths::Used {
                used: arr(&used, 1),
                add: 1,
            },
            alignment: CausalAlignment::BottomRight,
        };
        unsafe {
            assert_eq!(
                s.seq(0, 9, 9),
                Seq {
                    seqlen_q: 2,
                    seqlen_kv: 6,
                    diag_offset: 4
                }
            );
            assert_eq!(s.seq(1, 9, 9).seqlen_q, 0);
            assert_eq!(s.seq(2, 9, 9).diag_offset, 2 - 5);
        }
        let top = Sequences {
            alignment: CausalAlignment::TopLeft,
            ..s
        };
        assert_eq!(unsafe { top.seq(0, 9, 9) }.diag_offset, 0);
        assert!(Sequences::default().is_uniform());
    }
}
