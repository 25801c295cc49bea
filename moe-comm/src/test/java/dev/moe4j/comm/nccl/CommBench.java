package dev.moe4j.comm.nccl;

import dev.moe4j.comm.rendezvous.DistributedEnv;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.backend.Backends;
import dev.moe4j.core.comm.CommOptions;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.testing.BenchTiming;

import java.time.Duration;
import java.util.Locale;

/**
 * All-to-all and all-reduce bus bandwidth of {@link NcclCommunicator}, one process per GPU (start it under
 * torchrun, see GPU-TESTS.md), in nccl-tests' convention: algorithm bandwidth = bytes per rank / time; bus
 * bandwidth = algbw * (p-1)/p for all-to-all and algbw * 2(p-1)/p for all-reduce. Each size: 200 warm-up calls (so
 * that the JIT has compiled the Java path, as in a training loop that has run a while), then
 * the median of 20 calls timed with CUDA events on the backend's stream ({@link BenchTiming}). Rank 0 prints one
 * JSON line per size; moe-comm/src/test/python/comm_bench_reference.py measures torch.distributed the same way.
 */
public final class CommBench {
    static final int WARMUP = 200;

    /** CommBench [--node-size G]: with G > 0 also the hierarchical all-to-all (G ranks per node) beside the flat one. */
    public static void main(String[] args) throws Exception {
        int nodeSize = 0;
        if (args.length == 2 && args[0].equals("--node-size")) nodeSize = Integer.parseInt(args[1]);
        else if (args.length != 0) throw new IllegalArgumentException("usage: CommBench [--node-size G]");
        DistributedEnv env = DistributedEnv.fromEnvironment();
        NcclLibrary.load();
        try (Backend backend = Backends.select("cuda").create(env.localRank());
             NcclCommunicator comm = NcclCommunicator.create(backend, env, CommOptions.withTimeout(Duration.ofSeconds(120)))) {
            int p = comm.size();
            dev.moe4j.comm.HierarchicalCommunicator hier = nodeSize > 0 ? new dev.moe4j.comm.HierarchicalCommunicator(comm, nodeSize) : null;
            for (long bytes = 16 << 10; bytes <= (1L << 30); bytes *= 4) {
                int cols = 1024;                                   // bf16 rows of 2 KiB
                int rows = (int) Math.max(p, bytes / (2L * cols) / p * p);
                try (Tensor send = backend.zeros(DType.BF16, rows, cols); Tensor recv = backend.zeros(DType.BF16, rows, cols)) {
                    backend.randomUniform(send, -1, 1, 7, comm.rank() * (long) rows * cols);
                    long realBytes = (long) rows * cols * 2;
                    double a2a = BenchTiming.medianMs(backend, WARMUP, 20, () -> comm.allToAll(send, recv));
                    double ar = BenchTiming.medianMs(backend, WARMUP, 20, () -> comm.allReduce(send));
                    double h = hier == null ? Double.NaN : BenchTiming.medianMs(backend, WARMUP, 20, () -> hier.allToAll(send, recv));
                    double algA2a = realBytes / (a2a * 1e-3) / 1e9, algAr = realBytes / (ar * 1e-3) / 1e9;
                    if (comm.rank() == 0) {
                        System.out.printf(Locale.ROOT, "{\"impl\":\"moe4j\",\"ranks\":%d,\"bytes\":%d,\"all_to_all_ms\":%.4f,\"all_to_all_busbw\":%.2f,"
                                        + "\"all_reduce_ms\":%.4f,\"all_reduce_busbw\":%.2f}%n",
                                p, realBytes, a2a, algA2a * (p - 1) / p, ar, algAr * 2 * (p - 1) / p);
                        if (hier != null) {
                            System.out.printf(Locale.ROOT, "{\"impl\":\"moe4j\",\"ranks\":%d,\"bytes\":%d,\"hierarchical_node_size\":%d,"
                                    + "\"all_to_all_ms\":%.4f,\"all_to_all_busbw\":%.2f}%n", p, realBytes, nodeSize, h, realBytes / (h * 1e-3) / 1e9 * (p - 1) / p);
                        }
                    }
                    if (bytes == 16 << 10) hostCost(backend, comm, send);
                }
            }
            if (hier != null) hier.close();
        }
        System.exit(0);
    }

    /**
     * A diagnostic of where small-message time goes: the host's wall time per call over 2000 queued all-reduces
     * of the smallest size (no synchronisation between them), beside the device time per call.
     */
    private static void hostCost(Backend backend, NcclCommunicator comm, Tensor t) {
        int n = 2000;
        backend.synchronize();
        long t0 = System.nanoTime();
        for (int i = 0; i < n; i++) comm.allReduce(t);
        long t1 = System.nanoTime();
        backend.synchronize();
        long t2 = System.nanoTime();
        if (comm.rank() == 0) {
            System.out.printf(Locale.ROOT, "{\"impl\":\"moe4j\",\"diagnostic\":\"2000 queued all-reduces of %d bytes\",\"host_us_per_call\":%.2f,\"wall_us_per_call\":%.2f}%n",
                    t.numel() * 2, (t1 - t0) / 1e3 / n, (t2 - t0) / 1e3 / n);
        }
    }
}
