//! The CPU backend's thread pool, started on first use and joined when the backend is dropped.
//!
//! rayon lets a dropped pool's workers exit on their own. ufa joins them instead, so that
//! destroying a context releases its threads before the call returns: a program that creates
//! and destroys contexts in a loop does not accumulate exiting threads, and memory checkers
//! (valgrind, LeakSanitizer) see no worker memory still live at exit.

use crate::error::{Error, ErrorKind, Result};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Workers of every pool that have started and not yet finished: counted in the worker itself,
/// so that it reads 0 only once every dropped pool's workers have run to their end.
static LIVE_WORKERS: AtomicUsize = AtomicUsize::new(0);

/// How many CPU worker threads are running (for the tests of teardown).
#[cfg(feature = "testkit")]
pub fn live_workers() -> usize {
    LIVE_WORKERS.load(Ordering::SeqCst)
}

/// The pool and the threads behind it, with the process that started them.
struct Started {
    pid: u32,
    pool: Arc<rayon::ThreadPool>,
    workers: Vec<JoinHandle<()>>,
}

impl Started {
    /// A pool of `num_threads` workers for process `pid`.
    fn new(num_threads: usize, pid: u32) -> Result<Started> {
        let mut workers = Vec::with_capacity(num_threads);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(num_threads)
            .thread_name(|i| format!("ufa-cpu-{i}"))
            .start_handler(|_| {
                LIVE_WORKERS.fetch_add(1, Ordering::SeqCst);
            })
            .exit_handler(|_| {
                LIVE_WORKERS.fetch_sub(1, Ordering::SeqCst);
            })
            .spawn_handler(|thread| {
                let mut b = std::thread::Builder::new();
                if let Some(name) = thread.name() {
                    b = b.name(name.to_owned());
                }
                workers.push(b.spawn(|| thread.run())?);
                Ok(())
            })
            .build()
            .map_err(|e| Error::new(ErrorKind::Backend, format!("cannot start CPU threads: {e}")));
        match pool {
            Ok(pool) => Ok(Started {
                pid,
                pool: Arc::new(pool),
                workers,
            }),
            Err(e) => {
                // rayon has told the workers it did start to exit (a failed build terminates
                // its registry).
                join(workers);
                Err(e)
            }
        }
    }

    /// Stops the workers and waits for them (this process's pool only).
    fn shut_down(self) {
        let Started { pool, workers, .. } = self;
        // Dropping the last reference tells the workers to exit. Were the pool still shared
        // (it is not: every call's clone ends with the call), or were this one of its own
        // workers (a context dropped inside its own pool), joining would wait forever. (Asked
        // of the pool, not through `thread::current()`, which would leave a handle allocated
        // in a foreign thread's storage: a C program's main thread, at exit.)
        let inside = pool.current_thread_index().is_some();
        let is_last = match Arc::try_unwrap(pool) {
            Ok(pool) => {
                drop(pool);
                true
            }
            Err(_) => false,
        };
        if is_last && !inside {
            join(workers);
        }
    }
}

/// A lazily started pool of `num_threads` workers. It is restarted in a forked child, whose
/// copy of the parent's pool has no threads behind it.
///
/// The started pool is found through an atomic pointer, never a lock: a process that forks
/// while another of its threads is in [`WorkerPool::get`] would leave that lock held in the
/// child, where no thread releases it, and the child's first call would wait forever (as
/// the kept scratch's lock did: cpu/spare.rs).
pub(super) struct WorkerPool {
    num_threads: usize,
    /// Null before the first call; else a `Box<Started>` this pool owns, of this process or
    /// (in a forked child, until its first call) of the parent.
    started: AtomicPtr<Started>,
}

impl WorkerPool {
    pub(super) fn new(num_threads: usize) -> Self {
        WorkerPool {
            num_threads,
            started: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    pub(super) fn num_threads(&self) -> usize {
        self.num_threads
    }

    /// The pool, started on the first call in this process.
    pub(super) fn get(&self) -> Result<Arc<rayon::ThreadPool>> {
        let pid = std::process::id();
        loop {
            let current = self.started.load(Ordering::Acquire);
            // SAFETY: a non-null pointer is a Box<Started> of this pool, freed only by Drop
            // (which has the pool to itself); one replaced below is never freed.
            if let Some(started) = unsafe { current.as_ref() } {
                if started.pid == pid {
                    return Ok(started.pool.clone());
                }
            }
            let fresh = Box::into_raw(Box::new(Started::new(self.num_threads, pid)?));
            match self
                .started
                .compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire)
            {
                // `current` is null, or the parent's pool, inherited through fork(): its
                // threads do not exist here, and shutting it down would wait for them forever,
                // so it is left as it is.
                // SAFETY: `fresh` is now this pool's, as above.
                Ok(_) => return Ok(unsafe { &*fresh }.pool.clone()),
                Err(_) => {
                    // Another thread started this process's pool first: ours goes, theirs
                    // serves (the next turn of the loop finds it).
                    // SAFETY: `fresh` was never published.
                    unsafe { Box::from_raw(fresh) }.shut_down();
                }
            }
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        let ptr = std::mem::replace(self.started.get_mut(), std::ptr::null_mut());
        if ptr.is_null() {
            return;
        }
        // SAFETY: a Box<Started> of this pool (see `started`), which no other thread can reach.
        let started = unsafe { Box::from_raw(ptr) };
        if started.pid != std::process::id() {
            // The parent's, inherited through fork(): see `get`.
            std::mem::forget(started);
            return;
        }
        started.shut_down();
    }
}

fn join(workers: Vec<JoinHandle<()>>) {
    for w in workers {
        // A job's panic reaches the caller that ran it (rayon re-raises it in `install`), so
        // a worker's own end carries nothing left to report.
        let _ = w.join();
    }
}
