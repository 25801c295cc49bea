package dev.moe4j.comm;

import dev.moe4j.core.comm.CommOptions;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.CsvSource;

import java.time.Duration;
import java.util.Arrays;

import static dev.moe4j.comm.RankData.*;
import static org.junit.jupiter.api.Assertions.*;

/** The hierarchical all-to-all equals the flat one bit for bit (and both equal the serial reference). */
class HierarchicalAllToAllTest {
    static final CommOptions OPTS = CommOptions.withTimeout(Duration.ofSeconds(20));

    @ParameterizedTest
    @CsvSource({"4,1", "4,2", "4,4", "8,1", "8,2", "8,4"})
    void variableSplitsEqualFlat(int p, int nodeSize) {
        int cols = 3;
        for (DType dt : new DType[] {DType.BF16, DType.F32, DType.I32}) {
            long tag = 1000 + p * 10L + nodeSize + dt.ordinal() * 100;
            int[][] counts = counts(p, tag);
            InProcessWorld.run(p, OPTS, comm -> {
                int r = comm.rank();
                int[] recvRows = column(counts, r);
                var b = comm.backend();
                try (HierarchicalCommunicator h = new HierarchicalCommunicator(comm, nodeSize);
                     Tensor send = tensor(b, dt, values(dt, tag, r, sum(counts[r]) * cols), sum(counts[r]), cols);
                     Tensor flat = b.zeros(dt, sum(recvRows), cols);
                     Tensor hier = b.zeros(dt, sum(recvRows), cols)) {
                    assertEquals(nodeSize, h.intraNode().size());
                    assertEquals(p / nodeSize, h.interNode().size());
                    comm.allToAllV(send, counts[r], flat, recvRows);
                    h.allToAllV(send, counts[r], hier, recvRows);
                    double[] want = allToAllReference(dt, tag, counts, cols, r);
                    assertArrayEquals(want, read(flat), "flat, rank " + r);
                    assertBitwiseEqual(read(flat), read(hier), dt + " rank " + r + " node size " + nodeSize);
                }
                return null;
            });
        }
    }

    @ParameterizedTest
    @CsvSource({"4,1", "4,2", "4,4", "8,1", "8,2", "8,4"})
    void equalSplitsEqualFlat(int p, int nodeSize) {
        int n = 3, cols = 4;
        long tag = 77;
        InProcessWorld.run(p, OPTS, comm -> {
            int r = comm.rank();
            var b = comm.backend();
            try (HierarchicalCommunicator h = new HierarchicalCommunicator(comm, nodeSize);
                 Tensor send = tensor(b, DType.BF16, values(DType.BF16, tag, r, p * n * cols), p * n, cols);
                 Tensor flat = b.zeros(DType.BF16, p * n, cols);
                 Tensor hier = b.zeros(DType.BF16, p * n, cols)) {
                comm.allToAll(send, flat);
                h.allToAll(send, hier);
                assertBitwiseEqual(read(flat), read(hier), "rank " + r);
                int[][] counts = new int[p][p];
                for (int[] c : counts) Arrays.fill(c, n);
                assertArrayEquals(allToAllReference(DType.BF16, tag, counts, cols, r), read(hier));
            }
            return null;
        });
    }

    @ParameterizedTest
    @CsvSource({"4,2", "8,4"})
    void allEmptyExchangeWorks(int p, int nodeSize) {
        InProcessWorld.run(p, OPTS, comm -> {
            var b = comm.backend();
            try (HierarchicalCommunicator h = new HierarchicalCommunicator(comm, nodeSize);
                 Tensor send = b.zeros(DType.F32, 0, 5); Tensor recv = b.zeros(DType.F32, 0, 5)) {
                h.allToAllV(send, new int[p], recv, new int[p]);
            }
            return null;
        });
    }

    @org.junit.jupiter.api.Test
    void nodeSizeMustDivideWorld() {
        var e = assertThrows(dev.moe4j.core.comm.CommunicationException.class, () -> InProcessWorld.run(4, OPTS, comm -> {
            new HierarchicalCommunicator(comm, 3);
            return null;
        }));
        assertTrue(e.getCause().getMessage().contains("nodeSize must be in [1, 4] and divide the world size 4, got 3"), e.getCause().getMessage());
    }

    static void assertBitwiseEqual(double[] want, double[] got, String what) {
        assertEquals(want.length, got.length, what);
        for (int i = 0; i < want.length; i++) {
            assertEquals(Double.doubleToRawLongBits(want[i]), Double.doubleToRawLongBits(got[i]), what + " element " + i);
        }
    }
}
