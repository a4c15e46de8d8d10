//! How a forward problem is cut into work items, and the split-KV merge.
//!
//! A work item is (batch, KV head, block of query rows[, KV split]). When there are too few
//! items to keep a machine busy (decoding: one query row per head), each item's keys are split
//! into parts whose partial results are merged with their log-sum-exp. The split count depends
//! on the problem's sizes only, so results are the same for every thread count.

use super::isa::{run_with, Isa, KernelFn};
use super::math::MulAdd;
use super::microkernel::BK;
use super::parallel::{for_each, for_each_chunk, for_each_chunk_mut, Exec};
use super::tile::{attend, begin, round_up, Scratch, TileRows};
use crate::dtype::store_row_f32;
use crate::error::Result;
use crate::problem::Problem;

/// Enough independent items for a large machine; fewer than this triggers KV splitting.
const TARGET_ITEMS: usize = 128;
/// Items needed before blocks taller than 64 rows are used.
const MIN_ITEMS_FOR_TALL_BLOCKS: usize = 32;
/// Fewest key tiles a split may have, so merging stays cheap next to the work.
const MIN_TILES_PER_SPLIT: usize = 4;

struct Plan {
    rows_per_head: usize,
    block_rows: usize,
    row_blocks: usize,
    items: usize,
    splits: usize,
}

fn plan(p: &Problem) -> Plan {
    let rows_per_head = p.seqlen_q * p.group_size();
    let heads = p.batch * p.heads_kv;
    // Taller blocks share each packed K/V tile among more query rows; shorter ones give more
    // items to spread over threads. Take the tallest that still leaves enough items.
    let block_rows = if p.head_dim.max(p.head_dim_v) > 256 {
        32
    } else {
        [256, 128]
            .into_iter()
            .find(|&b| heads * rows_per_head.div_ceil(b) >= MIN_ITEMS_FOR_TALL_BLOCKS)
            .unwrap_or(64)
    }
    .min(rows_per_head);
    let row_blocks = rows_per_head.div_ceil(block_rows);
    let items = heads * row_blocks;
    let kv_tiles = p.seqlen_kv.div_ceil(BK);
    let splits = if items >= TARGET_ITEMS {
        1
    } else {
        TARGET_ITEMS
            .div_ceil(items)
            .min(kv_tiles / MIN_TILES_PER_SPLIT)
            .max(1)
    };
    Plan {
        rows_per_head,
        block_rows,
        row_blocks,
        items,
        splits,
    }
}

impl Plan {
    fn rows(&self, p: &Problem, item: usize) -> TileRows {
        let block = item % self.row_blocks;
        let hkv = (item / self.row_blocks) % p.heads_kv;
        let batch = item / (self.row_blocks * p.heads_kv);
        let row0 = block * self.block_rows;
        TileRows {
            batch,
            hkv,
            row0,
            nrows: self.block_rows.min(self.rows_per_head - row0),
        }
    }
}

/// Keys of split `s` of `n` over the visible range, cut on tile boundaries.
fn split_keys(range: (usize, usize), s: usize, n: usize) -> (usize, usize) {
    let tiles = (range.1 - range.0).div_ceil(BK);
    let key = |t: usize| (range.0 + t * BK).min(range.1);
    (key(tiles * s / n), key(tiles * (s + 1) / n))
}

/// One forward work item: rows `t` over their visible keys, or over split `s` of `n` of them.
struct ForwardItem<'a> {
    p: &'a Problem,
    t: &'a TileRows,
    split: Option<(usize, usize)>,
    sc: &'a mut Scratch,
}

impl KernelFn for ForwardItem<'_> {
    type Output = ();
    #[inline(always)]
    fn call<M: MulAdd, const C: usize, const BF16: bool>(self) {
        let range = begin::<M, BF16>(self.p, self.t, self.sc);
        let keys = match self.split {
            Some((s, n)) => split_keys(range, s, n),
            None => range,
        };
        attend::<M, C, BF16>(self.p, self.t, keys, self.sc);
    }
}

/// Writes rows of a finished item: `acc / l` to `out`, `m + ln l` to `lse`; zeros and -inf for
/// rows that saw no key.
fn write_rows(p: &Problem, t: &TileRows, sc: &Scratch, orow: &mut [f32]) {
    let (dv, dvp) = (p.head_dim_v, sc.dvp);
    for r in 0..t.nrows {
        let (qpos, head) = t.position(p, r);
        let l = sc.l[r];
        let lse = if l > 0.0 {
            let inv = 1.0 / l;
            for (o, a) in orow.iter_mut().zip(&sc.acc[r * dvp..][..dv]) {
                *o = a * inv;
            }
            sc.m[r] + l.ln()
        } else {
            orow.fill(0.0);
            f32::NEG_INFINITY
        };
        // SAFETY: indices are within the validated out/lse views; this item owns these rows.
        unsafe {
            store_row_f32(p.out.dtype, orow, p.out.at([t.batch, qpos, head, 0]));
            if let Some(l) = &p.lse {
                *(l.at([t.batch, head, qpos, 0]) as *mut f32) = lse;
            }
        }
    }
}

pub(super) fn forward(p: &Problem, isa: Isa, exec: Exec) -> Result<()> {
    let plan = plan(p);
    let new_scratch = || (Scratch::new(p, plan.block_rows), vec![0f32; p.head_dim_v]);
    if plan.splits == 1 {
        for_each(exec, plan.items, new_scratch, |(sc, orow), item| {
            let t = plan.rows(p, item);
            run_with(
                isa,
                ForwardItem {
                    p,
                    t: &t,
                    split: None,
                    sc,
                },
            );
            write_rows(p, &t, sc, orow);
        });
        return Ok(());
    }

    // Split-KV: each (item, split) leaves [m, l, acc row] per row in `partial`; then each item
    // merges its splits in split order.
    let dvp = round_up(p.head_dim_v, 16);
    let row_len = dvp + 2;
    let part_len = round_up(plan.block_rows, super::microkernel::R) * row_len;
    let total = plan
        .items
        .checked_mul(plan.splits)
        .and_then(|n| n.checked_mul(part_len))
        .ok_or_else(|| crate::Error::invalid("problem too large to split"))?;
    let mut partial = Vec::new();
    partial.try_reserve_exact(total)?;
    partial.resize(total, 0f32);
    for_each_chunk_mut(
        exec,
        &mut partial,
        part_len,
        new_scratch,
        |(sc, _), job, part| {
            let (item, split) = (job / plan.splits, job % plan.splits);
            let t = plan.rows(p, item);
            run_with(
                isa,
                ForwardItem {
                    p,
                    t: &t,
                    split: Some((split, plan.splits)),
                    sc,
                },
            );
            for r in 0..t.nrows {
                let dst = &mut part[r * row_len..][..row_len];
                dst[0] = sc.m[r];
                dst[1] = sc.l[r];
                dst[2..].copy_from_slice(&sc.acc[r * dvp..][..dvp]);
            }
        },
    );
    let block_len = plan.splits * part_len;
    for_each_chunk(
        exec,
        &partial,
        block_len,
        new_scratch,
        |(sc, orow), item, parts| {
            let t = plan.rows(p, item);
            for r in 0..t.nrows {
                let part = |s: usize| &parts[s * part_len + r * row_len..][..row_len];
                let m = (0..plan.splits).fold(f32::NEG_INFINITY, |a, s| a.max(part(s)[0]));
                let acc = &mut sc.acc[r * dvp..][..dvp];
                acc.fill(0.0);
                let mut l = 0.0;
                if m > f32::NEG_INFINITY {
                    for s in 0..plan.splits {
                        let ps = part(s);
                        let w = (ps[0] - m).exp();
                        l += ps[1] * w;
                        for (a, &x) in acc.iter_mut().zip(&ps[2..]) {
                            *a += x * w;
                        }
                    }
                }
                sc.m[r] = m;
                sc.l[r] = l;
            }
            write_rows(p, &t, sc, orow);
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_the_range_exactly() {
        for range in [(0, 1), (3, 700), (0, 4096), (100, 165)] {
            for n in 1..9 {
                let mut next = range.0;
                for s in 0..n {
                    let (a, b) = split_keys(range, s, n);
                    assert_eq!(a, next);
                    assert!(b >= a);
                    next = b;
                }
                assert_eq!(next, range.1);
            }
        }
    }
}
