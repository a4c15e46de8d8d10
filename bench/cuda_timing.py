"""How the Python benchmarks time a CUDA call: warm-up, then CUDA events around each of `iters`
calls and the median in milliseconds (one definition for bench/*.py)."""

import statistics

import torch


def median_ms(call, iters, warmup=3):
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
