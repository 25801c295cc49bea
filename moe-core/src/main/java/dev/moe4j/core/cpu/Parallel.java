package dev.moe4j.core.cpu;

import java.util.concurrent.ForkJoinPool;
import java.util.concurrent.RecursiveAction;
import java.util.concurrent.RecursiveTask;

/** Splits an index range over the common fork-join pool; small ranges run on the calling thread. */
final class Parallel {
    private Parallel() {}

    interface RangeBody { void run(int start, int end); }

    interface RangeSum { double run(int start, int end); }

    /** Runs body over [0, n) in chunks of at least {@code grain} indices. */
    static void range(int n, int grain, RangeBody body) {
        if (n <= 0) return;
        int parts = Math.min(ForkJoinPool.getCommonPoolParallelism() * 4, Math.max(1, n / Math.max(1, grain)));
        if (parts <= 1) { body.run(0, n); return; }
        ForkJoinPool.commonPool().invoke(new Chunk(body, 0, n, (n + parts - 1) / parts));
    }

    /** Sum of body over [0, n) in chunks; chunk sums are added in a fixed order (deterministic). */
    static double sum(int n, int grain, RangeSum body) {
        if (n <= 0) return 0;
        int parts = Math.min(ForkJoinPool.getCommonPoolParallelism() * 4, Math.max(1, n / Math.max(1, grain)));
        if (parts <= 1) return body.run(0, n);
        return ForkJoinPool.commonPool().invoke(new SumChunk(body, 0, n, (n + parts - 1) / parts));
    }

    private static final class Chunk extends RecursiveAction {
        private final RangeBody body;
        private final int lo, hi, size;

        Chunk(RangeBody body, int lo, int hi, int size) { this.body = body; this.lo = lo; this.hi = hi; this.size = size; }

        @Override protected void compute() {
            if (hi - lo <= size) { body.run(lo, hi); return; }
            int mid = lo + ((hi - lo) / size / 2) * size;
            if (mid <= lo) mid = lo + size;
            invokeAll(new Chunk(body, lo, mid, size), new Chunk(body, mid, hi, size));
        }
    }

    private static final class SumChunk extends RecursiveTask<Double> {
        private final RangeSum body;
        private final int lo, hi, size;

        SumChunk(RangeSum body, int lo, int hi, int size) { this.body = body; this.lo = lo; this.hi = hi; this.size = size; }

        @Override protected Double compute() {
            if (hi - lo <= size) return body.run(lo, hi);
            int mid = lo + ((hi - lo) / size / 2) * size;
            if (mid <= lo) mid = lo + size;
            SumChunk left = new SumChunk(body, lo, mid, size);
            left.fork();
            double right = new SumChunk(body, mid, hi, size).compute();
            return left.join() + right;
        }
    }
}
