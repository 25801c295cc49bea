package dev.moe4j.comm;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.comm.CommOptions;
import dev.moe4j.core.comm.CommWork;
import dev.moe4j.core.comm.CommunicationException;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.comm.RowBlocks;
import dev.moe4j.core.comm.TimedCommunicator;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

import java.time.Duration;
import java.util.List;
import java.util.function.Function;

import static dev.moe4j.comm.RankData.*;
import static org.junit.jupiter.api.Assertions.*;

/**
 * {@link Communicator#exchangeRows} against a serial reference: the in-process communicator's own exchange, the
 * SPI's default (pack, allToAllV, unpack) over it and over the hierarchical all-to-all, blocking and asynchronous;
 * and the argument and pairing checks.
 */
class ExchangeRowsTest {
    static final CommOptions OPTS = CommOptions.withTimeout(Duration.ofSeconds(20));
    static final DType[] DTYPES = {DType.F32, DType.BF16, DType.I32, DType.F64};

    /** Delegates all but the block exchange, so that the SPI's default runs (over the delegate's allToAllV). */
    static final class Plain extends ForwardingCommunicator {
        Plain(Communicator inner) { super(inner); }

        @Override public String describe() { return "plain " + inner.describe(); }
        @Override public Communicator split(int color, int key) { return new Plain(inner.split(color, key)); }
        @Override public void close() { }
    }

    @ParameterizedTest
    @ValueSource(ints = {2, 4})
    void inProcessExchangeEqualsTheSerialReference(int p) {
        exchangeMatches(p, c -> c, false);
        exchangeMatches(p, c -> c, true);
    }

    @ParameterizedTest
    @ValueSource(ints = {2, 4})
    void theDefaultExchangeEqualsTheSerialReference(int p) {
        exchangeMatches(p, Plain::new, false);
        exchangeMatches(p, Plain::new, true);
    }

    /** The hierarchical communicator keeps the default, over its own two-level all-to-all. */
    @Test
    void theHierarchicalExchangeEqualsTheSerialReference() {
        exchangeMatches(4, c -> new HierarchicalCommunicator(c, 2), false);
        exchangeMatches(4, c -> new HierarchicalCommunicator(c, 1), true);
    }

    @Test
    void theTimedCommunicatorForwardsAndTimesTheExchange() {
        exchangeMatches(2, TimedCommunicator::new, true);
        InProcessWorld.run(2, OPTS, comm -> {
            TimedCommunicator t = new TimedCommunicator(comm);
            try (Tensor s = comm.backend().fromDoubles(DType.F32, new double[] {1, 2}, 2, 1);
                 Tensor r = comm.backend().zeros(DType.F32, 2, 1)) {
                int other = 1 - comm.rank();
                t.exchangeRows(s, new RowBlocks(new int[] {other}, new int[] {0}, new int[] {2}), r,
                        new RowBlocks(new int[] {other}, new int[] {0}, new int[] {2}));
                t.exchangeRowsAsync(s, RowBlocks.NONE, r, RowBlocks.NONE).await();
                assertEquals(2, t.calls());
                assertArrayEquals(new double[] {1, 2}, read(r));
            }
            return null;
        });
    }

    /** Every dtype; async: exchangeRowsAsync, awaited before reading. */
    private static void exchangeMatches(int p, Function<Communicator, Communicator> wrap, boolean async) {
        int cols = 3;
        for (DType dt : DTYPES) {
            long tag = 70 + p * 10 + dt.ordinal();
            BlockPlan plan = blockPlan(p, tag);
            InProcessWorld.run(p, OPTS, comm -> {
                int r = comm.rank();
                Communicator c = wrap.apply(comm);
                try (Tensor send = tensor(c.backend(), dt, blockSendValues(dt, tag, plan, cols, r), plan.sendTensorRows()[r], cols);
                     Tensor recv = tensor(c.backend(), dt, blockRecvInitial(dt, tag, plan, cols, r), plan.recvTensorRows()[r], cols)) {
                    if (async) {
                        CommWork w = c.exchangeRowsAsync(send, plan.send()[r], recv, plan.recv()[r]);
                        w.await();
                    } else {
                        c.exchangeRows(send, plan.send()[r], recv, plan.recv()[r]);
                    }
                    assertArrayEquals(blockReference(dt, tag, plan, cols, r), read(recv), c.describe() + " " + dt + " rank " + r);
                } finally {
                    if (c != comm && c instanceof HierarchicalCommunicator h) h.close();
                }
                return null;
            });
        }
    }

    @Test
    void aPairingMismatchFailsEveryRankNamingBothSides() {
        // rank 0 sends rank 1 blocks of 2 and 1 rows; rank 1 expects 1 and 2
        var e = assertThrows(CommunicationException.class, () -> InProcessWorld.run(2, OPTS, comm -> {
            Backend b = comm.backend();
            try (Tensor s = b.zeros(DType.F32, 3, 2); Tensor r = b.zeros(DType.F32, 3, 2)) {
                if (comm.rank() == 0) {
                    comm.exchangeRows(s, new RowBlocks(new int[] {1, 1}, new int[] {0, 2}, new int[] {2, 1}), r, RowBlocks.NONE);
                } else {
                    comm.exchangeRows(s, RowBlocks.NONE, r, new RowBlocks(new int[] {0, 0}, new int[] {0, 1}, new int[] {1, 2}));
                }
            }
            return null;
        }));
        List<Throwable> failures = InProcessWorld.rankFailures(e);
        assertEquals(2, failures.size(), "both ranks fail: " + failures);
        for (Throwable t : failures) {
            assertInstanceOf(IllegalArgumentException.class, t);
            assertTrue(t.getMessage().contains("rank 0 sends rank 1 blocks of [2, 1] rows, but rank 1 lists blocks of [1, 2] rows"), t.getMessage());
        }
        // a missing block pairs with nothing: the same failure
        var missing = assertThrows(CommunicationException.class, () -> InProcessWorld.run(2, OPTS, comm -> {
            Backend b = comm.backend();
            try (Tensor s = b.zeros(DType.F32, 3, 2); Tensor r = b.zeros(DType.F32, 3, 2)) {
                RowBlocks none = RowBlocks.NONE, one = new RowBlocks(new int[] {1 - comm.rank()}, new int[] {0}, new int[] {2});
                comm.exchangeRows(s, one, r, comm.rank() == 0 ? one : none);
            }
            return null;
        }));
        assertTrue(missing.getCause().getMessage().contains("rank 0 sends rank 1 blocks of [2] rows, but rank 1 lists blocks of [] rows"), missing.getCause().getMessage());
    }

    @Test
    void badArgumentsAreNamed() {
        InProcessWorld.run(2, OPTS, comm -> {
            Backend b = comm.backend();
            try (Tensor s = b.zeros(DType.F32, 4, 2); Tensor r = b.zeros(DType.F32, 4, 2); Tensor r3 = b.zeros(DType.F32, 4, 3);
                 Tensor rb = b.zeros(DType.BF16, 4, 2)) {
                RowBlocks none = RowBlocks.NONE;
                assertMessage(() -> comm.exchangeRows(s, new RowBlocks(new int[] {2}, new int[] {0}, new int[] {1}), r, none),
                        "sendBlocks block 0 names peer 2, not in [0, 2)");
                assertMessage(() -> comm.exchangeRows(s, none, r, new RowBlocks(new int[] {0}, new int[] {3}, new int[] {2})),
                        "recvBlocks block 0 (rows [3, 5)) does not fit in recv's 4 rows");
                assertMessage(() -> comm.exchangeRows(s, new RowBlocks(new int[] {0}, new int[] {0}, new int[] {-1}), r, none),
                        "sendBlocks block 0 has -1 rows");
                assertMessage(() -> comm.exchangeRows(s, none, r, new RowBlocks(new int[] {0, 1}, new int[] {0, 1}, new int[] {2, 2})),
                        "recvBlocks 0 (rows [0, 2)) and 1 (rows [1, 3)) overlap");
                assertMessage(() -> comm.exchangeRows(s, none, r3, none), "must have the same last dimension");
                assertMessage(() -> comm.exchangeRows(s, none, rb, none), "dtypes must match");
                assertMessage(() -> comm.exchangeRows(s, null, r, none), "sendBlocks is null");
                int me = comm.rank();
                assertMessage(() -> comm.exchangeRows(s, new RowBlocks(new int[] {me}, new int[] {0}, new int[] {2}), r,
                                new RowBlocks(new int[] {me}, new int[] {0}, new int[] {3})),
                        "rank " + me + " sends rank " + me + " blocks of [2] rows, but rank " + me + " lists blocks of [3] rows");
                assertMessage(() -> new RowBlocks(new int[1], new int[2], new int[1]), "one entry per block, got lengths 1, 2, 1");
                // every rank still meets the other in a good exchange afterwards (the checks ran before communicating)
                comm.exchangeRows(s, none, r, none);
            }
            return null;
        });
    }

    private static void assertMessage(org.junit.jupiter.api.function.Executable call, String part) {
        var e = assertThrows(IllegalArgumentException.class, call);
        assertTrue(e.getMessage().contains(part), "expected \"" + part + "\" in: " + e.getMessage());
    }
}
