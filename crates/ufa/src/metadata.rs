//! Validation of the int32 sequence metadata of packed batches and KV caches: `cu_seqlens`,
//! `seqused`, `cache_seqlens`, block tables and `cache_batch_idx`.
//!
//! Shapes, dtypes and devices are always checked. Values are checked whenever the host can read
//! them: always for CPU calls (their kernels follow the indices), and for CUDA calls in checked
//! mode, which first copies the arrays to the host (a synchronisation). Unchecked CUDA calls rely
//! on the kernels, which clamp every index they read to the tensors they were given.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{invalid, Result};
use crate::problem::check_device;
use crate::sequences::IntArray;
use crate::tensor::TensorView;

/// Reads an [`IntArray`] into host memory as `len × cols` values: in place for host memory, by
/// a copy (and a synchronisation) for device memory.
pub(crate) type Fetch<'f> = &'f dyn Fn(&IntArray) -> Result<Vec<i32>>;

/// The host reader: CPU metadata is read in place.
pub(crate) fn fetch_host(a: &IntArray) -> Result<Vec<i32>> {
    // SAFETY: callers pass arrays of host problems, validated to lie in host memory.
    Ok(unsafe { a.copy_dense() })
}

/// An int32 array argument with the shape `want` (one entry per dimension: size and what it
/// must equal), on `device`. 2-d arrays need contiguous rows.
pub(crate) fn int_array(
    name: &str,
    t: &TensorView<'_>,
    device: Device,
    want: &[(usize, &str)],
) -> Result<IntArray> {
    check_device(name, t.device(), device)?;
    if t.dtype() != DType::I32 {
        invalid!("{name}.dtype={} but must be i32", t.dtype());
    }
    if t.ndim() != want.len() {
        let names: Vec<&str> = want.iter().map(|w| w.1).collect();
        invalid!(
            "{name} must have {} dimension(s) [{}], got {} (shape {:?})",
            want.len(),
            names.join(", "),
            t.ndim(),
            t.shape()
        );
    }
    for (d, &(size, what)) in want.iter().enumerate() {
        if t.shape()[d] != size {
            invalid!(
                "{name}.shape[{d}]={} but must equal {what}={size}",
                t.shape()[d]
            );
        }
    }
    let cols = if want.len() == 2 { t.shape()[1] } else { 1 };
    if want.len() == 2 && cols > 1 && t.strides()[1] != 1 {
        invalid!(
            "{name}.strides[1]={} but its rows must be contiguous (stride 1)",
            t.strides()[1]
        );
    }
    Ok(IntArray {
        ptr: t.as_ptr() as *const i32,
        len: t.shape()[0],
        stride: t.strides()[0],
        cols,
    })
}

/// The number of sequences an int32 `[batch + 1]` array describes.
pub(crate) fn batch_of_cumulative(name: &str, t: &TensorView<'_>) -> Result<usize> {
    match t.shape() {
        [n] if *n >= 1 => Ok(n - 1),
        s => invalid!("{name} must have shape [batch + 1] (at least one element), got {s:?}"),
    }
}

/// Checks cumulative offsets `cu` (of `what`, e.g. "query rows") against a tensor of `rows`
/// rows (`rows_name`) and the promised longest length `max` (`max_name`); returns the lengths.
pub(crate) fn check_cumulative(
    name: &str,
    cu: &[i32],
    rows: usize,
    rows_name: &str,
    max: usize,
    max_name: &str,
) -> Result<Vec<usize>> {
    if cu[0] != 0 {
        invalid!("{name}[0]={} but must be 0", cu[0]);
    }
    let mut lens = Vec::with_capacity(cu.len() - 1);
    for b in 0..cu.len() - 1 {
        let (start, end) = (cu[b], cu[b + 1]);
        if end < start {
            invalid!(
                "{name}[{}]={end} is less than {name}[{b}]={start}: offsets must not decrease",
                b + 1
            );
        }
        if end as usize > rows {
            invalid!(
                "{name}[{}]={end} but {rows_name} has only {rows} rows",
                b + 1
            );
        }
        let len = (end - start) as usize;
        if len > max {
            invalid!(
                "sequence {b} has {len} rows ({name}[{}] - {name}[{b}]) but {max_name}={max}",
                b + 1
            );
        }
        lens.push(len);
    }
    Ok(lens)
}

/// Checks per-sequence lengths (`seqused_kv`, `cache_seqlens`): each from 0 to `limit(b)`, where
/// the limit's meaning is `limit_name`.
pub(crate) fn check_lengths(
    name: &str,
    lens: &[i32],
    limit: impl Fn(usize) -> usize,
    limit_name: &str,
) -> Result<()> {
    for (b, &n) in lens.iter().enumerate() {
        if n < 0 {
            invalid!("{name}[{b}]={n} is negative");
        }
        if n as usize > limit(b) {
            invalid!("{name}[{b}]={n} exceeds {limit_name}={}", limit(b));
        }
    }
    Ok(())
}

/// Checks the block table entries that sequences with `lens` keys use (the first
/// `ceil(len / page_size)` of each row; the rest are never read) against `pages` pages.
/// Checks a block table against each sequence's key count: `cache` names the paged tensor
/// whose dimension 0 counts the `pages` (`k_cache` for a KV-cache call, `k` for a packed one).
pub(crate) fn check_block_table(
    table: &[i32],
    max_pages: usize,
    lens: &[usize],
    page_size: usize,
    (cache, pages): (&str, usize),
) -> Result<()> {
    for (b, &len) in lens.iter().enumerate() {
        let used = len.div_ceil(page_size);
        if used > max_pages {
            invalid!(
                "sequence {b} has {len} keys, which need {used} pages of {page_size}, but \
                 block_table has {max_pages} columns"
            );
        }
        for (j, &page) in table[b * max_pages..][..used].iter().enumerate() {
            if page < 0 || page as usize >= pages {
                invalid!(
                    "block_table[{b}][{j}]={page} but the cache has pages 0..{pages} \
                     ({cache}.shape[0])"
                );
            }
        }
    }
    Ok(())
}

/// The page size of a paged cache: a power of two from 1 to 256; returns its log2.
pub(crate) fn page_shift(name: &str, page_size: usize) -> Result<u32> {
    if !(1..=256).contains(&page_size) || !page_size.is_power_of_two() {
        invalid!("{name}.shape[1]={page_size} (page_size) must be a power of two from 1 to 256");
    }
    Ok(page_size.trailing_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cumulative_offsets_are_checked_with_their_names() {
        let ok = check_cumulative("cu", &[0, 3, 3, 7], 8, "q", 4, "max").unwrap();
        assert_eq!(ok, vec![3, 0, 4]);
        let e = |cu: &[i32]| {
            check_cumulative("cu_seqlens_q", cu, 8, "q", 4, "max_seqlen_q")
                .unwrap_err()
                .message()
                .to_string()
        };
        assert!(e(&[1, 3]).contains("cu_seqlens_q[0]=1 but must be 0"));
        assert!(e(&[0, 3, 2]).contains("cu_seqlens_q[2]=2 is less than cu_seqlens_q[1]=3"));
        assert!(e(&[0, 3, 9]).contains("cu_seqlens_q[2]=9 but q has only 8 rows"));
        assert!(e(&[0, 5]).contains("sequence 0 has 5 rows"));
    }

    #[test]
    fn block_tables_and_lengths() {
        // Two sequences, page size 4, 2 columns: 5 keys use pages [2, 0]; 0 keys use none.
        assert!(check_block_table(&[2, 0, -1, -1], 2, &[5, 0], 4, ("k", 3)).is_ok());
        let e = check_block_table(&[2, 7, 0, 0], 2, &[5, 0], 4, ("k_cache", 3)).unwrap_err();
        assert!(e.message().contains("block_table[0][1]=7"), "{e}");
        assert!(e.message().contains("(k_cache.shape[0])"), "{e}");
        let e = check_block_table(&[2, 1, 0, 0], 2, &[9, 0], 4, ("k", 3)).unwrap_err();
        assert!(e.message().contains("need 3 pages of 4"), "{e}");
        assert!(check_lengths("s", &[0, 4], |_| 4, "capacity").is_ok());
        let e = check_lengths("cache_seqlens", &[5], |_| 4, "capacity").unwrap_err();
        assert!(
            e.message()
                .contains("cache_seqlens[0]=5 exceeds capacity=4"),
            "{e}"
        );
        assert!(page_shift("k", 16).unwrap() == 4 && page_shift("k", 12).is_err());
        assert!(page_shift("k", 512).is_err() && page_shift("k", 1).unwrap() == 0);
    }
}
