"""How the PyTorch reference scripts time their work, by the method of the Java benchmarks (dev.moe4j.core.testing.BenchTiming):
untimed warm-up runs, then the median of runs each between two CUDA events on the current stream."""
import statistics

import torch


def median_ms(fn, reps, warmup=0):
    """Median milliseconds of fn over reps runs, after warmup untimed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
