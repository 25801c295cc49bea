package dev.moe4j.comm;

import dev.moe4j.core.comm.CommOptions;
import dev.moe4j.core.comm.CommTimeoutException;
import dev.moe4j.core.comm.CommunicationException;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.comm.ReduceOp;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

import java.time.Duration;
import java.util.Arrays;
import java.util.List;

import static dev.moe4j.comm.RankData.*;
import static org.junit.jupiter.api.Assertions.*;

/** Every collective of the in-process communicator against a serial reference computed on the host. */
class InProcessCommunicatorTest {
    static final CommOptions OPTS = CommOptions.withTimeout(Duration.ofSeconds(20));
    static final DType[] DTYPES = {DType.F32, DType.BF16, DType.I32, DType.F64};

    @ParameterizedTest
    @ValueSource(ints = {4, 8})
    void allToAllVUnevenAndEmptySplits(int p) {
        int cols = 3;
        for (DType dt : DTYPES) {
            long tag = 11 + dt.ordinal();
            int[][] counts = counts(p, tag);
            InProcessWorld.run(p, OPTS, comm -> {
                int r = comm.rank();
                int[] recvRows = column(counts, r);
                try (Tensor send = tensor(comm.backend(), dt, values(dt, tag, r, sum(counts[r]) * cols), sum(counts[r]), cols);
                     Tensor recv = comm.backend().zeros(dt, sum(recvRows), cols)) {
                    comm.allToAllV(send, counts[r], recv, recvRows);
                    assertArrayEquals(allToAllReference(dt, tag, counts, cols, r), read(recv), dt + " rank " + r);
                }
                return null;
            });
        }
    }

    @ParameterizedTest
    @ValueSource(ints = {4, 8})
    void allToAllEqualSplits(int p) {
        int n = 2, cols = 5;
        int[][] counts = new int[p][p];
        for (int[] c : counts) Arrays.fill(c, n);
        InProcessWorld.run(p, OPTS, comm -> {
            int r = comm.rank();
            try (Tensor send = tensor(comm.backend(), DType.F32, values(DType.F32, 3, r, p * n * cols), p * n, cols);
                 Tensor recv = comm.backend().zeros(DType.F32, p * n, cols)) {
                comm.allToAll(send, recv);
                assertArrayEquals(allToAllReference(DType.F32, 3, counts, cols, r), read(recv));
            }
            return null;
        });
    }

    @ParameterizedTest
    @ValueSource(ints = {4, 8})
    void exchangeCountsTransposes(int p) {
        int k = 3;   // e.g. three local experts per rank
        InProcessWorld.run(p, OPTS, comm -> {
            int r = comm.rank();
            int[] send = new int[p * k];
            for (int d = 0; d < p; d++) for (int e = 0; e < k; e++) send[d * k + e] = 100 * r + 10 * d + e;
            int[] got = comm.exchangeCounts(send);
            int[] want = new int[p * k];
            for (int s = 0; s < p; s++) for (int e = 0; e < k; e++) want[s * k + e] = 100 * s + 10 * r + e;
            assertArrayEquals(want, got);
            var e = assertThrows(IllegalArgumentException.class, () -> comm.exchangeCounts(new int[p + 1]));
            assertTrue(e.getMessage().contains("a multiple of the group size " + p), e.getMessage());
            return null;
        });
    }

    @ParameterizedTest
    @ValueSource(ints = {4, 8})
    void allReduceSumMaxMin(int p) {
        int n = 37;
        for (DType dt : DTYPES) {
            for (ReduceOp op : ReduceOp.values()) {
                long tag = 100 + dt.ordinal() * 10 + op.ordinal();
                // Reference: rank-order float64 reduction, rounded once to the dtype.
                double[] want = values(dt, tag, 0, n);
                for (int s = 1; s < p; s++) {
                    double[] v = values(dt, tag, s, n);
                    for (int i = 0; i < n; i++) {
                        want[i] = switch (op) {
                            case SUM -> want[i] + v[i];
                            case MAX -> Math.max(want[i], v[i]);
                            case MIN -> Math.min(want[i], v[i]);
                        };
                    }
                }
                for (int i = 0; i < n; i++) want[i] = dt.round(want[i]);
                InProcessWorld.run(p, OPTS, comm -> {
                    try (Tensor t = tensor(comm.backend(), dt, values(dt, tag, comm.rank(), n), n, 1)) {
                        comm.allReduce(t, op);
                        assertArrayEquals(want, read(t), dt + " " + op);
                    }
                    return null;
                });
            }
        }
    }

    @ParameterizedTest
    @ValueSource(ints = {4, 8})
    void allGatherReduceScatterBroadcast(int p) {
        int n = 6;
        double[] gathered = new double[p * n];
        for (int s = 0; s < p; s++) System.arraycopy(values(DType.F32, 5, s, n), 0, gathered, s * n, n);
        double[][] scattered = new double[p][n];
        for (int s = 0; s < p; s++) {
            double[] v = values(DType.F32, 6, s, p * n);
            for (int r = 0; r < p; r++) for (int i = 0; i < n; i++) scattered[r][i] += v[r * n + i];
        }
        for (double[] row : scattered) for (int i = 0; i < n; i++) row[i] = DType.F32.round(row[i]);
        int root = p - 1;
        double[] rootData = values(DType.BF16, 7, root, 10);
        InProcessWorld.run(p, OPTS, comm -> {
            int r = comm.rank();
            var b = comm.backend();
            try (Tensor s = tensor(b, DType.F32, values(DType.F32, 5, r, n), 2, n / 2); Tensor g = b.zeros(DType.F32, p, n)) {
                comm.allGather(s, g);
                assertArrayEquals(gathered, read(g), "allGather");
            }
            try (Tensor s = tensor(b, DType.F32, values(DType.F32, 6, r, p * n), p, n); Tensor out = b.zeros(DType.F32, n)) {
                comm.reduceScatter(s, out, ReduceOp.SUM);
                assertArrayEquals(scattered[r], read(out), "reduceScatter");
            }
            try (Tensor t = tensor(b, DType.BF16, values(DType.BF16, 7, r, 10), 2, 5)) {
                comm.broadcast(t, root);
                assertArrayEquals(rootData, read(t), "broadcast");
            }
            comm.barrier();
            return null;
        });
    }

    @ParameterizedTest
    @ValueSource(ints = {4, 8})
    void sendRecvRing(int p) {
        InProcessWorld.run(p, OPTS, comm -> {
            int r = comm.rank(), next = (r + 1) % p, prev = (r + p - 1) % p;
            var b = comm.backend();
            try (Tensor s = tensor(b, DType.F32, values(DType.F32, 9, r, 8), 2, 4); Tensor got = b.zeros(DType.F32, 2, 4)) {
                comm.send(s, next);
                comm.recv(got, prev);
                assertArrayEquals(values(DType.F32, 9, prev, 8), read(got));
            }
            return null;
        });
    }

    @ParameterizedTest
    @ValueSource(ints = {4, 8})
    void splitOrdersByKeyThenRank(int p) {
        List<int[]> members = InProcessWorld.run(p, OPTS, comm -> {
            // Two colours (even / odd); key = -rank reverses the order inside each.
            try (Communicator sub = comm.split(comm.rank() % 2, -comm.rank());
                 Tensor me = comm.backend().fromInts(new int[] {comm.rank()}, 1);
                 Tensor all = comm.backend().zeros(DType.I32, sub.size())) {
                assertEquals(p / 2, sub.size());
                sub.allGather(me, all);
                int[] got = comm.backend().toInts(all);
                assertEquals(comm.rank(), got[sub.rank()]);
                // A rank that passes a negative colour joins no group.
                Communicator none = comm.split(comm.rank() == 0 ? -1 : 0, 0);
                if (comm.rank() == 0) assertNull(none); else { assertEquals(p - 1, none.size()); none.barrier(); none.close(); }
                return got;
            }
        });
        for (int r = 0; r < p; r++) {
            int[] want = new int[p / 2];
            for (int i = 0; i < p / 2; i++) want[i] = (r % 2) + 2 * (p / 2 - 1 - i);
            assertArrayEquals(want, members.get(r), "rank " + r);
        }
    }

    // ------------------------------------------------------------------ errors

    @Test
    void badArgumentsAreRejectedBeforeCommunicating() {
        InProcessWorld.run(1, OPTS, comm -> {
            var b = comm.backend();
            try (Tensor s = b.zeros(DType.F32, 3, 2); Tensor r = b.zeros(DType.F32, 3, 2); Tensor i = b.zeros(DType.I32, 3, 2); Tensor f5 = b.zeros(DType.F32, 5)) {
                var e = assertThrows(IllegalArgumentException.class, () -> comm.allToAllV(s, new int[] {2}, r, new int[] {3}));
                assertTrue(e.getMessage().contains("sendRows [2] sums to 2 but the tensor has 3 rows"), e.getMessage());
                e = assertThrows(IllegalArgumentException.class, () -> comm.allToAllV(s, new int[] {3, 0}, r, new int[] {3}));
                assertTrue(e.getMessage().contains("sendRows has 2 entries, expected one per rank (1)"), e.getMessage());
                e = assertThrows(IllegalArgumentException.class, () -> comm.allToAllV(s, new int[] {-1}, r, new int[] {3}));
                assertTrue(e.getMessage().contains("sendRows[0] = -1"), e.getMessage());
                e = assertThrows(IllegalArgumentException.class, () -> comm.allToAll(s, i));
                assertTrue(e.getMessage().contains("dtypes must match"), e.getMessage());
                e = assertThrows(IllegalArgumentException.class, () -> comm.broadcast(s, 1));
                assertTrue(e.getMessage().contains("root must be in [0, 1)"), e.getMessage());
                e = assertThrows(IllegalArgumentException.class, () -> comm.allGather(s, f5));
                assertTrue(e.getMessage().contains("expected size * send"), e.getMessage());
            }
            comm.close();
            try (Tensor t = b.zeros(DType.F32, 1)) {
                var e = assertThrows(IllegalStateException.class, () -> comm.allReduce(t));
                assertTrue(e.getMessage().contains("is closed"), e.getMessage());
            }
            return null;
        });
    }

    @Test
    void mismatchedSplitsBetweenRanksNameBothSides() {
        var e = assertThrows(CommunicationException.class, () -> InProcessWorld.run(2, OPTS, comm -> {
            var b = comm.backend();
            // rank 0 sends 1 row to rank 1, but rank 1 expects 2.
            int[] send = comm.rank() == 0 ? new int[] {1, 1} : new int[] {1, 1};
            int[] recv = comm.rank() == 0 ? new int[] {1, 1} : new int[] {2, 1};
            try (Tensor s = b.zeros(DType.F32, 2, 2); Tensor r = b.zeros(DType.F32, RankData.sum(recv), 2)) {
                comm.allToAllV(s, send, r, recv);
            }
            return null;
        }));
        String all = InProcessWorld.rankFailures(e).toString();
        assertTrue(all.contains("rank 1 expects recvRows[0] = 2 rows from rank 0, which sends sendRows[1] = 1"), all);
    }

    // ------------------------------------------------------------------ peer windows

    /**
     * Three exchanges through windows: every rank stores one row into every rank's window (its own included) at the row
     * of its rank, with values that differ per exchange; after await each window holds exactly the rows stored into it
     * in that exchange, and the window's tensor of another rank is the same memory that rank reads.
     */
    @Test
    void peerWindowsHoldWhatEveryRankStoredInThatExchange() {
        int n = 3, cols = 4;
        InProcessWorld.run(n, comm -> {
            var b = comm.backend();
            try (var w = comm.openWindow((long) n * cols * DType.F64.bytes())) {
                assertNotNull(w, "CPU ranks share their windows");
                for (int t = 1; t <= 3; t++) {
                    double[] rows = new double[n * cols];
                    int[] dest = new int[2 * n];
                    for (int q = 0; q < n; q++) {
                        for (int c = 0; c < cols; c++) rows[q * cols + c] = 1000 * t + 100 * comm.rank() + 10 * q + c;
                        dest[2 * q] = q;               // row q goes to rank q ...
                        dest[2 * q + 1] = comm.rank(); // ... at the row of this rank
                    }
                    Tensor[] dsts = new Tensor[n];
                    for (int q = 0; q < n; q++) dsts[q] = w.tensor(q, DType.F64, n, cols);
                    w.open();
                    try (Tensor src = b.fromDoubles(DType.F64, rows, n, cols); Tensor d = b.fromInts(dest, n, 2)) {
                        b.scatterRowsTo(src, d, dsts);
                    }
                    w.publish();
                    w.await();
                    double[] got = dsts[comm.rank()].toDoubles();
                    for (int p = 0; p < n; p++) {
                        for (int c = 0; c < cols; c++) {
                            assertEquals(1000 * t + 100 * p + 10 * comm.rank() + c, got[p * cols + c], "exchange " + t + ": row from rank " + p);
                        }
                    }
                }
            }
            return null;
        });
    }

    /** Windows of different sizes would let a rank store past a smaller peer's: every rank refuses, naming each size. */
    @Test
    void windowsOfDifferentSizesAreRefusedOnEveryRankNamingTheSizes() {
        var e = assertThrows(CommunicationException.class, () -> InProcessWorld.run(3, comm -> {
            try (var w = comm.openWindow(comm.rank() == 2 ? 128 : 64)) {
                fail("opened a window of " + w.bytes() + " bytes");
            }
            return null;
        }));
        var failures = InProcessWorld.rankFailures(e);
        assertEquals(3, failures.size(), failures.toString());
        for (Throwable f : failures) {
            assertInstanceOf(IllegalArgumentException.class, f);
            assertTrue(f.getMessage().contains("rank 0: 64, rank 1: 64, rank 2: 128 bytes"), f.getMessage());
        }
    }

    @Test
    void aWindowsTensorMustFitIt() {
        InProcessWorld.run(2, comm -> {
            try (var w = comm.openWindow(64)) {
                assertEquals(16, w.tensor(1 - comm.rank(), DType.F32, 4, 4).numel());
                var tooBig = assertThrows(IllegalArgumentException.class, () -> w.tensor(1 - comm.rank(), DType.F32, 5, 4));
                assertTrue(tooBig.getMessage().contains("64 bytes cannot hold"), tooBig.getMessage());
            }
            return null;
        });
    }

    @Test
    void aRankThatNeverOpensItsWindowFailsTheOthersWithinTheTimeoutNamingIt() {
        long t0 = System.nanoTime();
        var e = assertThrows(CommunicationException.class, () -> InProcessWorld.run(3, CommOptions.withTimeout(Duration.ofMillis(400)), comm -> {
            try (var w = comm.openWindow(64)) {
                w.open();
                w.publish();
                w.await();
                if (comm.rank() == 1) Thread.sleep(30_000);   // rank 1 hangs
                w.open();
                w.publish();
                w.await();
            }
            return null;
        }));
        long ms = (System.nanoTime() - t0) / 1_000_000;
        assertTrue(ms < 5_000, "took " + ms + " ms");
        int survivors = 0;
        for (Throwable f : InProcessWorld.rankFailures(e)) {
            if (f instanceof InterruptedException) continue;   // rank 1 itself
            survivors++;
            assertTrue(f.getMessage().contains("peer window open #2") && f.getMessage().contains("world rank(s) [1]"), f.getMessage());
        }
        assertEquals(2, survivors);
    }

    @Test
    void scatterRowsToRejectsRowsOutsideTheirDestination() {
        var b = new dev.moe4j.core.cpu.CpuBackend();
        try (Tensor src = b.fromDoubles(DType.F32, new double[] {1, 2, 3, 4}, 2, 2); Tensor d0 = b.zeros(DType.F32, 2, 2);
             Tensor bad = b.fromInts(new int[] {0, 1, 0, 2}, 2, 2); Tensor skip = b.fromInts(new int[] {-1, 0, 0, 0}, 2, 2)) {
            var e = assertThrows(IllegalArgumentException.class, () -> b.scatterRowsTo(src, bad, new Tensor[] {d0}));
            assertTrue(e.getMessage().contains("dest[1] = row 2 of dsts[0], which has 2 rows"), e.getMessage());
            b.scatterRowsTo(src, skip, new Tensor[] {d0});   // row 0 skipped, row 1 to row 0
            assertArrayEquals(new float[] {3, 4, 0, 0}, d0.toFloats());
        }
    }

    // ------------------------------------------------------------------ watchdog

    @Test
    void hungRankMakesOthersFailWithinTimeoutNamingIt() {
        long t0 = System.nanoTime();
        var e = assertThrows(CommunicationException.class, () -> InProcessWorld.run(4, CommOptions.withTimeout(Duration.ofMillis(400)), comm -> {
            try (Tensor t = comm.backend().fromDoubles(DType.F32, new double[] {1, 2}, 2)) {
                comm.allReduce(t);                       // #0: all arrive
                if (comm.rank() == 2) Thread.sleep(30_000);  // rank 2 hangs
                comm.allReduce(t);                       // #1
            }
            return null;
        }));
        long ms = (System.nanoTime() - t0) / 1_000_000;
        assertTrue(ms < 5_000, "took " + ms + " ms");
        List<Throwable> fails = InProcessWorld.rankFailures(e);
        int survivors = 0;
        for (Throwable f : fails) {
            if (f instanceof InterruptedException) continue;       // rank 2 itself, interrupted by the runner
            survivors++;
            assertInstanceOf(CommTimeoutException.class, f, f.toString());
            assertTrue(f.getMessage().contains("allReduce #1") && f.getMessage().contains("world rank(s) [2]"), f.getMessage());
            assertArrayEquals(new int[] {2}, ((CommTimeoutException) f).missingRanks());
        }
        assertEquals(3, survivors, fails.toString());
    }

    @Test
    void failedRankMakesOthersFailFastNamingIt() {
        long t0 = System.nanoTime();
        var e = assertThrows(CommunicationException.class, () -> InProcessWorld.run(4, CommOptions.withTimeout(Duration.ofSeconds(30)), comm -> {
            comm.barrier();
            if (comm.rank() == 3) throw new IllegalStateException("boom on rank 3");
            try (Tensor t = comm.backend().zeros(DType.F32, 4)) {
                comm.allReduce(t, ReduceOp.MAX);
            }
            return null;
        }));
        long ms = (System.nanoTime() - t0) / 1_000_000;
        assertTrue(ms < 5_000, "took " + ms + " ms, the timeout is 30 s: others must not wait for it");
        assertTrue(e.getMessage().startsWith("rank 3 of 4 failed first"), e.getMessage());
        assertInstanceOf(IllegalStateException.class, e.getCause());
        List<Throwable> fails = InProcessWorld.rankFailures(e);
        assertEquals(4, fails.size());
        for (Throwable f : fails.subList(1, 4)) {
            assertTrue(f.getMessage().contains("allReduce #1") && f.getMessage().contains("rank 3 failed")
                    && f.getMessage().matches("(?s).*still waiting for world rank\\(s\\) \\[[0-9, ]*3\\].*"), f.getMessage());
        }
    }

    @Test
    void recvFromASilentPeerTimesOutNamingIt() {
        var e = assertThrows(CommunicationException.class, () -> InProcessWorld.run(3, CommOptions.withTimeout(Duration.ofMillis(300)), comm -> {
            if (comm.rank() == 0) {
                try (Tensor t = comm.backend().zeros(DType.F32, 2)) { comm.recv(t, 2); }
            }
            return null;
        }));
        CommTimeoutException t = assertInstanceOf(CommTimeoutException.class, e.getCause());
        assertArrayEquals(new int[] {2}, t.missingRanks());
        assertTrue(t.getMessage().startsWith("recv #0 from rank 2"), t.getMessage());
    }

    @Test
    void mismatchedCollectivesAreReported() {
        var e = assertThrows(CommunicationException.class, () -> InProcessWorld.run(2, OPTS, comm -> {
            if (comm.rank() == 0) comm.barrier();
            else try (Tensor t = comm.backend().zeros(DType.F32, 1)) { comm.allReduce(t); }
            return null;
        }));
        assertTrue(InProcessWorld.rankFailures(e).toString().contains("every rank must call the same collectives"), e.toString());
    }
}
