//! The CUDA backward pass: which kernels run a problem, their parameter block and workspace.
//!
//! Every call runs the row preprocessing (D = rowsum(dO ∘ O), the LSE in log2), then either the
//! tensor-core kernel (dK/dV per key block, dQ into an fp32 buffer) and the dQ conversion, or
//! the two CUDA-core row kernels. The workspace is allocated on the caller's stream and freed on
//! it after the last kernel, so nothing waits.

use super::abi::{BwdParams, DqOrder, FwdParams, SEQLEN_Q_PAD};
use super::params::{bsh, dtype_kind};
use super::tiles::{bwd_tile_for, mma_tile_head_dim_pair};
use super::variants::{
    grid, has_sequence_metadata, operands_aligned16, query_and_key_dims, rounds_to_tf32, RowKernel,
    Variant,
};
use super::{sm90, tma};
use crate::dtype::DType;
use crate::error::Result;
use crate::problem::BackwardProblem;
use std::ffi::c_void;

/// How one backward call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// The tensor-core kernel with this variant, then the dQ conversion.
    Mma(Variant),
    /// The CUDA-core row kernels.
    Rows,
}

impl Plan {
    /// The tensor-core kernel takes inputs with gradients in the same dtype and rows that start
    /// on 16-byte boundaries (the out and dq tensors are read and written by the row kernels,
    /// so they may be anything); fp32 runs on TF32 tensor cores in the forward's precision
    /// (`Fp32Precision`). The mma.sync kernel runs the tile of the larger head dim with the
    /// other operands zero-padded (head dims between its tiles, and head_dim_v ≠ head_dim as
    /// MLA's 192/128), each a multiple of 8 (dQ's buffer is added to in 8-column tiles).
    /// `hopper`: the device runs sm_90a code (the wgmma kernel for 16-bit inputs, on its tile
    /// of 64, 128 or 256 columns that holds both head dims, `sm90::bwd_tile_head_dim`).
    pub fn select(p: &BackwardProblem, max_smem: u32, hopper: bool) -> Plan {
        Self::select_with(p, max_smem, hopper, sm90::off_tile_enabled())
    }

    /// [`Plan::select`] with head dims off the wgmma tiles taken by the wgmma kernel or not
    /// (`off_tile`, [`sm90::off_tile_enabled`]).
    fn select_with(p: &BackwardProblem, max_smem: u32, hopper: bool, off_tile: bool) -> Plan {
        let f = &p.fwd;
        let dtype = f.q.dtype;
        let half = matches!(dtype, DType::F16 | DType::BF16);
        let same = [f.k.dtype, f.v.dtype, p.dout.dtype, p.dk.dtype, p.dv.dtype]
            .iter()
            .all(|&d| d == dtype);
        let (q, kv) = query_and_key_dims(f);
        let aligned = operands_aligned16(&[
            (&f.q, q),
            (&f.k, kv),
            (&f.v, kv),
            (&p.dout, q),
            (&p.dk, kv),
            (&p.dv, kv),
        ]);
        let tensor_cores = same && aligned;
        // Unlike the forward's (needs_score_mod), any scale: the backward subtracts the LSE.
        let score_mod = f.modifies_scores();
        // The Hopper kernel's tensor maps cover dense batches; a packed one takes the sm_80
        // kernel (which runs on Hopper too).
        let dense = !has_sequence_metadata(f);
        let dropout = f.dropout.is_some();
        if tensor_cores && half && dense && hopper && sm90::wgmma_enabled() {
            if let Some(tile) = sm90::bwd_tile_head_dim(f.head_dim, f.head_dim_v, off_tile)
                .filter(|_| tma::backward_maps_possible(p))
                .and_then(|d| sm90::bwd_tile_for(d, max_smem, p.deterministic, f.has_band()))
            {
                return Plan::Mma(Variant::BwdSm90 {
                    dtype,
                    tile,
                    score_mod,
                    dropout,
                });
            }
        }
        let bytes = dtype.size_in_bytes();
        let eights = f.head_dim.is_multiple_of(8) && f.head_dim_v.is_multiple_of(8);
        let tile = mma_tile_head_dim_pair(f.head_dim, f.head_dim_v, bytes)
            .filter(|_| tensor_cores && eights)
            .and_then(|d| bwd_tile_for(d, bytes as u32, max_smem));
        match tile {
            Some(tile) => Plan::Mma(Variant::BwdSm80 {
                dtype,
                tile,
                score_mod,
                seqs: !dense,
                tf32: rounds_to_tf32(f),
                dropout,
            }),
            None => Plan::Rows,
        }
    }

    /// Query rows a step of the tensor-core kernel.
    fn block_m(&self) -> Option<u32> {
        match self {
            Plan::Mma(Variant::BwdSm80 { tile, .. }) => Some(tile.block_m),
            Plan::Mma(Variant::BwdSm90 { tile, .. }) => Some(tile.block_m),
            _ => None,
        }
    }

    /// Keys a block of the tensor-core kernel, and how many such blocks an SM holds.
    fn key_blocks(&self) -> Option<(u32, u32)> {
        match self {
            Plan::Mma(Variant::BwdSm80 { tile, .. }) => Some((tile.block_n, tile.min_blocks)),
            Plan::Mma(Variant::BwdSm90 { tile, .. }) => Some((tile.block_n, tile.min_blocks)),
            _ => None,
        }
    }

    /// Query blocks of the tensor-core kernel (0 for the row kernels).
    fn num_m_blocks(&self, p: &BackwardProblem) -> usize {
        self.block_m()
            .map_or(0, |m| p.fwd.seqlen_q.div_ceil(m as usize))
    }

    /// Workspace layout in bytes: LSE2, D, then (tensor cores) the fp32 dQ buffer and (also
    /// deterministic) the turn counters; each part 256-byte aligned. A dense batch's LSE2/D
    /// rows are (batch, head) planes of `seqlen_q` padded; a packed batch's are one plane a
    /// head, each sequence `SEQLEN_Q_PAD + 4` rows longer than itself (kernels/bwd_keys.cuh,
    /// stat_row0). dQ rows are the packed rows of q, or (batch, head) planes.
    pub fn workspace(&self, p: &BackwardProblem) -> Workspace {
        let f = &p.fwd;
        let layout = StatLayout::of(p);
        let stat = (layout.floats * 4).next_multiple_of(256);
        let (accum, order) = match self {
            Plan::Mma(_) => (
                (f.heads_q * layout.q_rows * f.head_dim * 4).next_multiple_of(256),
                if p.deterministic {
                    (f.batch * f.heads_q * self.num_m_blocks(p) * 4).next_multiple_of(256)
                } else {
                    0
                },
            ),
            Plan::Rows => (0, 0),
        };
        Workspace {
            delta: stat,
            accum: 2 * stat,
            order: 2 * stat + accum,
            bytes: 2 * stat + accum + order,
            has_accum: accum > 0,
            has_order: order > 0,
        }
    }
}

/// Rows of the LSE2/D workspace and of the dQ buffer.
struct StatLayout {
    /// Floats of LSE2 (and of D).
    floats: usize,
    /// Rows of each head's dQ plane: q's packed rows, or batch × seqlen_q.
    q_rows: usize,
    /// Batch and head strides of LSE2/D, and of dQ (floats).
    stat_stride: [i64; 2],
    accum_stride: [i64; 2],
    /// A dense batch's rows of each (batch, head) plane.
    seqlen_q_pad: usize,
}

impl StatLayout {
    fn of(p: &BackwardProblem) -> StatLayout {
        let f = &p.fwd;
        let (hq, d) = (f.heads_q, f.head_dim);
        let pad = f.seqlen_q.div_ceil(SEQLEN_Q_PAD) * SEQLEN_Q_PAD;
        match f.q.rows {
            crate::sequences::RowMap::Packed { rows, .. } => {
                // Each sequence's rows start 16-byte aligned and end SEQLEN_Q_PAD + 4 rows
                // later than they would packed tight.
                let plane = (rows + (SEQLEN_Q_PAD + 4) * (f.batch + 1)).next_multiple_of(4);
                StatLayout {
                    floats: hq * plane,
                    q_rows: rows,
                    stat_stride: [0, plane as i64],
                    accum_stride: [0, (rows * d) as i64],
                    seqlen_q_pad: pad,
                }
            }
            _ => StatLayout {
                floats: f.batch * hq * pad,
                q_rows: f.batch * f.seqlen_q,
                stat_stride: [(hq * pad) as i64, pad as i64],
                accum_stride: [(hq * f.seqlen_q * d) as i64, (f.seqlen_q * d) as i64],
                seqlen_q_pad: pad,
            },
        }
    }
}

impl DqOrder {
    /// The order for `p` run by `plan` on a device of `multiprocessors` SMs.
    pub fn of(p: &BackwardProblem, plan: &Plan, multiprocessors: u32) -> DqOrder {
        if !p.deterministic {
            return DqOrder::Any;
        }
        if !p.fwd.seqs.is_uniform() {
            // Rotated walks need every key block to see every query block of its sequence,
            // which a packed batch's sequences of other lengths do not promise.
            return DqOrder::Turns;
        }
        let Some((block_n, per_sm)) = plan.key_blocks() else {
            return DqOrder::Turns;
        };
        let key_blocks = p.fwd.seqlen_kv.div_ceil(block_n as usize);
        // Every key block sees every query row: row 0 sees the last block's first key and the
        // last row the first block's last key (the kernels' key_block, kernels/bwd_keys.cuh).
        let seq = p.fwd.seq(0);
        let last_n0 = (key_blocks - 1) * block_n as usize;
        let first_end = (block_n as usize).min(p.fwd.seqlen_kv) - 1;
        let full_band = p.fwd.rows_seeing_keys(&seq, last_n0, last_n0).0 == 0
            && p.fwd.rows_seeing_keys(&seq, first_end, first_end).1 == p.fwd.seqlen_q;
        // Half the device, so that other work on it cannot leave a head's blocks waiting for
        // one that finds no room.
        let resident = multiprocessors as i64 * per_sm as i64;
        if full_band && 2 * key_blocks as i64 <= resident {
            DqOrder::RotatedTurns
        } else {
            DqOrder::Turns
        }
    }
}

/// Offsets of the workspace's parts (LSE2 at 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Workspace {
    pub delta: usize,
    pub accum: usize,
    pub order: usize,
    pub bytes: usize,
    pub has_accum: bool,
    pub has_order: bool,
}

impl BwdParams {
    /// The parameter block for `p` run by `plan` on a device of `multiprocessors` SMs, with
    /// the workspace at device address `ws`.
    pub fn new(
        p: &BackwardProblem,
        plan: &Plan,
        ws: u64,
        multiprocessors: u32,
    ) -> Result<BwdParams> {
        let f = &p.fwd;
        let block_m = plan.block_m();
        let layout = plan.workspace(p);
        let stats = StatLayout::of(p);
        let at = |offset: usize| (ws + offset as u64) as *mut f32;
        let fwd = FwdParams::new(f, block_m.unwrap_or(1))?;
        Ok(BwdParams {
            f: fwd,
            dout: p.dout.ptr as *const c_void,
            dq: p.dq.ptr as *mut c_void,
            dk: p.dk.ptr as *mut c_void,
            dv: p.dv.ptr as *mut c_void,
            lse2: at(0),
            delta: at(layout.delta),
            dq_accum: if layout.has_accum {
                at(layout.accum)
            } else {
                std::ptr::null_mut()
            },
            order: if layout.has_order {
                at(layout.order) as *mut i32
            } else {
                std::ptr::null_mut()
            },
            do_stride: bsh(p.dout.strides),
            dq_stride: bsh(p.dq.strides),
            dk_stride: bsh(p.dk.strides),
            dv_stride: bsh(p.dv.strides),
            stat_stride: stats.stat_stride,
            accum_stride: stats.accum_stride,
            seqlen_q_pad: stats.seqlen_q_pad as i32,
            block_m: block_m.unwrap_or(1) as i32,
            num_m_blocks: plan.num_m_blocks(p) as i32,
            deterministic: DqOrder::of(p, plan, multiprocessors) as i32,
            dtype_out: dtype_kind(f.out.dtype),
            dtype_dout: dtype_kind(p.dout.dtype),
            dtype_dq: dtype_kind(p.dq.dtype),
            dtype_dk: dtype_kind(p.dk.dtype),
            dtype_dv: dtype_kind(p.dv.dtype),
            dtype_in: dtype_kind(f.q.dtype),
        })
    }
}

/// One kernel launch of a backward call: the variant and its grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Launch {
    pub variant: Variant,
    pub grid: (u32, u32, u32),
}

/// The launches of `plan` for `p`, in order. Grids cover a dense batch's sequences, or the
/// longest of a packed batch (its blocks past their own sequence's end return at once).
pub(crate) fn launches(p: &BackwardProblem, plan: &Plan) -> Result<Vec<Launch>> {
    let f = &p.fwd;
    let rows = |k: RowKernel, n: usize, heads: usize| -> Result<Launch> {
        Ok(Launch {
            variant: Variant::BwdRows(k),
            grid: grid(n, k.rows_per_block(), heads, f.batch)?,
        })
    };
    let padded = f.seqlen_q.div_ceil(SEQLEN_Q_PAD) * SEQLEN_Q_PAD;
    let mut v = vec![rows(RowKernel::Preprocess, padded, f.heads_q)?];
    match plan {
        Plan::Mma(variant) => {
            // A wide head dim's key blocks come in two, each half of the columns (grid rows
            // heads_kv apart, the second half's launched after the first's).
            let halves = match variant {
                Variant::BwdSm80 { tile, .. } => tile.column_halves() as usize,
                _ => 1,
            };
            v.push(Launch {
                variant: *variant,
                grid: grid(
                    f.seqlen_kv,
                    variant.rows_per_block(),
                    f.heads_kv * halves,
                    f.batch,
                )?,
            });
            v.push(rows(RowKernel::ConvertDq, f.seqlen_q, f.heads_q)?);
        }
        Plan::Rows => {
            v.push(rows(RowKernel::Dq, f.seqlen_q, f.heads_q)?);
            v.push(rows(RowKernel::DkDv, f.seqlen_kv, f.heads_kv)?);
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::tiles::BwdTile;
    use crate::grads::{BackwardInputs, Gradients};
    use crate::problem::{validate_backward, BackwardArgs};
    use crate::{AttentionParams, TensorView, TensorViewMut};
    use half::bf16;

    /// Runs `f` on the validated backward problem of tensors [b, s, h, d] of element `I`
    /// (host memory: only sizes, dtypes and strides matter to the plan), with `T` the dtype of
    /// dq/dk/dv.
    fn with_problem<
        I: crate::dtype::Element + Default + Copy,
        T: crate::dtype::Element + Default + Copy,
    >(
        (b, sq, skv, hq, hk, d): (usize, usize, usize, usize, usize, usize),
        params: &AttentionParams<'_>,
        f: impl FnOnce(&BackwardProblem),
    ) {
        let qn = vec![I::default(); b * sq * hq * d];
        let kn = vec![I::default(); b * skv * hk * d];
        let lse = vec![0f32; b * hq * sq];
        let (mut dq, mut dk, mut dv) = (
            vec![T::default(); qn.len()],
            vec![T::default(); kn.len()],
            vec![T::default(); kn.len()],
        );
        let q = TensorView::new(&qn, &[b, sq, hq, d]).unwrap();
        let k = TensorView::new(&kn, &[b, skv, hk, d]).unwrap();
        let lse = TensorView::new(&lse, &[b, hq, sq]).unwrap();
        let inputs = BackwardInputs {
            q,
            k,
            v: k,
            out: q,
            dout: q,
            lse,
        };
        let grads = Gradients {
            dq: TensorViewMut::new(&mut dq, &[b, sq, hq, d]).unwrap(),
            dk: TensorViewMut::new(&mut dk, &[b, skv, hk, d]).unwrap(),
            dv: TensorViewMut::new(&mut dv, &[b, skv, hk, d]).unwrap(),
        };
        f(&validate_backward(&BackwardArgs::new(&inputs, &grads), params).unwrap());
    }

    #[test]
    fn hopper_takes_the_wgmma_kernel_on_its_tile_that_holds_the_head_dim() {
        let params = AttentionParams::default();
        for (d, tile_d) in [
            (64, Some(64)),
            (128, Some(128)),
            (256, Some(256)),
            (96, Some(128)),
            (40, Some(64)),
            (160, Some(256)),
            (32, None),
        ] {
            with_problem::<bf16, bf16>((1, 200, 300, 4, 2, d), &params, |p| {
                // Without off-tile dims only the exact tile dims take it.
                let exact = matches!(
                    Plan::select_with(p, 232_448, true, false),
                    Plan::Mma(Variant::BwdSm90 { .. })
                );
                assert_eq!(exact, [64, 128, 256].contains(&d), "d{d}");
                let plan = Plan::select_with(p, 232_448, true, true);
                let l = launches(p, &plan).unwrap();
                match (plan, tile_d) {
                    (Plan::Mma(Variant::BwdSm90 { tile, .. }), Some(tile_d)) => {
                        assert_eq!(tile.head_dim as usize, tile_d, "d{d}");
                        assert_eq!(l[1].grid, (300u32.div_ceil(tile.block_n), 2, 1));
                        let params = BwdParams::new(p, &plan, 0, 132).unwrap();
                        assert_eq!(params.block_m as u32, tile.block_m);
                        assert_eq!(params.f.num_m_blocks as u32, 200u32.div_ceil(tile.block_m));
                    }
                    (Plan::Mma(Variant::BwdSm80 { .. }), None) => {}
                    (other, _) => panic!("d{d}: {other:?}"),
                }
            });
        }
    }

    #[test]
    fn wide_head_dims_take_two_key_blocks_a_key_range() {
        let params = AttentionParams::default();
        for (d, hopper) in [(512, true), (320, false), (264, true)] {
            with_problem::<bf16, bf16>((2, 300, 1000, 8, 2, d), &params, |p| {
                let plan = Plan::select_with(p, 232_448, hopper, true);
                let Plan::Mma(Variant::BwdSm80 { tile, .. }) = plan else {
                    panic!("bf16 d{d} takes the wide mma.sync backward: {plan:?}");
                };
                assert!(tile.head_dim > 256 && tile.is_valid(), "{tile:?}");
                // Grid rows: the KV heads' first halves of the columns, then their second.
                let l = launches(p, &plan).unwrap();
                assert_eq!(l[1].grid, (1000u32.div_ceil(tile.block_n), 2 * 2, 2));
            });
        }
        // fp32 above 256 keeps the CUDA-core row kernels.
        with_problem::<f32, f32>((1, 30, 40, 2, 2, 512), &params, |p| {
            assert!(matches!(Plan::select(p, 232_448, true), Plan::Rows));
        });
    }

    #[test]
    fn launch_geometry_covers_every_row_once() {
        let params = AttentionParams::default();
        with_problem::<bf16, bf16>((2, 300, 1000, 8, 2, 128), &params, |p| {
            let plan = Plan::select(p, 232_448, false);
            let Plan::Mma(Variant::BwdSm80 { tile, .. }) = plan else {
                panic!("bf16 d128 takes the tensor-core kernel: {plan:?}");
            };
            let l = launches(p, &plan).unwrap();
            let names: Vec<_> = l.iter().map(|l| l.variant.kernel_name()).collect();
            assert!(names[0].ends_with("bwd_preprocess") && names[2].ends_with("convert_dq"));
            // Preprocessing covers the padded LSE rows, 16 rows a block, per query head.
            assert_eq!(l[0].grid, (384 / 16, 8, 2));
            // One block per key block and KV head (the GQA group is looped inside).
            assert_eq!(l[1].grid, (1000u32.div_ceil(tile.block_n), 2, 2));
            assert_eq!(l[2].grid, (300u32.div_ceil(16), 8, 2));
            let ws = plan.workspace(p);
            assert!(ws.has_accum && !ws.has_order);
            assert!(
                ws.accum >= 2 * 2 * 8 * 384 * 4 && ws.bytes >= ws.accum + 2 * 300 * 8 * 128 * 4
            );
        });
        // Deterministic mode adds the turn counters, one per query block and head.
        let det = AttentionParams::default().deterministic(true);
        with_problem::<bf16, bf16>((1, 70, 33, 4, 4, 64), &det, |p| {
            let plan = Plan::select(p, 232_448, false);
            let ws = plan.workspace(p);
            assert!(ws.has_order && ws.bytes - ws.order >= 4 * 2 * 4);
            assert_eq!(launches(p, &plan).unwrap().len(), 3);
        });
    }

    #[test]
    fn deterministic_walks_rotate_only_where_every_key_block_sees_every_query() {
        let order = |dims, params: &AttentionParams<'_>, sms| {
            let mut o = None;
            with_problem::<bf16, bf16>(dims, params, |p| {
                let plan = Plan::select(p, 232_448, true);
                o = Some(DqOrder::of(p, &plan, sms));
            });
            o.unwrap()
        };
        let det = AttentionParams::default().deterministic(true);
        let fast = AttentionParams::default();
        assert_eq!(order((2, 1024, 1000, 8, 2, 64), &fast, 132), DqOrder::Any);
        assert_eq!(
            order((2, 1024, 1000, 8, 2, 64), &det, 132),
            DqOrder::RotatedTurns
        );
        assert_eq!(
            order((1, 300, 2000, 2, 2, 256), &det, 132),
            DqOrder::RotatedTurns
        );
        // A causal or window band gives key blocks different query blocks.
        let causal = det.causal(true);
        assert_eq!(
            order((2, 1024, 1024, 8, 2, 128), &causal, 132),
            DqOrder::Turns
        );
        let window = det.window(2000, 0);
        assert_eq!(
            order((1, 1024, 1024, 2, 2, 128), &window, 132),
            DqOrder::Turns
        );
        let wide = det.window(4096, 4096);
        assert_eq!(
            order((1, 1024, 1024, 2, 2, 128), &wide, 132),
            DqOrder::RotatedTurns
        );
        // 256 key blocks of 64 keys at d256 need more than half of 132 SMs.
        assert_eq!(order((1, 64, 16384, 1, 1, 256), &det, 132), DqOrder::Turns);
        assert_eq!(
            order((1, 64, 16384, 1, 1, 256), &det, 512),
            DqOrder::RotatedTurns
        );
    }

    /// The rotated turn order of `dq_turn` (kernels/mma.cuh, mirrored here): every item's turns
    /// are a permutation of the key blocks, and blocks that each take their steps in order, an
    /// item only in its turn, all finish (no cycle of waits), for walks shorter and longer than
    /// the number of blocks.
    #[test]
    fn rotated_turns_order_every_item_and_never_deadlock() {
        for (n, total) in [
            (1, 5),
            (2, 4),
            (3, 7),
            (8, 16),
            (16, 16),
            (5, 3),
            (12, 1),
            (16, 33),
        ] {
            let first = |r: usize| r * total / n;
            let turn = |r: usize, item: usize| ((item + 1) * n - 1) / total + n - r;
            let turn = |r, item| turn(r, item) % n;
            for item in 0..total {
                let mut turns: Vec<_> = (0..n).map(|r| turn(r, item)).collect();
                turns.sort();
                assert_eq!(
                    turns,
                    (0..n).collect::<Vec<_>>(),
                    "n {n} total {total} item {item}"
                );
            }
            let mut step = vec![0; n];
            let mut counter = vec![0; total];
            while step.iter().any(|&t| t < total) {
                let mut moved = false;
                for (r, step) in step.iter_mut().enumerate() {
                    if *step < total {
                        let item = (first(r) + *step) % total;
                        if counter[item] == turn(r, item) {
                            counter[item] += 1;
                            *step += 1;
                            moved = true;
                        }
                    }
                }
                assert!(moved, "n {n} total {total}: deadlock at steps {step:?}");
            }
            assert!(counter.iter().all(|&c| c == n));
        }
    }

    #[test]
    fn plans_fall_back_to_the_row_kernels() {
        let params = AttentionParams::default();
        // f32 gradients of bf16 inputs, and a head dim off the tensor-core list.
        with_problem::<bf16, f32>((1, 10, 10, 2, 2, 64), &params, |p| {
            assert_eq!(Plan::select(p, 232_448, false), Plan::Rows);
            let l = launches(p, &Plan::Rows).unwrap();
            assert_eq!(l.len(), 3);
            assert_eq!(
                l[2].grid,
                (3, 2, 1),
                "dK/dV: one warp per key row, 4 a block"
            );
            assert!(!Plan::Rows.workspace(p).has_accum);
        });
        // A head dim that is no multiple of 8 (dQ's buffer takes 8-column tiles).
        with_problem::<bf16, bf16>((1, 10, 10, 2, 2, 36), &params, |p| {
            assert_eq!(Plan::select(p, 232_448, false), Plan::Rows);
        });
        // Too little shared memory for any tile.
        with_problem::<bf16, bf16>((1, 10, 10, 2, 2, 256), &params, |p| {
            assert_eq!(Plan::select(p, 48 * 1024, false), Plan::Rows);
        });
    }

    #[test]
    fn tile_override_parses_seven_numbers() {
        let t = crate::cuda::tiles::parse_bwd_tile("64,128,8,2,4,4,2").unwrap();
        assert_eq!((t.block_m, t.block_n, t.warps, t.stages), (64, 128, 8, 2));
        assert_eq!(t.grid_rows, [4, 4, 2]);
        assert!(crate::cuda::tiles::parse_bwd_tile("64,128,8").is_none());
        let bad = BwdTile {
            head_dim: 128,
            grid_rows: [3, 4, 2],
            ..t
        };
        assert!(!bad.is_valid(), "3 warp rows do not divide 8 warps");
    }

    #[test]
    fn backward_tiles_fit_and_satisfy_the_template() {
        for d in crate::cuda::tiles::MMA_HEAD_DIMS {
            for bytes in [2, 4] {
                for smem in [101_376, 166_912, 232_448] {
                    if let Some(t) = bwd_tile_for(d, bytes, smem) {
                        assert!(t.smem_bytes() <= smem, "{t:?} in {smem}");
                        assert!(t.is_valid(), "{t:?}");
                        assert_eq!(t.elem_bytes, bytes);
                    }
                }
            }
            // An H100 runs every head dim with two stages in 16 bits, and on tensor cores in
            // fp32.
            let t = bwd_tile_for(d, 2, 232_448).unwrap();
            assert_eq!(t.stages, 2, "{t:?}");
            assert!(bwd_tile_for(d, 4, 232_448).is_some(), "fp32 d{d}");
        }
        assert!(bwd_tile_for(80, 2, 232_448).is_none());
        // sm_86/89 (99 KB a block) still run head dims up to 128 on tensor cores.
        for d in [32, 64, 96, 128] {
            assert!(bwd_tile_for(d, 2, 101_376).is_some(), "d{d}");
        }
        // fp32 rows take twice the bytes: 64 keys × 64 queries of 4 bytes at head_dim 128.
        let t = bwd_tile_for(128, 4, 232_448).unwrap();
        assert_eq!((t.block_n, t.block_m, t.stages), (64, 64, 1));
        assert_eq!(
            t.smem_bytes(),
            2 * 64 * 528 + 2 * 64 * 528 + 2 * 64 * 272 + 2 * 64 * 4
        );
    }

    /// Head dims between the tiles, and head_dim_v ≠ head_dim, run on the mma.sync tile of the
    /// larger one; on Hopper on the wgmma tile that holds both (up to 32: mma.sync's d32).
    #[test]
    fn padded_and_unequal_head_dims_take_the_larger_mma_tile() {
        let params = AttentionParams::default();
        with_problem::<bf16, bf16>((1, 10, 10, 2, 2, 80), &params, |p| {
            match Plan::select(p, 232_448, false) {
                Plan::Mma(Variant::BwdSm80 { tile, .. }) => assert_eq!(tile.head_dim, 96),
                other => panic!("{other:?}"),
            }
        });
        for (d, dv, tile_d, hopper_d) in [
            (192, 128, 192, Some(256)),
            (64, 128, 128, Some(128)),
            (40, 24, 64, Some(64)),
            (24, 16, 32, None),
        ] {
            let (q, k, v) = (
                vec![bf16::ZERO; 40 * 2 * d],
                vec![bf16::ZERO; 50 * 2 * d],
                vec![bf16::ZERO; 50 * 2 * dv],
            );
            let (mut dq, mut dk, mut dv_g) = (q.clone(), k.clone(), v.clone());
            let out = vec![bf16::ZERO; 40 * 2 * dv];
            let lse = vec![0f32; 2 * 40];
            let inputs = BackwardInputs {
                q: TensorView::new(&q, &[1, 40, 2, d]).unwrap(),
                k: TensorView::new(&k, &[1, 50, 2, d]).unwrap(),
                v: TensorView::new(&v, &[1, 50, 2, dv]).unwrap(),
                out: TensorView::new(&out, &[1, 40, 2, dv]).unwrap(),
                dout: TensorView::new(&out, &[1, 40, 2, dv]).unwrap(),
                lse: TensorView::new(&lse, &[1, 2, 40]).unwrap(),
            };
            let grads = Gradients {
                dq: TensorViewMut::new(&mut dq, &[1, 40, 2, d]).unwrap(),
                dk: TensorViewMut::new(&mut dk, &[1, 50, 2, d]).unwrap(),
                dv: TensorViewMut::new(&mut dv_g, &[1, 50, 2, dv]).unwrap(),
            };
            let p = validate_backward(&BackwardArgs::new(&inputs, &grads), &params).unwrap();
            match Plan::select(&p, 232_448, false) {
                Plan::Mma(Variant::BwdSm80 { tile, .. }) => {
                    assert_eq!(tile.head_dim, tile_d, "{d}/{dv}")
                }
                other => panic!("{d}/{dv}: {other:?}"),
            }
            match (Plan::select_with(&p, 232_448, true, true), hopper_d) {
                (Plan::Mma(Variant::BwdSm90 { tile, .. }), Some(t)) => {
                    assert_eq!(tile.head_dim, t, "{d}/{dv}")
                }
                (Plan::Mma(Variant::BwdSm80 { tile, .. }), None) => {
                    assert_eq!(tile.head_dim, tile_d, "{d}/{dv}")
                }
                (other, _) => panic!("{d}/{dv} on Hopper: {other:?}"),
            }
        }
    }

    #[test]
    fn fp32_takes_the_tensor_core_kernel_in_the_forward_precision() {
        use crate::params::Fp32Precision;
        for (precision, tf32_wanted) in [(Fp32Precision::Ieee, false), (Fp32Precision::Tf32, true)]
        {
            let params = AttentionParams::default().fp32_precision(precision);
            with_problem::<f32, f32>((1, 200, 300, 4, 2, 128), &params, |p| {
                // Hopper too: the wgmma backward takes 16-bit inputs only.
                match Plan::select(p, 232_448, true) {
                    Plan::Mma(Variant::BwdSm80 { dtype, tf32, .. }) => {
                        assert_eq!((dtype, tf32), (DType::F32, tf32_wanted));
                    }
                    other => panic!("{other:?}"),
                }
            });
        }
    }
}
