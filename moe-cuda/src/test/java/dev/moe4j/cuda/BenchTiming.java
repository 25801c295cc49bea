package dev.moe4j.cuda;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Scope;
import dev.moe4j.core.tensor.Tensor;
import org.bytedeco.cuda.cudart.CUevent_st;
import org.bytedeco.cuda.cudart.CUstream_st;
import org.bytedeco.cuda.global.cudart;

import java.util.Arrays;

/**
 * The timing helpers of moe-cuda's benchmarks (MoeLayerBench, TrainBench): the median of runs each between two CUDA
 * events on the backend's stream (device time of everything the run queued), and the dense bf16 GEMM rate the
 * utilisation figures divide by. A backend without a stream (the CPU backend of the smoke runs) is timed by the
 * wall clock around the run and a synchronize. The median of an even count is the mean of the middle two, as the
 * PyTorch peers compute it.
 */
final class BenchTiming {
    private BenchTiming() {}

    /** Median milliseconds of {@code body} over {@code iters} runs (no warm-up: the caller runs its own). */
    static double medianMs(Backend backend, int iters, Runnable body) {
        if (iters < 1) throw new IllegalArgumentException("BenchTiming.medianMs: iters must be >= 1, got " + iters);
        double[] t = new double[iters];
        if (backend.nativeStream() == 0) {
            backend.synchronize();
            for (int i = 0; i < iters; i++) {
                long t0 = System.nanoTime();
                body.run();
                backend.synchronize();
                t[i] = (System.nanoTime() - t0) / 1e6;
            }
        } else {
            CUstream_st stream = new CUstream_st(Cuda.ptr(backend.nativeStream()));
            CUevent_st start = new CUevent_st(), end = new CUevent_st();
            Cuda.check(cudart.cudaEventCreate(start), "cudaEventCreate");
            Cuda.check(cudart.cudaEventCreate(end), "cudaEventCreate");
            float[] ms = new float[1];
            try {
                for (int i = 0; i < iters; i++) {
                    Cuda.check(cudart.cudaEventRecord(start, stream), "cudaEventRecord");
                    body.run();
                    Cuda.check(cudart.cudaEventRecord(end, stream), "cudaEventRecord");
                    Cuda.check(cudart.cudaEventSynchronize(end), "cudaEventSynchronize");
                    Cuda.check(cudart.cudaEventElapsedTime(ms, start, end), "cudaEventElapsedTime");
                    t[i] = ms[0];
                }
            } finally {
                cudart.cudaEventDestroy(start);
                cudart.cudaEventDestroy(end);
            }
        }
        Arrays.sort(t);
        return iters % 2 == 1 ? t[iters / 2] : (t[iters / 2 - 1] + t[iters / 2]) / 2;
    }

    /**
     * The dense bf16 GEMM rate in TFLOP/s: C[n,n] = A[n,n] B[n,n] through {@link Backend#matmul} on random normal
     * data (constant data runs faster on tensor cores), 2 warm-up calls, median of 10. On the GPU n = 8192 (cuBLAS).
     */
    static double denseGemmTflops(Backend backend, int n) {
        if (n < 1) throw new IllegalArgumentException("BenchTiming.denseGemmTflops: n must be >= 1, got " + n);
        try (Scope s = Scope.open()) {
            Tensor a = backend.empty(DType.BF16, n, n), b = backend.empty(DType.BF16, n, n), c = backend.empty(DType.BF16, n, n);
            backend.randomNormal(a, 0, 1, 11, 0);
            backend.randomNormal(b, 0, 1, 12, 0);
            for (int i = 0; i < 2; i++) backend.matmul(a, false, b, false, c, 1f, 0f);
            double ms = medianMs(backend, 10, () -> backend.matmul(a, false, b, false, c, 1f, 0f));
            return 2.0 * n * n * (double) n / ms / 1e9;
        }
    }
}
