//! The CPU backend's thread pool, started on first use and joined when the backend is dropped.
//!
//! rayon lets a dropped pool's workers exit on their own. ufa joins them instead, so that
//! destroying a context releases its threads before the call returns: a program that creates
//! and destroys contexts in a loop does not accumulate exiting threads, and memory checkers
//! (valgrind, LeakSanitizer) see no worker memory still live at exit.

use crate::error::{Error, ErrorKind, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
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

/// A lazily started pool of `num_threads` workers. It is restarted in a forked child, whose
/// copy of the parent's pool has no threads behind it.
pub(super) struct WorkerPool {
    num_threads: usize,
    started: Mutex<Option<Started>>,
}

impl WorkerPool {
    pub(super) fn new(num_threads: usize) -> Self {
        WorkerPool {
            num_threads,
            started: Mutex::new(None),
        }
    }

    pub(super) fn num_threads(&self) -> usize {
        self.num_threads
    }

    /// The pool, started on the first call in this process.
    pub(super) fn get(&self) -> Result<Arc<rayon::ThreadPool>> {
        let pid = std::process::id();
        let mut guard = self.started.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(started) = guard.as_ref() {
            if started.pid == pid {
                return Ok(started.pool.clone());
            }
        }
        let mut workers = Vec::with_capacity(self.num_threads);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.num_threads)
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
        let pool = match pool {
            Ok(pool) => Arc::new(pool),
            Err(e) => {
                // rayon has told the workers it did start to exit (a failed build terminates
                // its registry).
                join(workers);
                return Err(e);
            }
        };
        let fresh = Started {
            pid,
            pool: pool.clone(),
            workers,
        };
        if let Some(old) = guard.replace(fresh) {
            // The parent's pool, inherited through fork(): its threads do not exist here, and
            // dropping it would wait for them forever.
            std::mem::forget(old);
        }
        Ok(pool)
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        let Some(started) = self
            .started
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        if started.pid != std::process::id() {
            std::mem::forget(started);
            return;
        }
        let Started { pool, workers, .. } = started;
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

fn join(workers: Vec<JoinHandle<()>>) {
    for w in workers {
        // A job's panic reaches the caller that ran it (rayon re-raises it in `install`), so
        // a worker's own end carries nothing left to report.
        let _ = w.join();
    }
}
