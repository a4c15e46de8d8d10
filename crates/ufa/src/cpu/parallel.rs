//! Where work items run: spread over the context's thread pool, or inline on the calling
//! thread for problems so small that handing them to the pool costs more than computing them.
//! Either way every item computes the same thing, so results do not depend on the choice.

use rayon::prelude::*;

/// Below this many multiply-adds (B·Hq·Sq·Skv·(D+Dv)), a call runs inline (a few microseconds
/// of work, comparable to waking the pool).
pub const INLINE_WORK: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exec {
    Pool,
    Inline,
}

/// `f(state, i)` for `i` in `0..n`, with one `init()` state per worker.
pub fn for_each<S>(
    exec: Exec,
    n: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize) + Sync + Send,
) {
    match exec {
        Exec::Pool => (0..n).into_par_iter().for_each_init(init, f),
        Exec::Inline => {
            let mut s = init();
            (0..n).for_each(|i| f(&mut s, i));
        }
    }
}

/// `f(state, i, chunk)` for the `i`-th `len`-element chunk of `data`.
pub fn for_each_chunk_mut<T: Send, S>(
    exec: Exec,
    data: &mut [T],
    len: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync + Send,
) {
    match exec {
        Exec::Pool => data
            .par_chunks_mut(len)
            .enumerate()
            .for_each_init(init, |s, (i, c)| f(s, i, c)),
        Exec::Inline => {
            let mut s = init();
            data.chunks_mut(len)
                .enumerate()
                .for_each(|(i, c)| f(&mut s, i, c));
        }
    }
}

/// `f(state, i, chunk)` for the `i`-th `len`-element chunk of `data`.
pub fn for_each_chunk<T: Sync, S>(
    exec: Exec,
    data: &[T],
    len: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize, &[T]) + Sync + Send,
) {
    match exec {
        Exec::Pool => data
            .par_chunks(len)
            .enumerate()
            .for_each_init(init, |s, (i, c)| f(s, i, c)),
        Exec::Inline => {
            let mut s = init();
            data.chunks(len)
                .enumerate()
                .for_each(|(i, c)| f(&mut s, i, c));
        }
    }
}
