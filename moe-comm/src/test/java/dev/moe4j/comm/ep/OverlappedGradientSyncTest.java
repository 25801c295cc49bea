package dev.moe4j.comm.ep;

import dev.moe4j.comm.ForwardingCommunicator;
import dev.moe4j.comm.InProcessWorld;
import dev.moe4j.core.comm.CommWork;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.comm.ProcessGroups;
import dev.moe4j.core.comm.ReduceOp;
import dev.moe4j.core.comm.RowBlocks;
import dev.moe4j.core.model.ModelSpec;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.train.GradientSync;
import dev.moe4j.core.train.Trainer;
import org.junit.jupiter.api.Test;

import java.util.ArrayList;
import java.util.List;

import static dev.moe4j.comm.ep.EpFixtures.SEED;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * Collectives that overlap the backward (a deferring communicator runs each only at its await, the latest a GPU
 * side stream could finish): the expert layer's reverse all-to-all beside the experts' weight gradients, and the
 * gradient all-reduces. each block's buckets start when the block's backward is queued
 * and complete only when awaited. A communicator that performs an async all-reduce only at its await (the
 * latest a GPU side stream could finish) must still give exactly the single-rank step, so GradientSync must await
 * every bucket before the optimizer reads the gradients; and the buckets must start block by block, last block
 * first, during the backward.
 */
class OverlappedGradientSyncTest {
    /**
     * Delegates everything; the asynchronous calls are deferred to await and logged, and so are the exchanges.
     */
    static final class Deferring extends ForwardingCommunicator {
        final List<String> log;
        final boolean windows;   // offer inner's peer windows (else none: the expert layers move rows by the collectives)

        Deferring(Communicator inner, List<String> log) { this(inner, log, false); }

        Deferring(Communicator inner, List<String> log, boolean windows) {
            super(inner);
            this.log = log;
            this.windows = windows;
        }

        @Override public String describe() { return "deferring " + inner.describe(); }
        @Override public void allToAll(Tensor send, Tensor recv) { log.add("allToAll"); inner.allToAll(send, recv); }
        @Override public void allToAllV(Tensor send, int[] sr, Tensor recv, int[] rr) { log.add("allToAllV"); inner.allToAllV(send, sr, recv, rr); }
        @Override public void allGather(Tensor send, Tensor recv) { log.add("allGather"); inner.allGather(send, recv); }

        @Override
        public void exchangeRows(Tensor send, RowBlocks sb, Tensor recv, RowBlocks rb) {
            log.add("exchangeRows");
            inner.exchangeRows(send, sb, recv, rb);
        }

        @Override
        public CommWork exchangeRowsAsync(Tensor send, RowBlocks sb, Tensor recv, RowBlocks rb) {
            log.add("exchange queued");
            return () -> {
                log.add("exchange awaited");
                log.add("exchangeRows");
                inner.exchangeRows(send, sb, recv, rb);
            };
        }
        @Override public Communicator split(int color, int key) { return new Deferring(inner.split(color, key), log, windows); }

        @Override
        public dev.moe4j.core.comm.PeerWindow openWindow(long bytes) {
            if (!windows) return null;
            log.add("openWindow");
            return inner.openWindow(bytes);
        }
        @Override public void close() { inner.close(); }

        @Override
        public CommWork allToAllVAsync(Tensor send, int[] sendRows, Tensor recv, int[] recvRows) {
            log.add("exchange queued");
            int[] sr = sendRows.clone(), rr = recvRows.clone();
            return () -> {
                log.add("exchange awaited");
                log.add("allToAllV");
                inner.allToAllV(send, sr, recv, rr);
            };
        }

        @Override
        public CommWork allReduceAsync(Tensor t, ReduceOp op) {
            log.add("start " + t.numel());
            return () -> {
                log.add("await " + t.numel());
                inner.allReduce(t, op);
            };
        }
    }

    @Test
    void deferredBucketsStillGiveTheSingleRankStep() {
        deferredRunMatches(EpFixtures.spec(true, 1, false, false));    // dropless
        deferredRunMatches(EpFixtures.spec(false, 2, false, false));   // capacity, top-2
    }

    private static void deferredRunMatches(ModelSpec spec) {
        List<List<String>> logs = new ArrayList<>();
        for (int r = 0; r < 4; r++) logs.add(java.util.Collections.synchronizedList(new ArrayList<>()));
        List<EpFixtures.RankState> ranks = InProcessWorld.run(4, comm -> {
            Communicator world = new Deferring(comm, logs.get(comm.rank()));
            try (ProcessGroups groups = new ProcessGroups(world)) {
                ModelContext ctx = new ModelContext(comm.backend(), DType.F64, SEED);
                Trainer t = EpFixtures.trainer(ctx, spec, groups, 2, 1);
                return EpFixtures.state(t, EpFixtures.run(t, 1));
            }
        });
        Trainer ref = EpFixtures.reference(spec, 4);
        EpFixtures.assertMatches(EpFixtures.state(ref, EpFixtures.run(ref, 1)), ranks, 1e-9, "deferred overlapped collectives at EP 2, " + spec.moe());
        List<String> log = logs.get(0);
        List<String> bucketLog = log.stream().filter(s -> s.startsWith("start") || s.startsWith("await")).toList();
        int firstAwait = bucketLog.indexOf(bucketLog.stream().filter(s -> s.startsWith("await")).findFirst().orElseThrow());
        long starts = bucketLog.stream().filter(s -> s.startsWith("start")).count();
        long awaits = bucketLog.stream().filter(s -> s.startsWith("await")).count();
        assertTrue(starts >= 3, "several buckets: " + log);
        assertEquals(starts, awaits, "every started bucket is awaited: " + log);
        assertEquals(starts, firstAwait, "all buckets start before the first await (during the backward): " + log);
        assertTrue(log.contains("exchange queued") && log.indexOf("exchange queued") < log.indexOf("exchange awaited"),
                "the expert layer's reverse all-to-all is queued, then awaited: " + log);
    }

    @Test
    void blockNamesParse() {
        assertEquals(7, GradientSync.blockOf("h.7.attn.qkv.weight"));
        assertEquals(12, GradientSync.blockOf("h.12"));
        assertEquals(-1, GradientSync.blockOf("wte"));
        assertEquals(-1, GradientSync.blockOf("lnf.weight"));
        assertEquals(-1, GradientSync.blockOf("h.x.w"));
    }
}
