//! Where work items run: spread over the context's thread pool, or inline on the calling
//! thread for problems so small that handing them to the pool costs more than computing them.
//! Either way every item computes the same thing, so results do not depend on the choice.

use rayon::prelude::*;
use std::sync::Mutex;

/// Below this many multiply-adds (B·Hq·Sq·Skv·(D+Dv)), a call runs inline (a few microseconds
/// of work, comparable to waking the pool).
pub const INLINE_WORK: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exec {
    Pool,
    Inline,
}

/// One state per worker thread of the current pool, made on the worker's first item. (Rayon's
/// `for_each_init` makes one per split of the work, often several per thread, and kernel
/// scratch is large: each fresh one costs page faults that rival a small item's work.)
struct PerWorker<S>(Vec<Mutex<Option<S>>>);

impl<S> PerWorker<S> {
    fn new() -> Self {
        PerWorker(
            (0..rayon::current_num_threads())
                .map(|_| Mutex::new(None))
                .collect(),
        )
    }

    /// `f` on this worker's state. The lock is never contended: one thread per slot.
    fn with<R>(&self, init: &impl Fn() -> S, f: impl FnOnce(&mut S) -> R) -> R {
        let slot = rayon::current_thread_index().unwrap_or(0) % self.0.len();
        let mut state = self.0[slot].lock().unwrap_or_else(|e| e.into_inner());
        f(state.get_or_insert_with(init))
    }
}

/// `f(state, i)` for `i` in `0..n`, with one `init()` state per worker.
pub fn for_each<S: Send>(
    exec: Exec,
    n: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize) + Sync + Send,
) {
    match exec {
        Exec::Pool => {
            let states = PerWorker::new();
            (0..n)
                .into_par_iter()
                .for_each(|i| states.with(&init, |s| f(s, i)))
        }
        Exec::Inline => {
            let mut s = init();
            (0..n).for_each(|i| f(&mut s, i));
        }
    }
}

/// `f(state, i, chunk)` for the `i`-th `len`-element chunk of `data`, with one `init()` state
/// per worker.
pub fn for_each_chunk_mut<T: Send, S: Send>(
    exec: Exec,
    data: &mut [T],
    len: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync + Send,
) {
    match exec {
        Exec::Pool => {
            let states = PerWorker::new();
            data.par_chunks_mut(len)
                .enumerate()
                .for_each(|(i, c)| states.with(&init, |s| f(s, i, c)))
        }
        Exec::Inline => {
            let mut s = init();
            data.chunks_mut(len)
                .enumerate()
                .for_each(|(i, c)| f(&mut s, i, c));
        }
    }
}

/// `f(state, i, slice)` for the `i`-th slice `data[bounds[i]..bounds[i + 1]]` (bounds from 0,
/// non-decreasing, the last at most `data.len()`), with one `init()` state per worker.
pub fn for_each_slice_mut<T: Send, S: Send>(
    exec: Exec,
    data: &mut [T],
    bounds: &[usize],
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync + Send,
) {
    debug_assert!(bounds.first().is_none_or(|&b| b == 0));
    let mut slices = Vec::with_capacity(bounds.len().saturating_sub(1));
    let mut rest = data;
    for w in bounds.windows(2) {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(w[1] - w[0]);
        slices.push(head);
        rest = tail;
    }
    match exec {
        Exec::Pool => {
            let states = PerWorker::new();
            slices
                .into_par_iter()
                .enumerate()
                .for_each(|(i, c)| states.with(&init, |s| f(s, i, c)))
        }
        Exec::Inline => {
            let mut s = init();
            slices
                .into_iter()
                .enumerate()
                .for_each(|(i, c)| f(&mut s, i, c));
        }
    }
}
