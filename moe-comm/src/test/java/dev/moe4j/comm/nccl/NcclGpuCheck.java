package dev.moe4j.comm.nccl;

import dev.moe4j.comm.HierarchicalCommunicator;
import dev.moe4j.comm.RankData;
import dev.moe4j.comm.rendezvous.DistributedEnv;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.comm.CommOptions;
import dev.moe4j.core.comm.CommTimeoutException;
import dev.moe4j.core.comm.CommunicationException;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.comm.ProcessGroups;
import dev.moe4j.core.comm.ReduceOp;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;

import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;

import static dev.moe4j.comm.RankData.*;

/**
 * The NCCL communicator's checks on real GPUs, one process per GPU, every result against a serial reference
 * computed on the host from all ranks' inputs. Run under torchrun (see moe-comm/GPU-TESTS.md):
 * <pre>
 *   NcclGpuCheck collectives   all collectives, hierarchical all-to-all (node sizes 1 and world), process groups
 *   NcclGpuCheck hang          rank 1 stalls past the timeout: rank 0 must fail naming it, within the timeout
 *   NcclGpuCheck die           rank 1 halts: rank 0 must fail naming it, within the timeout
 *   NcclGpuCheck window-hang   rank 1 stalls before a peer-window exchange: rank 0 must fail naming the window's call
 * </pre>
 * Exit code 0 when every check passed on this rank.
 */
public final class NcclGpuCheck {
    private final Communicator comm;
    private final Backend b;
    private final List<String> failures = new ArrayList<>();
    private final int p, r;

    private NcclGpuCheck(Communicator comm) {
        this.comm = comm;
        this.b = comm.backend();
        this.p = comm.size();
        this.r = comm.rank();
    }

    public static void main(String[] args) {
        String mode = args.length > 0 ? args[0] : "collectives";
        int code;
        try {
            code = run(mode) ? 0 : 1;
        } catch (Throwable t) {
            t.printStackTrace();
            code = 2;
        }
        System.out.flush();
        System.exit(code);
    }

    /** Runs a mode on this process's rank; true when every check passed. */
    public static boolean run(String mode) throws Exception {
        DistributedEnv env = DistributedEnv.fromEnvironment();
        Duration timeout = mode.equals("collectives") ? Duration.ofSeconds(60) : Duration.ofSeconds(10);
        NcclLibrary.load();     // a clear message where NCCL or the GPU driver is missing
        // -Dmoe4j.backend=cuda with moe-cuda on the class path: the real CUDA backend (gatherRows as a kernel);
        // otherwise the test-only device backend.
        // try-with-resources: a failure inside keeps its own stack trace (a failing close is added as suppressed).
        try (Backend backend = "cuda".equals(System.getProperty("moe4j.backend"))
                ? dev.moe4j.core.backend.Backends.select("cuda").create(env.localRank())
                : CudaTestBackend.create(env.localRank());
             NcclCommunicator comm = NcclCommunicator.create(backend, env, CommOptions.withTimeout(timeout))) {
            log(comm, "NCCL " + NcclLibrary.versionString(NcclLibrary.load()) + ", " + comm.describe());
            NcclGpuCheck c = new NcclGpuCheck(comm);
            switch (mode) {
                case "collectives" -> c.collectives();
                case "hang" -> c.hang(timeout);
                case "die" -> c.die(timeout);
                case "window-hang" -> c.windowHang(timeout);
                default -> throw new IllegalArgumentException("mode must be collectives, hang or die, got " + mode);
            }
            for (String f : c.failures) log(comm, "FAIL " + f);
            log(comm, c.failures.isEmpty() ? "ALL PASSED (" + mode + ")" : c.failures.size() + " FAILED (" + mode + ")");
            return c.failures.isEmpty();
        }
    }

    private static void log(Communicator c, String s) { System.out.println("[rank " + c.rank() + "] " + s); }

    private void check(String name, boolean ok, String detail) {
        if (ok) log(comm, "PASS " + name);
        else failures.add(name + ": " + detail);
    }

    private void exact(String name, double[] want, double[] got) {
        check(name, Arrays.equals(want, got), "want " + Arrays.toString(Arrays.copyOf(want, Math.min(8, want.length)))
                + "..., got " + Arrays.toString(Arrays.copyOf(got, Math.min(8, got.length))) + "...");
    }

    private void close(String name, double[] want, double[] got, double tol) {
        double worst = 0;
        for (int i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(want[i] - got[i]) / Math.max(1, Math.abs(want[i])));
        check(name, want.length == got.length && worst <= tol, "max relative error " + worst + " > " + tol);
    }

    // ------------------------------------------------------------------ collectives

    void collectives() throws Exception {
        int cols = 5;
        for (DType dt : new DType[] {DType.F32, DType.BF16, DType.I32}) {
            long tag = 31 + dt.ordinal();
            int[][] counts = counts(p, tag);
            counts[0][p - 1] = 3;     // at least one non-empty message even when p == 1 or 2
            int[] recvRows = column(counts, r);
            try (Tensor send = tensor(b, dt, values(dt, tag, r, sum(counts[r]) * cols), sum(counts[r]), cols);
                 Tensor recv = b.zeros(dt, sum(recvRows), cols)) {
                comm.allToAllV(send, counts[r], recv, recvRows);
                exact("allToAllV " + dt, allToAllReference(dt, tag, counts, cols, r), read(recv));
                for (int nodeSize : nodeSizes()) {
                    try (HierarchicalCommunicator h = new HierarchicalCommunicator(comm, nodeSize); Tensor hr = b.zeros(dt, sum(recvRows), cols)) {
                        h.allToAllV(send, counts[r], hr, recvRows);
                        exact("hierarchical allToAllV " + dt + " node size " + nodeSize, read(recv), read(hr));
                    }
                }
            }
        }
        for (DType dt : new DType[] {DType.F32, DType.BF16, DType.I32}) {
            int bcols = dt == DType.BF16 ? 2048 : 5;   // bf16: blocks of up to 16 KiB
            long tag = 81 + dt.ordinal();
            RankData.BlockPlan plan = blockPlan(p, tag);
            double[] want = blockReference(dt, tag, plan, bcols, r);
            for (boolean async : new boolean[] {false, true}) {
                try (Tensor send = tensor(b, dt, blockSendValues(dt, tag, plan, bcols, r), plan.sendTensorRows()[r], bcols);
                     Tensor recv = tensor(b, dt, blockRecvInitial(dt, tag, plan, bcols, r), plan.recvTensorRows()[r], bcols)) {
                    if (async) comm.exchangeRowsAsync(send, plan.send()[r], recv, plan.recv()[r]).await();
                    else comm.exchangeRows(send, plan.send()[r], recv, plan.recv()[r]);
                    exact("exchangeRows " + dt + (async ? " (async)" : ""), want, read(recv));
                }
            }
            // the SPI's default (pack, all-to-all, unpack), here over the hierarchical all-to-all, gives the same rows
            for (int nodeSize : nodeSizes()) {
                try (HierarchicalCommunicator h = new HierarchicalCommunicator(comm, nodeSize);
                     Tensor send = tensor(b, dt, blockSendValues(dt, tag, plan, bcols, r), plan.sendTensorRows()[r], bcols);
                     Tensor recv = tensor(b, dt, blockRecvInitial(dt, tag, plan, bcols, r), plan.recvTensorRows()[r], bcols)) {
                    h.exchangeRows(send, plan.send()[r], recv, plan.recv()[r]);
                    exact("hierarchical (default) exchangeRows " + dt + " node size " + nodeSize, want, read(recv));
                }
            }
        }
        {
            int n = 4;
            int[][] counts = new int[p][p];
            for (int[] c : counts) Arrays.fill(c, n);
            try (Tensor send = tensor(b, DType.BF16, values(DType.BF16, 40, r, p * n * cols), p * n, cols);
                 Tensor recv = b.zeros(DType.BF16, p * n, cols)) {
                comm.allToAll(send, recv);
                exact("allToAll BF16", allToAllReference(DType.BF16, 40, counts, cols, r), read(recv));
            }
        }
        peerWindows();
        {
            int k = 3;
            int[] send = new int[p * k];
            for (int d = 0; d < p; d++) for (int e = 0; e < k; e++) send[d * k + e] = 100 * r + 10 * d + e;
            int[] want = new int[p * k];
            for (int s = 0; s < p; s++) for (int e = 0; e < k; e++) want[s * k + e] = 100 * s + 10 * r + e;
            int[] got = comm.exchangeCounts(send);
            check("exchangeCounts", Arrays.equals(want, got), Arrays.toString(got));
        }
        int n = 1000;
        for (DType dt : new DType[] {DType.F32, DType.BF16, DType.I32}) {
            for (ReduceOp op : ReduceOp.values()) {
                long tag = 50 + dt.ordinal() * 5 + op.ordinal();
                double[] want = values(dt, tag, 0, n);
                for (int s = 1; s < p; s++) {
                    double[] v = values(dt, tag, s, n);
                    for (int i = 0; i < n; i++) want[i] = op == ReduceOp.SUM ? want[i] + v[i] : op == ReduceOp.MAX ? Math.max(want[i], v[i]) : Math.min(want[i], v[i]);
                }
                for (int i = 0; i < n; i++) want[i] = dt.round(want[i]);
                try (Tensor t = tensor(b, dt, values(dt, tag, r, n), n, 1)) {
                    comm.allReduce(t, op);
                    // Sums of more than two ranks may associate differently in NCCL: within rounding of the dtype.
                    double tol = op != ReduceOp.SUM || dt == DType.I32 ? 0 : dt == DType.BF16 ? 1.0 / 128 : 1e-6;
                    close("allReduce " + dt + " " + op, want, read(t), tol);
                }
            }
        }
        int m = 12;
        double[] gathered = new double[p * m];
        for (int s = 0; s < p; s++) System.arraycopy(values(DType.F32, 60, s, m), 0, gathered, s * m, m);
        try (Tensor s = tensor(b, DType.F32, values(DType.F32, 60, r, m), 3, 4); Tensor g = b.zeros(DType.F32, p * 3, 4)) {
            comm.allGather(s, g);
            exact("allGather", gathered, read(g));
        }
        double[] scat = new double[m];
        for (int s = 0; s < p; s++) {
            double[] v = values(DType.F32, 61, s, p * m);
            for (int i = 0; i < m; i++) scat[i] += v[r * m + i];
        }
        for (int i = 0; i < m; i++) scat[i] = DType.F32.round(scat[i]);
        try (Tensor s = tensor(b, DType.F32, values(DType.F32, 61, r, p * m), p, m); Tensor o = b.zeros(DType.F32, m)) {
            comm.reduceScatter(s, o, ReduceOp.SUM);
            close("reduceScatter", scat, read(o), 1e-6);
        }
        int root = p - 1;
        try (Tensor t = tensor(b, DType.BF16, values(DType.BF16, 62, r, 64), 8, 8)) {
            comm.broadcast(t, root);
            exact("broadcast", values(DType.BF16, 62, root, 64), read(t));
        }
        if (p > 1) {
            int next = (r + 1) % p, prev = (r + p - 1) % p;
            try (Tensor s = tensor(b, DType.F32, values(DType.F32, 63, r, 16), 4, 4); Tensor got = b.zeros(DType.F32, 4, 4)) {
                // Even ranks send first, odd ranks receive first: blocking-free ordering on one stream.
                if (r % 2 == 0) { comm.send(s, next); comm.recv(got, prev); } else { comm.recv(got, prev); comm.send(s, next); }
                exact("send/recv ring", values(DType.F32, 63, prev, 16), read(got));
            }
        }
        comm.barrier();
        check("barrier", true, "");
        try (Communicator sub = comm.split(0, -r); Tensor me = b.fromInts(new int[] {r}, 1); Tensor all = b.zeros(DType.I32, p)) {
            sub.allGather(me, all);
            int[] want = new int[p];
            for (int i = 0; i < p; i++) want[i] = p - 1 - i;
            check("split (key reverses order)", sub.rank() == p - 1 - r && Arrays.equals(want, b.toInts(all)),
                    "sub rank " + sub.rank() + ", members " + Arrays.toString(b.toInts(all)));
        }
        for (int ep = 1; ep <= p; ep *= 2) {
            if (p % ep != 0) continue;
            try (ProcessGroups g = new ProcessGroups(comm); Tensor me = b.fromInts(new int[] {r}, 1);
                 Tensor all = b.zeros(DType.I32, ep)) {
                g.expertParallel(ep).allGather(me, all);
                int[] want = ProcessGroups.expertParallelRanks(p, ep)[r / ep];
                check("expert-parallel group ep=" + ep, Arrays.equals(want, b.toInts(all)), Arrays.toString(b.toInts(all)));
            }
        }
    }

    private int[] nodeSizes() {
        List<Integer> s = new ArrayList<>();
        for (int g = 1; g <= p; g *= 2) if (p % g == 0) s.add(g);
        return s.stream().mapToInt(Integer::intValue).toArray();
    }

    // ------------------------------------------------------------------ watchdog

    /** Rank 1 stalls for 3 timeouts before a collective; rank 0 must fail within about one timeout, naming rank 1. */
    void hang(Duration timeout) throws Exception {
        try (Tensor t = b.fromDoubles(DType.F32, new double[] {1, 2, 3}, 3)) {
            comm.allReduce(t);
            comm.barrier();
            if (r == 1) {
                Thread.sleep(timeout.toMillis() * 3);
                try {
                    comm.allReduce(t);
                    comm.barrier();
                } catch (CommunicationException e) {
                    log(comm, "rank 1 failed afterwards as expected: " + e.getMessage());
                }
                return;
            }
            failsWithin("hang", timeout, () -> {
                comm.allReduce(t);
                comm.barrier();
            }, "names rank 1 and the collective", e -> e instanceof CommTimeoutException te && Arrays.equals(te.missingRanks(), new int[] {1})
                    && e.getMessage().contains("allReduce #2"));
        }
    }

    /** What rank 0 runs while rank 1 stalls or is gone: it must fail within the timeout (and 5 s), saying so. */
    private void failsWithin(String what, Duration timeout, Stalled call, String says, java.util.function.Predicate<CommunicationException> said)
            throws Exception {
        long t0 = System.nanoTime();
        try {
            call.run();
            check(what + " detected", false, "it completed without rank 1");
        } catch (CommunicationException e) {
            long ms = (System.nanoTime() - t0) / 1_000_000;
            log(comm, "got: " + e.getMessage());
            check(what + " detected within the timeout", ms < timeout.toMillis() + 5_000, "took " + ms + " ms");
            check(what + " " + says, said.test(e), e.getMessage());
        }
    }

    private interface Stalled { void run() throws Exception; }

    /**
     * Peer windows (CUDA IPC, one host): every rank stores rows of distinct values into every rank's window (its own
     * included) through the backend's scatter, three exchanges over the same windows, two dtypes and row widths; each
     * window then holds exactly the rows stored into it in that exchange.
     */
    void peerWindows() {
        for (DType dt : new DType[] {DType.BF16, DType.F32}) {
            int cols = dt == DType.BF16 ? 1024 : 36, n = 3;   // 2 KiB rows; 144-byte rows
            try (var w = comm.openWindow((long) p * n * cols * dt.bytes())) {
                if (w == null) {
                    check("peer windows open on one host", false, "openWindow returned null");
                    return;
                }
                for (int t = 1; t <= 3; t++) {
                    double[] rows = new double[p * n * cols];
                    int[] dest = new int[2 * p * n];
                    for (int q = 0; q < p; q++) {
                        for (int i = 0; i < n; i++) {
                            int m = q * n + i;
                            for (int c = 0; c < cols; c++) rows[m * cols + c] = dt.round(((t * 7 + r * 3 + q) * 31 + i * 5 + c) % 251 - 125);
                            dest[2 * m] = q;
                            dest[2 * m + 1] = r * n + (n - 1 - i);   // reversed within this rank's block
                        }
                    }
                    Tensor[] dsts = new Tensor[p];
                    for (int q = 0; q < p; q++) dsts[q] = w.tensor(q, dt, p * n, cols);
                    w.open();
                    try (Tensor src = tensor(b, dt, rows, p * n, cols); Tensor d = b.fromInts(dest, p * n, 2)) {
                        b.scatterRowsTo(src, d, dsts);
                        w.publish();
                        w.await();
                    }
                    double[] want = new double[p * n * cols];
                    for (int s = 0; s < p; s++) {
                        for (int i = 0; i < n; i++) {
                            for (int c = 0; c < cols; c++) want[(s * n + (n - 1 - i)) * cols + c] = dt.round(((t * 7 + s * 3 + r) * 31 + i * 5 + c) % 251 - 125);
                        }
                    }
                    exact("peer window " + dt + " exchange " + t, want, read(dsts[r]));
                }
            }
        }
        // windows of different sizes: refused on every rank, naming them (a rank would store past a smaller peer's);
        // a world of one has no other size
        if (p > 1) {
            String refused;
            try (var w = comm.openWindow(r == 0 ? 2048 : 1024)) {
                refused = "opened (" + (w == null ? "null" : w.bytes() + " bytes") + ")";
            } catch (IllegalArgumentException e) {
                refused = e.getMessage();
            }
            check("peer windows of different sizes refused", refused.contains("rank 0: 2048, rank 1: 1024"), refused);
        }
        // a window no GPU can hold: refused on every rank, naming them, and the communicator goes on
        String tooBig;
        try (var w = comm.openWindow(1L << 50)) {
            tooBig = "opened (" + (w == null ? "null" : w.bytes() + " bytes") + ")";
        } catch (CommunicationException e) {
            tooBig = e.getMessage();
        }
        check("a peer window past the device's memory refused on every rank", tooBig.contains("could not set up a peer window"), tooBig);
        try (var w = comm.openWindow(1024)) {
            check("peer windows open after a refusal", w != null, "openWindow returned null");
        }
    }

    /** Rank 1 stalls before the second exchange of a peer window: rank 0's wait must fail by the watchdog, naming it. */
    void windowHang(Duration timeout) throws Exception {
        try (var w = comm.openWindow(1024)) {
            check("peer windows open on one host", w != null, "openWindow returned null");
            if (w == null) return;
            w.open();
            w.publish();
            w.await();
            comm.barrier();
            if (r == 1) {
                Thread.sleep(timeout.toMillis() * 2);
                return;
            }
            failsWithin("window hang", timeout, () -> {
                w.open();
                w.publish();
                w.await();
                b.synchronize();   // stuck on the stream until the watchdog releases the wait
                comm.barrier();
            }, "names the window's call", e -> e.getMessage().contains("peer window"));
        }
    }

    /** Rank 1 halts (no cleanup, exit code 0 so torchrun does not kill rank 0); rank 0 must fail naming it. */
    void die(Duration timeout) throws Exception {
        try (Tensor t = b.fromDoubles(DType.F32, new double[] {1, 2, 3}, 3)) {
            comm.allReduce(t);
            comm.barrier();
            if (r == 1) {
                System.out.println("[rank 1] halting now");
                System.out.flush();
                Runtime.getRuntime().halt(0);
            }
            Thread.sleep(1000);
            failsWithin("death", timeout, () -> {
                comm.allReduce(t);
                comm.barrier();
            }, "reported", e -> e instanceof CommTimeoutException te ? Arrays.equals(te.missingRanks(), new int[] {1})
                    : e.getMessage().contains("peer may have died"));
        }
    }
}
