//! How a forward problem is cut into work items, and the split-KV merge.
//!
//! A work item is (batch, KV head, block of query rows[, KV split]). When there are too few
//! items to keep a machine busy (decoding: one query row per head), each item's keys are split
//! into parts whose partial results are merged with their log-sum-exp. The split count depends
//! on the problem's sizes only, so results are the same for every thread count.

use super::isa::{run_with, Isa, KernelFn};
use super::math::MulAdd;
use super::microkernel::BK;
use super::parallel::{for_each, for_each_chunk_mut, Exec};
use super::tile::{
    attend, attend_amx_few, attend_heads, begin, few_rows_in_registers, finish, round_up, Scratch,
    TileRows,
};
use super::Workspace;
use crate::dtype::store_row_f32;
use crate::error::Result;
use crate::problem::Problem;
use crate::sequences::Seq;

/// Enough independent items for a large machine; fewer than this triggers KV splitting.
const TARGET_ITEMS: usize = 128;
/// Items needed before blocks taller than 64 rows are used.
const MIN_ITEMS_FOR_TALL_BLOCKS: usize = 32;
/// Fewest key tiles a split may have, so that its fixed costs (loading the rows again, writing
/// and merging its partial result) stay small next to its work: with 4, a B1 H8 S1024 forward
/// split into quarters ran 1.2-1.4x slower than unsplit on 2 cores.
const MIN_TILES_PER_SPLIT: usize = 16;

struct Plan {
    block_rows: usize,
    /// Work items in the order batch, KV head, block of rows.
    items: Vec<TileRows>,
    splits: usize,
    /// Items computed together by one job, key tile by key tile (see [`heads_per_job`]).
    group: usize,
}

/// Most KV heads a job interleaves.
const MAX_GROUP: usize = 8;

/// Jobs wanted per thread of the pool: enough that no thread waits long on another's last.
const JOBS_PER_THREAD: usize = 2;

/// KV heads whose items one job interleaves tile by tile. Where one head's keys are far apart
/// in memory ([batch, seq, heads, dim] layouts put a row of every head between two keys of
/// one), a job that runs heads one after another meets every key on a new page, with no
/// hardware prefetch and a TLB miss; interleaved, neighbouring heads read the same pages
/// together. Needs one block of rows per head, so that a job's items are consecutive KV heads
/// with the same rows and keys. Each item's arithmetic is unchanged, so results are too, and
/// the group may follow the pool's `threads`: it is the largest that still leaves each thread
/// [`JOBS_PER_THREAD`] of the `items / group × splits` units. A fixed group of 8 ran a batch-1
/// decode over a cache of 8 KV heads as one job on one core (2 cores, f32, 1k keys, from
/// Python: 756 µs against PyTorch's 602; 393 with the jobs spread;
/// bench/results/cpu_decode_2026-12-04_zen4_2cpu.md).
///
/// Where the rows take the few-rows path in registers, a job of every KV head reads each key's
/// rows of all heads, adjacent in memory, in one pass ([`attend_heads`]): K and V are then read
/// as streams, which a core here reads 2.9x as fast as 512-byte pieces 16 KiB apart (33 and
/// 12 GB/s). That group is taken whenever it leaves the threads their jobs.
///
/// With more than two rows a KV head in registers (grouped-query decoding, whose arithmetic is
/// the bound), heads are interleaved where each head's keys are one stream too ([batch, heads,
/// seq, dim]): the job's hints go out with each head's work ([`attend_heads`]), where a job of
/// one head hinted row by row into L1. 2-core Zen 4, from Python, [B, H, S, D]: B4, 32/8
/// heads, 4k keys, bf16 2.35 -> 2.08 ms best; B8, 32/8, 2k, f32 6.65 -> 4.62. With one row a
/// head, interleaved streams read at half the rate (B1, 32/32, 4k, bf16 1.63 -> 3.13 ms).
fn heads_per_job(
    p: &Problem,
    (one_block_per_head, rows): (bool, usize),
    (items, splits): (usize, usize),
    (threads, isa): (usize, Isa),
) -> usize {
    let scattered = [p.k, p.v]
        .iter()
        .any(|x| x.strides[1] > p.head_dim.max(p.head_dim_v));
    let in_registers = few_rows_in_registers(p, rows, isa.avx512());
    let grouped_query = rows > 2 && in_registers;
    if !one_block_per_head || !(scattered || grouped_query) {
        return 1;
    }
    let wanted = threads.saturating_mul(JOBS_PER_THREAD);
    let enough = |g: usize| p.heads_kv.is_multiple_of(g) && (items / g) * splits >= wanted;
    if in_registers && enough(p.heads_kv) {
        return p.heads_kv;
    }
    (1..=MAX_GROUP).rev().find(|&g| enough(g)).unwrap_or(1)
}

fn plan(p: &Problem, threads: usize, isa: Isa) -> Plan {
    let g = p.group_size();
    let seqs: Vec<Seq> = (0..p.batch).map(|b| p.seq(b)).collect();
    // Rows of one KV head of each sequence: query positions × the query heads of its group.
    let max_rows = p.seqlen_q * g;
    let blocks = |block_rows: usize| -> usize {
        seqs.iter()
            .map(|s| p.heads_kv * (s.seqlen_q * g).div_ceil(block_rows))
            .sum()
    };
    // Taller blocks share each packed K/V tile among more query rows; shorter ones give more
    // items to spread over threads. Take the tallest that still leaves enough items.
    let block_rows = if p.head_dim.max(p.head_dim_v) > 256 {
        32
    } else {
        [256, 128]
            .into_iter()
            .find(|&b| blocks(b) >= MIN_ITEMS_FOR_TALL_BLOCKS)
            .unwrap_or(64)
    }
    .min(max_rows)
    .max(1);
    let mut items = Vec::with_capacity(blocks(block_rows));
    for (batch, &seq) in seqs.iter().enumerate() {
        let rows = seq.seqlen_q * g;
        for hkv in 0..p.heads_kv {
            for row0 in (0..rows).step_by(block_rows) {
                items.push(TileRows {
                    batch,
                    hkv,
                    row0,
                    nrows: block_rows.min(rows - row0),
                    seq,
                });
            }
        }
    }
    // The longest sequence's keys (p.seqlen_kv only bounds them for a cache).
    let kv_tiles = seqs
        .iter()
        .map(|s| s.seqlen_kv)
        .max()
        .unwrap_or(0)
        .div_ceil(BK);
    let splits = if items.len() >= TARGET_ITEMS {
        1
    } else {
        TARGET_ITEMS
            .div_ceil(items.len().max(1))
            .min(kv_tiles / MIN_TILES_PER_SPLIT)
            .max(1)
    };
    let group = heads_per_job(
        p,
        (max_rows <= block_rows, max_rows),
        (items.len(), splits),
        (threads, isa),
    );
    Plan {
        block_rows,
        items,
        splits,
        group,
    }
}

/// Keys of split `s` of `n` over the visible range, cut on tile boundaries.
fn split_keys(range: (usize, usize), s: usize, n: usize) -> (usize, usize) {
    let tiles = (range.1 - range.0).div_ceil(BK);
    let key = |t: usize| (range.0 + t * BK).min(range.1);
    (key(tiles * s / n), key(tiles * (s + 1) / n))
}

/// One forward job: items `ts` (one scratch each) over their visible keys, or over split `s` of
/// `n` of them; several items are interleaved key tile by key tile.
struct ForwardJob<'a> {
    p: &'a Problem,
    ts: &'a [TileRows],
    split: Option<(usize, usize)>,
    scs: &'a mut [Scratch],
}

impl KernelFn for ForwardJob<'_> {
    type Output = ();
    #[inline(always)]
    fn call<
        M: MulAdd,
        const C: usize,
        const BF16: bool,
        const BF16_TILES: bool,
        const AMX: bool,
    >(
        self,
    ) {
        let mut range = (0, 0);
        for (t, sc) in self.ts.iter().zip(self.scs.iter_mut()) {
            // The same for every item of a job: their rows are the same query positions.
            range = begin::<M, BF16, AMX>(self.p, t, sc);
        }
        let keys = match self.split {
            Some((s, n)) => split_keys(range, s, n),
            None => range,
        };
        if attend_amx_few::<M, C, AMX>(self.p, self.ts, keys, self.scs) {
            // A job of a few rows a KV head on the tile unit, step by step over its heads.
        } else if attend_heads::<M, C, BF16, BF16_TILES>(self.p, self.ts, keys, self.scs) {
            // A job of heads whose rows take the few-rows path: key by key over its heads.
        } else if let [t] = self.ts {
            attend::<M, C, BF16, BF16_TILES, AMX>(self.p, t, keys, &mut self.scs[0]);
        } else {
            // Tile by tile, the same tiles `attend` takes over the whole range.
            for j0 in (keys.0..keys.1).step_by(BK) {
                let tile = (j0, (j0 + BK).min(keys.1));
                for (t, sc) in self.ts.iter().zip(self.scs.iter_mut()) {
                    attend::<M, C, BF16, BF16_TILES, AMX>(self.p, t, tile, sc);
                }
            }
        }
        for (t, sc) in self.ts.iter().zip(self.scs.iter_mut()) {
            finish(t, sc);
        }
    }
}

/// Writes rows of a finished item: `acc / l` to `out`, `m + ln l` to `lse`; zeros and -inf for
/// rows that saw no key.
fn write_rows(p: &Problem, t: &TileRows, sc: &Scratch, orow: &mut [f32]) {
    let (dv, dvp) = (p.head_dim_v, sc.dvp);
    for r in 0..t.nrows {
        let (qpos, head) = t.position(p, r);
        let l = sc.l[r];
        // l is 0 only for a row that saw no key (a visible key adds at least exp(0) = 1); a
        // NaN l (a NaN score or value) makes the row and its LSE NaN.
        let lse = if l != 0.0 {
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

/// A job's scratch (one per item it interleaves) and output row. Its scratch is handed to the
/// next calls ([`Scratch::keep`]): allocating and zeroing it was a fifth of a small call's
/// time, and on the AMX path (key-wide buffers) ~40% of a 256-key call's.
struct JobScratch {
    scs: Vec<Scratch>,
    orow: Vec<f32>,
    exec: Exec,
}

impl JobScratch {
    fn new(p: &Problem, plan: &Plan, isa: Isa, exec: Exec) -> JobScratch {
        JobScratch {
            scs: (0..plan.group)
                .map(|_| Scratch::reuse(p, plan.block_rows, isa, exec))
                .collect(),
            orow: vec![0f32; p.head_dim_v],
            exec,
        }
    }
}

impl Drop for JobScratch {
    fn drop(&mut self) {
        self.scs.drain(..).for_each(|sc| sc.keep(self.exec));
    }
}

pub(super) fn forward(p: &Problem, isa: Isa, exec: Exec, workspace: &Workspace) -> Result<()> {
    let threads = match exec {
        Exec::Pool => rayon::current_num_threads(),
        Exec::Inline => 1,
    };
    let plan = plan(p, threads, isa);
    let g = plan.group;
    let new_scratch = || JobScratch::new(p, &plan, isa, exec);
    let rows_of = |job: usize| -> &[TileRows] { &plan.items[job * g..][..g] };
    let jobs = plan.items.len() / g;
    if plan.splits == 1 {
        for_each(exec, jobs, new_scratch, |js, job| {
            let (scs, orow) = (&mut js.scs, &mut js.orow);
            let ts = rows_of(job);
            run_with(
                isa,
                ForwardJob {
                    p,
                    ts,
                    split: None,
                    scs,
                },
            );
            for (t, sc) in ts.iter().zip(scs.iter()) {
                write_rows(p, t, sc, orow);
            }
        });
        return Ok(());
    }

    // Split-KV: each (item, split) leaves [m, l, acc row] per row in `partial`, the items of a
    // job side by side for each split; then each item merges its splits in split order.
    let dvp = round_up(p.head_dim_v, 16);
    let row_len = dvp + 2;
    let part_len = round_up(plan.block_rows, super::microkernel::R) * row_len;
    let total = plan
        .items
        .len()
        .checked_mul(plan.splits)
        .and_then(|n| n.checked_mul(part_len))
        .ok_or_else(|| crate::Error::invalid("problem too large to split"))?;
    let mut partial = workspace.take(total)?;
    for_each_chunk_mut(
        exec,
        &mut partial,
        g * part_len,
        new_scratch,
        |js, chunk, parts| {
            let scs = &mut js.scs;
            let (job, split) = (chunk / plan.splits, chunk % plan.splits);
            let ts = rows_of(job);
            let split = Some((split, plan.splits));
            run_with(isa, ForwardJob { p, ts, split, scs });
            for ((t, sc), part) in ts.iter().zip(scs.iter()).zip(parts.chunks_mut(part_len)) {
                for r in 0..t.nrows {
                    let dst = &mut part[r * row_len..][..row_len];
                    dst[0] = sc.m[r];
                    dst[1] = sc.l[r];
                    dst[2..].copy_from_slice(&sc.acc[r * dvp..][..dvp]);
                }
            }
        },
    );
    let parts = &partial;
    for_each(exec, plan.items.len(), new_scratch, |js, item| {
        let (t, sc, orow) = (plan.items[item], &mut js.scs[0], &mut js.orow);
        let at = |s: usize| ((item / g * plan.splits + s) * g + item % g) * part_len;
        for r in 0..t.nrows {
            let part = |s: usize| &parts[at(s) + r * row_len..][..row_len];
            // A split whose maximum is NaN makes the row NaN (f32::max alone would drop it).
            let m = (0..plan.splits)
                .map(|s| part(s)[0])
                .fold(f32::NEG_INFINITY, |a, x| {
                    if a.is_nan() || x.is_nan() {
                        f32::NAN
                    } else {
                        a.max(x)
                    }
                });
            let acc = &mut sc.acc[r * dvp..][..dvp];
            acc.fill(0.0);
            let mut l = 0.0;
            if m != f32::NEG_INFINITY {
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
    });
    workspace.give_back(partial);
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
