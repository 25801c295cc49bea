package dev.moe4j.core.testing;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Scope;
import dev.moe4j.core.tensor.Tensor;

import java.util.Arrays;

/**
 * The timing of every benchmark of the project (MoeLayerBench, TrainBench, EpLayerBench, ScalingBench, CommBench):
 * untimed warm-up runs, then the median of runs each timed on the device (on a GPU: between two CUDA events on the
 * backend's stream, the runs queued back to back: {@link #BACK_TO_BACK}). The median of an even count is the mean of the middle two, as Python's
 * statistics.median computes it in the PyTorch peers (cuda_timing.py).
 */
public final class BenchTiming {
    private BenchTiming() {}

    /**
     * The timed runs are queued back to back ({@link Backend#timeEachMs}: an event between consecutive runs, one wait
     * at the end), so that the device does not wait for the host at the start of each run as it does when every run
     * is waited for (a 350M MoE layer step: 2.768 against 2.968 ms, PyTorch's grouped_mm peer 3.798 against 3.928 ms,
     * docs/benchmarks.md); a training loop queues its steps the same way. -Dmoe4j.bench.backToBack=false: one run
     * at a time (cuda_timing.py follows MOE4J_BENCH_BACK_TO_BACK=0 likewise).
     */
    static final boolean BACK_TO_BACK = !"false".equalsIgnoreCase(System.getProperty("moe4j.bench.backToBack", "true"));

    /** Median milliseconds of {@code op} over {@code reps} runs after {@code warmup} untimed ones. */
    public static double medianMs(Backend backend, int warmup, int reps, Runnable op) {
        if (reps < 1) throw new IllegalArgumentException("BenchTiming.medianMs: reps must be >= 1, got " + reps);
        if (warmup < 0) throw new IllegalArgumentException("BenchTiming.medianMs: warmup must be >= 0, got " + warmup);
        for (int i = 0; i < warmup; i++) op.run();
        backend.synchronize();
        double[] ms;
        if (BACK_TO_BACK) {
            ms = backend.timeEachMs(reps, op);
        } else {
            ms = new double[reps];
            for (int i = 0; i < reps; i++) ms[i] = backend.timeMs(op);
        }
        Arrays.sort(ms);
        return reps % 2 == 1 ? ms[reps / 2] : (ms[reps / 2 - 1] + ms[reps / 2]) / 2;
    }

    /**
     * Median milliseconds the host takes to issue {@code op} (wall clock from its start to its return, the device
     * synchronized before and after each run). Next to {@link #medianMs} it tells whether a step is bound by the
     * host's launches (host time close to device time) or by the device.
     */
    public static double medianHostMs(Backend backend, int reps, Runnable op) {
        if (reps < 1) throw new IllegalArgumentException("BenchTiming.medianHostMs: reps must be >= 1, got " + reps);
        double[] ms = new double[reps];
        for (int i = 0; i < reps; i++) {
            backend.synchronize();
            long t0 = System.nanoTime();
            op.run();
            ms[i] = (System.nanoTime() - t0) / 1e6;
        }
        backend.synchronize();
        Arrays.sort(ms);
        return reps % 2 == 1 ? ms[reps / 2] : (ms[reps / 2 - 1] + ms[reps / 2]) / 2;
    }

    /**
     * The dense bf16 GEMM rate in TFLOP/s: C[n,n] = A[n,n] B[n,n] through {@link Backend#matmul} on random normal
     * data (constant data runs faster on tensor cores), 2 warm-up calls, median of 10.
     */
    public static double denseGemmTflops(Backend backend, int n) {
        if (n < 1) throw new IllegalArgumentException("BenchTiming.denseGemmTflops: n must be >= 1, got " + n);
        try (Scope s = Scope.open()) {
            Tensor a = backend.empty(DType.BF16, n, n), b = backend.empty(DType.BF16, n, n), c = backend.empty(DType.BF16, n, n);
            backend.randomNormal(a, 0, 1, 11, 0);
            backend.randomNormal(b, 0, 1, 12, 0);
            double ms = medianMs(backend, 2, 10, () -> backend.matmul(a, false, b, false, c, 1f, 0f));
            return 2.0 * n * n * (double) n / ms / 1e9;
        }
    }
}
