"""How the Python benchmarks time CUDA calls (one definition for bench/*.py): call by call
(median_ms) or in back-to-back loops (loop_us)."""

import statistics

import torch


def median_ms(call, iters, warmup=3):
    """Milliseconds: the median of `iters` calls, each between its own CUDA events, after
    `warmup` calls."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def loop_us(call, iters, repeats=3, warmup=3):
    """Per-call time in µs: the median over `repeats` of (CUDA events around `iters`
    back-to-back calls) / iters, after `warmup` calls.

    The events bracket the whole loop and nothing synchronises inside it, as in a decoding loop
    without CUDA graphs: when a call's GPU work is shorter than its host-side cost (Python,
    argument checks, launches) the GPU idles between calls and that idle time is counted, which
    is the floor a user sees; when it is longer, the next launches queue up behind it and the
    kernels' own time is measured. A synchronisation per call would instead add a full launch
    latency to every call (no overlap of host and GPU), and a few-µs call would be near the
    events' resolution."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per_call = []
    for _ in range(repeats):
        start.record()
        for _ in range(iters):
            call()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(per_call)


def backward_ms(fn, args, dout, iters):
    """The backward alone of fn(*args): (milliseconds, gradients of args). One forward, then
    median_ms of `out.backward(dout, retain_graph=True)` (the gradients' accumulation into .grad
    is part of each call, as it is for every function timed this way), then one more backward
    from zeroed gradients for the values."""
    leaves = [a.detach().requires_grad_() for a in args]
    out = fn(*leaves)
    ms = median_ms(lambda: out.backward(dout, retain_graph=True), iters)
    for t in leaves:
        t.grad = None
    out.backward(dout)
    return ms, [t.grad for t in leaves]
