//! A context used before fork() keeps working in the child (its thread pool is rebuilt there),
//! instead of hanging on threads that fork() did not copy; and the child can destroy it, which
//! joins only threads of the child's own.

#![cfg(unix)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ufa::{Context, DType};
use ufa_testkit::{Case, Instance};

#[test]
fn forked_child_can_compute() {
    let ctx = Context::builder().num_threads(2).build().unwrap();
    let case = Case::new(1, 100, 300, 4, 64, DType::F32);
    let mut inst = Instance::new(&case, 3);
    inst.run(&ctx).unwrap(); // starts the pool in the parent
    let expected = inst.outputs().0;

    // SAFETY: the child only computes with ufa and exits without unwinding into the harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let mut child = Instance::new(&case, 3);
        let ok = child.run(&ctx).is_ok() && child.outputs().0 == expected;
        drop(ctx);
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    wait_for_child(pid, "computing attention");
    // The parent's pool still works after the fork.
    inst.run(&ctx).unwrap();
}

#[test]
fn forked_child_can_destroy_a_context_it_never_used() {
    let ctx = Context::builder().num_threads(2).build().unwrap();
    let case = Case::new(1, 100, 300, 4, 64, DType::F32);
    Instance::new(&case, 5).run(&ctx).unwrap(); // starts the pool in the parent

    // SAFETY: the child only drops the context and exits without unwinding into the harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        drop(ctx);
        unsafe { libc::_exit(0) };
    }
    wait_for_child(pid, "destroying the parent's context");
}

/// A fork() while another thread is inside a pool call of its own context: the locks that
/// thread holds stay held in the child, where no thread will release them. The child's calls
/// must not wait on them (the process's kept scratch, a lock that pool calls take briefly at
/// their start and end, was one: a child forked inside that moment hung, once in ~100 forks
/// on a 2-core VM, and once in CI beside forked_child_can_compute).
#[test]
fn fork_while_another_thread_computes() {
    let busy = Arc::new(Context::builder().num_threads(2).build().unwrap());
    let ctx = Arc::new(Context::builder().num_threads(2).build().unwrap());
    fork_beside_a_busy_thread(busy, ctx, "computing while another thread did");
}

/// The same with one context shared by both threads (as Python's calls share one): the
/// child starts that context's pool anew while the parent's other thread may have been
/// looking it up (a lookup under a lock would leave the lock held in the child).
#[test]
fn fork_while_another_thread_computes_on_the_same_context() {
    let ctx = Arc::new(Context::builder().num_threads(2).build().unwrap());
    fork_beside_a_busy_thread(ctx.clone(), ctx, "computing on a shared context");
}

/// 400 forks, each child computing on `ctx`, while another thread computes on `busy` in a
/// loop.
fn fork_beside_a_busy_thread(busy: Arc<Context>, ctx: Arc<Context>, doing: &str) {
    let case = Case::new(1, 100, 300, 4, 64, DType::F32);
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (stop, case) = (stop.clone(), case.clone());
        std::thread::spawn(move || {
            let mut inst = Instance::new(&case, 7);
            while !stop.load(Ordering::Relaxed) {
                inst.run(&busy).unwrap();
            }
        })
    };
    for round in 0..400 {
        // SAFETY: the child only computes with ufa and exits without unwinding.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let ok = Instance::new(&case, 3).run(&ctx).is_ok();
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        wait_for_child(pid, &format!("{doing} (round {round})"));
    }
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
}

/// Waits up to 30 s for the child to exit with status 0.
fn wait_for_child(pid: libc::pid_t, doing: &str) {
    let start = Instant::now();
    let mut status = 0;
    loop {
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("forked child hung {doing}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed {doing}: status {status}"
    );
}
