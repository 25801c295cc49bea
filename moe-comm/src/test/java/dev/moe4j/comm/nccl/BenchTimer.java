package dev.moe4j.comm.nccl;

import dev.moe4j.core.backend.Backend;
import org.bytedeco.cuda.cudart.CUevent_st;
import org.bytedeco.cuda.cudart.CUstream_st;

import java.util.Arrays;

import static org.bytedeco.cuda.global.cudart.cudaEventCreate;
import static org.bytedeco.cuda.global.cudart.cudaEventDestroy;
import static org.bytedeco.cuda.global.cudart.cudaEventElapsedTime;
import static org.bytedeco.cuda.global.cudart.cudaEventRecord;
import static org.bytedeco.cuda.global.cudart.cudaEventSynchronize;

/**
 * The median-timing helper of moe-comm's benchmarks ({@link CommBench}, dev.moe4j.comm.ep.EpLayerBench): warm-up
 * calls, then each timed call between two CUDA events on the backend's stream, so that the figure is device time of
 * everything the call queued (kernels and NCCL collectives alike). A backend without a stream (the CPU backend of
 * the smoke runs) is timed by the wall clock around the call and a synchronize. The median of an even count is the
 * mean of the middle two, as Python's statistics.median (the PyTorch peers) computes it.
 */
public final class BenchTimer {
    private BenchTimer() {}

    /** Median milliseconds of {@code op} over {@code reps} calls after {@code warmup} untimed ones. */
    public static double medianMs(Backend backend, int warmup, int reps, Runnable op) {
        if (reps < 1) throw new IllegalArgumentException("BenchTimer.medianMs: reps must be >= 1, got " + reps);
        if (warmup < 0) throw new IllegalArgumentException("BenchTimer.medianMs: warmup must be >= 0, got " + warmup);
        for (int i = 0; i < warmup; i++) op.run();
        backend.synchronize();
        double[] ms = new double[reps];
        if (backend.nativeStream() == 0) {
            for (int i = 0; i < reps; i++) {
                long t0 = System.nanoTime();
                op.run();
                backend.synchronize();
                ms[i] = (System.nanoTime() - t0) / 1e6;
            }
        } else {
            CUstream_st stream = new CUstream_st(NcclCommunicator.pointer(backend.nativeStream()));
            CUevent_st start = new CUevent_st(), end = new CUevent_st();
            check(cudaEventCreate(start), "cudaEventCreate");
            check(cudaEventCreate(end), "cudaEventCreate");
            float[] t = new float[1];
            try {
                for (int i = 0; i < reps; i++) {
                    check(cudaEventRecord(start, stream), "cudaEventRecord");
                    op.run();
                    check(cudaEventRecord(end, stream), "cudaEventRecord");
                    check(cudaEventSynchronize(end), "cudaEventSynchronize");
                    check(cudaEventElapsedTime(t, start, end), "cudaEventElapsedTime");
                    ms[i] = t[0];
                }
            } finally {
                cudaEventDestroy(start);
                cudaEventDestroy(end);
            }
        }
        Arrays.sort(ms);
        return reps % 2 == 1 ? ms[reps / 2] : (ms[reps / 2 - 1] + ms[reps / 2]) / 2;
    }

    private static void check(int status, String call) {
        if (status != 0) throw new IllegalStateException(call + " failed with CUDA status " + status);
    }
}
