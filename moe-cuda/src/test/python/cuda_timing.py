"""How the PyTorch reference scripts time their work, by the method of the Java benchmarks (dev.moe4j.core.testing.BenchTiming):
untimed warm-up runs, then the median of runs each between two CUDA events on the current stream, queued back to back."""
import os
import statistics

import torch


BACK_TO_BACK = os.environ.get("MOE4J_BENCH_BACK_TO_BACK", "1") != "0"


def median_ms(fn, reps, warmup=0):
    """Median milliseconds of fn over reps runs, after warmup untimed runs: the runs queued back to back with an event
    between consecutive ones and one wait at the end, as BenchTiming does (MOE4J_BENCH_BACK_TO_BACK=0: each run waited
    for, like BenchTiming's -Dmoe4j.bench.backToBack=false)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if BACK_TO_BACK:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
        events[0].record()
        for i in range(reps):
            fn()
            events[i + 1].record()
        events[-1].synchronize()
        return statistics.median(events[i].elapsed_time(events[i + 1]) for i in range(reps))
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
