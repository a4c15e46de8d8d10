//! Kernel scratch kept between calls for the next ones of the same shape. A fresh scratch is
//! fresh pages, and their faults and zeroing were a fifth of a small call's time (a 16-row
//! fp32 forward) and 14% of a 256-key bf16 one's on the AMX path (2026-12-06, `perf`).
//!
//! Two lists a kind of scratch. A call run inline keeps its scratch in the calling thread's
//! own list: no lock, and no scratch crosses threads (many threads making small calls at once
//! share nothing, and valgrind's race detectors, which cannot see Rust's futex locks, see no
//! handoff). A call on the worker pool keeps its workers' scratch in the process's list: the
//! pool's per-worker states are dropped on the calling thread when the call ends (see
//! `parallel::PerWorker`), and the next call's workers take them on theirs.

use super::parallel::Exec;
use std::cell::RefCell;
use std::sync::{Mutex, OnceLock, TryLockError};
use std::thread::LocalKey;

/// Most bytes one spare may hold, and the most bytes a thread's list keeps; the process's
/// list keeps this much for each core the process may run on (a whole pool's call of up to
/// this much a worker).
const SPARE_BYTES: usize = 2 << 20;

/// Scratch a [`Spares`] list can keep: its shape tells which calls can take it.
pub(crate) trait Kept: Send + Sized + 'static {
    type Shape: PartialEq;
    fn shape(&self) -> &Self::Shape;
    fn bytes(&self) -> usize;
}

/// The kept scratch of one kind: the process's list and each thread's, oldest first.
pub(crate) struct Spares<T: 'static> {
    shared: Mutex<Vec<T>>,
    local: &'static LocalKey<RefCell<Vec<T>>>,
}

impl<T: Kept> Spares<T> {
    /// `local`: a `thread_local!` list of the kind, for the calls run inline.
    pub const fn new(local: &'static LocalKey<RefCell<Vec<T>>>) -> Self {
        Spares {
            shared: Mutex::new(Vec::new()),
            local,
        }
    }

    /// `f` on the list that calls run as `exec` use, and its budget; None where the process's
    /// list is busy.
    ///
    /// The process's list is only tried, never waited for: a child forked while another
    /// thread held it would wait forever (that thread does not exist in the child, and the
    /// lock stays held there), and a spare is only worth what a wait would cost. A call that
    /// finds the list busy makes its own scratch, or frees it.
    fn with_list<R>(&self, exec: Exec, f: impl FnOnce(&mut Vec<T>, usize) -> R) -> Option<R> {
        match exec {
            Exec::Inline => Some(
                self.local
                    .with(|list| f(&mut list.borrow_mut(), SPARE_BYTES)),
            ),
            Exec::Pool => {
                // A panic elsewhere while the lock was held leaves a list that is still whole.
                let mut list = match self.shared.try_lock() {
                    Ok(list) => list,
                    Err(TryLockError::Poisoned(e)) => e.into_inner(),
                    Err(TryLockError::WouldBlock) => return None,
                };
                Some(f(&mut list, SPARE_BYTES * cores()))
            }
        }
    }

    /// A kept scratch of `shape` (the latest kept) for a call run as `exec`, if there is one.
    /// Its buffers hold what its last call left in them.
    pub fn take(&self, shape: &T::Shape, exec: Exec) -> Option<T> {
        self.with_list(exec, |list, _| {
            let i = list.iter().rposition(|s| s.shape() == shape)?;
            Some(list.remove(i))
        })
        .flatten()
    }

    /// Keeps `scratch` of a call run as `exec`, if it is at most [`SPARE_BYTES`]; the oldest
    /// spares make room for it.
    pub fn keep(&self, scratch: T, exec: Exec) {
        let bytes = scratch.bytes();
        if bytes > SPARE_BYTES {
            return;
        }
        // The spares dropped to make room are freed after the list is let go (and `scratch`
        // itself where the list was busy).
        let mut scratch = Some(scratch);
        let dropped = self.with_list(exec, |list, budget| {
            let mut kept: usize = list.iter().map(T::bytes).sum();
            let mut dropped = Vec::new();
            while kept + bytes > budget && !list.is_empty() {
                let old = list.remove(0);
                kept -= old.bytes();
                dropped.push(old);
            }
            list.extend(scratch.take());
            dropped
        });
        drop((dropped, scratch));
    }

    /// A kept scratch of `shape`, else `make()`, kept again when the returned guard is dropped.
    pub fn lend(&'static self, shape: &T::Shape, exec: Exec, make: impl FnOnce() -> T) -> Lent<T> {
        Lent {
            item: Some(self.take(shape, exec).unwrap_or_else(make)),
            home: self,
            exec,
        }
    }
}

/// The cores this process may run on (once: it is a system call).
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A scratch lent by a [`Spares`] list, kept again when dropped.
pub(crate) struct Lent<T: Kept> {
    item: Option<T>,
    home: &'static Spares<T>,
    exec: Exec,
}

impl<T: Kept> std::ops::Deref for Lent<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.item.as_ref().expect("lent until dropped")
    }
}

impl<T: Kept> std::ops::DerefMut for Lent<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.item.as_mut().expect("lent until dropped")
    }
}

impl<T: Kept> Drop for Lent<T> {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            self.home.keep(item, self.exec);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Buf(u32, usize);

    impl Kept for Buf {
        type Shape = u32;
        fn shape(&self) -> &u32 {
            &self.0
        }
        fn bytes(&self) -> usize {
            self.1
        }
    }

    thread_local! {
        static LOCAL: RefCell<Vec<Buf>> = const { RefCell::new(Vec::new()) };
    }
    static SPARES: Spares<Buf> = Spares::new(&LOCAL);

    #[test]
    fn takes_the_shape_asked_for_and_makes_room_oldest_first() {
        // A thread's own list: SPARE_BYTES in all.
        let mb = SPARE_BYTES / 8;
        for (shape, bytes) in [(1, mb), (2, 2 * mb), (1, 3 * mb)] {
            SPARES.keep(Buf(shape, bytes), Exec::Inline);
        }
        // The latest of shape 1 first; nothing of shape 1 in the process's list.
        assert!(SPARES.take(&1, Exec::Pool).is_none());
        assert_eq!(SPARES.take(&1, Exec::Inline).map(|b| b.1), Some(3 * mb));
        assert!(SPARES.take(&3, Exec::Inline).is_none());
        // 1 + 2 kept: 6 more needs the oldest (1) out, and no more.
        SPARES.keep(Buf(3, 6 * mb), Exec::Inline);
        assert!(SPARES.take(&1, Exec::Inline).is_none());
        assert_eq!(SPARES.take(&2, Exec::Inline).map(|b| b.1), Some(2 * mb));
        assert_eq!(SPARES.take(&3, Exec::Inline).map(|b| b.1), Some(6 * mb));
        // Larger than a spare may be: not kept.
        SPARES.keep(Buf(4, SPARE_BYTES + 1), Exec::Inline);
        assert!(SPARES.take(&4, Exec::Inline).is_none());
    }

    #[test]
    fn a_lent_scratch_comes_back_to_its_list_when_dropped() {
        let mut made = 0;
        for exec in [Exec::Pool, Exec::Pool, Exec::Inline] {
            let lent = SPARES.lend(&7, exec, || {
                made += 1;
                Buf(7, 100)
            });
            assert_eq!(lent.1, 100);
        }
        // The pool's second call took the first one's; the inline call made its own.
        assert_eq!(made, 2);
        // Kept by another thread's pool call, taken here.
        std::thread::spawn(|| SPARES.keep(Buf(8, 1), Exec::Pool))
            .join()
            .unwrap();
        assert!(SPARES.take(&8, Exec::Pool).is_some());
    }
}
