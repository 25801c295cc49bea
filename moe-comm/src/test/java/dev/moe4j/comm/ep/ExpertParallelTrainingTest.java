package dev.moe4j.comm.ep;

import dev.moe4j.core.model.ModelSpec;
import dev.moe4j.core.train.Trainer;
import org.junit.jupiter.api.Test;

import java.util.List;

import static dev.moe4j.comm.ep.EpFixtures.*;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * Expert + data parallel GPT-MoE training on in-process CPU ranks equals the single-process run on the same
 * global batch. The single process runs the W ranks' shares as W micro-batches (the function the parallel run
 * computes: l_aux and capacity are per rank, as in DeepSpeed), and the parallel trainer draws each micro-batch's
 * random numbers (Jitter, RTS, second-expert sampling) where the single process draws them.
 *
 * <p>Tolerance, float64 throughout: the runs differ only in the order of floating-point sums (expert gradients
 * summed over the ranks' tokens and the all-reduce, the norm summed in pieces), so gradients and weights after a
 * step agree to 1e-12 relative to each tensor's largest entry, losses to 1e-12 relative; over 20 Adam steps the
 * loss curve agrees to 1e-9 relative (Adam amplifies rounding where a second moment is near zero). In practice the
 * losses come out bit-identical.
 */
class ExpertParallelTrainingTest {
    static final double STEP_TOL = 1e-12, CURVE_TOL = 1e-9;

    private static void oneStepMatches(ModelSpec spec, int world, int ep) {
        Trainer ref = reference(spec, world);
        List<Double> refLoss = run(ref, 1);
        RankState expected = state(ref, refLoss);
        List<RankState> ranks = distributed(spec, world, ep, 1, 1);
        for (int r = 0; r < world; r++) {
            assertEquals(refLoss.get(0), ranks.get(r).losses().get(0), STEP_TOL * refLoss.get(0), "loss on rank " + r);
        }
        assertMatches(expected, ranks, STEP_TOL, "world " + world + " ep " + ep);
    }

    @Test
    void capacityModeStepAtEp2And4InAWorldOf4EqualsTheSingleRankStep() {
        ModelSpec spec = spec(false, 1, false, true);
        oneStepMatches(spec, 4, 2);
        oneStepMatches(spec, 4, 4);
    }

    @Test
    void capacityModeDropsTokensInTheseTests() {
        ModelSpec spec = spec(false, 1, false, true);
        Trainer ref = reference(spec, 4);
        var m = ref.trainStep(true);
        assertTrue(m.routing().get(0).droppedFraction() > 0, "capacity factor 1 without minimum capacity must drop some of 16 tokens over 8 experts");
    }

    @Test
    void capacityModeTop2StepEqualsTheSingleRankStep() {
        ModelSpec spec = spec(false, 2, false, true);
        oneStepMatches(spec, 4, 2);
        oneStepMatches(spec, 4, 4);
    }

    @Test
    void droplessTop2ResidualStepAtEp2And4EqualsTheSingleRankStep() {
        ModelSpec spec = spec(true, 2, true, true);
        oneStepMatches(spec, 4, 2);
        oneStepMatches(spec, 4, 4);
    }

    /**
     * Gradients left NaN before the step (as a skipped step leaves them) must not reach the all-reduces or the
     * optimizer: each gradient's first write overwrites them, and an expert that gets no tokens from any rank
     * (rank 3 still all-reduces its shard) contributes zeros.
     */
    @Test
    void staleGradientsAndAnExpertWithoutTokensStillGiveTheSingleRankStep() {
        ModelSpec spec = spec(true, 1, false, false);
        Trainer ref = reference(spec, 4);
        starveLastExpert(ref);
        RankState expected = state(ref, run(ref, 1));
        record Got(RankState state, int[] counts) {}
        List<Got> got = dev.moe4j.comm.InProcessWorld.run(4, comm -> {
            try (dev.moe4j.core.comm.ProcessGroups groups = new dev.moe4j.core.comm.ProcessGroups(comm)) {
                var ctx = new dev.moe4j.core.nn.ModelContext(comm.backend(), dev.moe4j.core.tensor.DType.F64, SEED);
                Trainer t = trainer(ctx, spec, groups, 4, 1);
                starveLastExpert(t);
                comm.backend().fill(ctx.params().grad(), Double.NaN);
                var m = t.trainStep(true);
                return new Got(state(t, List.of(m.loss())), m.routing().get(0).tokensPerExpert());
            }
        });
        assertMatches(expected, got.stream().map(Got::state).toList(), STEP_TOL, "NaN gradients before the step");
        for (Got g : got) assertEquals(0, g.counts()[EXPERTS - 1], "no rank routes a token to the last expert");
    }

    /** Top-1 never picks the last expert: its gate row is zero and the row before is minus the one before that. */
    private static void starveLastExpert(Trainer t) {
        var w = t.model().context().params().get("h.1.ffn.gate.weight").master();
        double[] g = w.toDoubles();
        int m = g.length / EXPERTS;
        for (int j = 0; j < m; j++) {
            g[(EXPERTS - 2) * m + j] = -g[(EXPERTS - 3) * m + j];
            g[(EXPERTS - 1) * m + j] = 0;
        }
        try (var src = w.backend().fromDoubles(w.dtype(), g, w.shape().dims())) { w.backend().copy(src, w); }
    }

    /**
     * BF16 gradients of a bf16 model on 4 ranks at EP 2 follow the single-rank run with BF16 gradients: each rank
     * rounds its own share to bf16 and the all-reduce sums the shares (in the in-process communicator: in float64,
     * rounded once), where the single rank rounds after each of its 4 micro-batches, and values written before the
     * last micro-batch can exceed the final gradient where micro-batches cancel. So step 0's gradients agree to a few
     * bf16 roundings: within 2^-5 of each tensor's largest entry (measured: at most 1.3e-2); 3 steps' losses within
     * 1e-2 relative (measured: 5e-6).
     * (Weights are not compared: Adam's first step moves each weight by about lr * sign(gradient), so a gradient near
     * zero may move it either way.)
     */
    @Test
    void bf16GradientsAtEp2FollowTheSingleRankBf16GradientRun() {
        ModelSpec spec = spec(true, 2, false, true);
        Trainer ref = trainer(bf16Gradients(new dev.moe4j.core.cpu.CpuBackend()), spec, null, 1, 4);
        RankState expected = state(ref, run(ref, 1));
        List<Double> refLoss = new java.util.ArrayList<>(expected.losses());
        refLoss.addAll(run(ref, 2));
        List<RankState> ranks = dev.moe4j.comm.InProcessWorld.run(4, comm -> {
            try (dev.moe4j.core.comm.ProcessGroups groups = new dev.moe4j.core.comm.ProcessGroups(comm)) {
                var ctx = bf16Gradients(comm.backend());
                Trainer t = trainer(ctx, spec, groups, 2, 1);
                assertEquals(dev.moe4j.core.tensor.DType.BF16, ctx.params().grad().dtype());
                RankState s = state(t, run(t, 1));   // step 0's gradients
                List<Double> losses = new java.util.ArrayList<>(s.losses());
                losses.addAll(run(t, 2));
                return new RankState(s.grads(), s.weights(), s.shards(), losses);
            }
        });
        assertMatches(expected, ranks, Math.scalb(1.0, -5), false, "bf16 gradients, world 4 ep 2");
        for (RankState r : ranks) {
            for (int i = 0; i < 3; i++) assertEquals(refLoss.get(i), r.losses().get(i), 1e-2 * refLoss.get(i), "bf16-gradient loss at step " + i);
        }
    }

    private static dev.moe4j.core.nn.ModelContext bf16Gradients(dev.moe4j.core.backend.Backend b) {
        var ctx = new dev.moe4j.core.nn.ModelContext(b, dev.moe4j.core.tensor.DType.BF16, SEED);
        ctx.setGradDType(dev.moe4j.core.tensor.DType.BF16);
        return ctx;
    }

    @Test
    void worldOf8AtEp2And8EqualsTheSingleRankStep() {
        oneStepMatches(spec(true, 1, false, false), 8, 8);
        oneStepMatches(spec(false, 2, false, true), 8, 2);
    }

    @Test
    void dataParallelOnlyAtEp1EqualsTheSingleRankStep() {
        oneStepMatches(spec(true, 1, false, true), 4, 1);
    }

    @Test
    void twentyStepsGiveTheSameLossCurve() {
        for (boolean dropless : new boolean[] {false, true}) {
            ModelSpec spec = spec(dropless, 1, false, true);
            List<Double> expected = run(reference(spec, 4), 20);
            List<RankState> ranks = distributed(spec, 4, 2, 1, 20);
            for (RankState r : ranks) {
                for (int i = 0; i < 20; i++) {
                    assertEquals(expected.get(i), r.losses().get(i), CURVE_TOL * expected.get(i), (dropless ? "dropless" : "capacity") + " loss at step " + i);
                }
            }
            assertTrue(expected.get(19) < expected.get(0) - 0.1, "the model must learn: " + expected);
        }
    }

    @Test
    void twoMicroBatchesPerRankEqualTheSameGlobalBatch() {
        ModelSpec spec = spec(true, 2, false, true);
        List<Double> expected = run(reference(spec, 4), 3);
        List<RankState> ranks = distributed(spec, 2, 2, 2, 3);
        for (RankState r : ranks) {
            for (int i = 0; i < 3; i++) assertEquals(expected.get(i), r.losses().get(i), CURVE_TOL * expected.get(i), "loss at step " + i);
        }
    }

    @Test
    void prMoEWithADifferentEpSizePerLayerEqualsTheSingleRankRun() {
        // two MoE blocks, 4 then 8 experts (a pyramid) with Residual-MoE; degrees 2 and 4 in a world of 4
        var g = new dev.moe4j.core.nn.GptConfig(VOCAB, SEQ, 2, 8, 2, 12, dev.moe4j.core.backend.Activation.GELU);
        var m = new dev.moe4j.core.model.MoESettings(dev.moe4j.core.model.MoESettings.pyramid(2, 1, "4x1,8x1"), 1, 1.0, 1.0, 0, true,
                "Jitter", true, true, false, 0.1, 0.0, 0);
        ModelSpec spec = new ModelSpec("pr-moe", g, m);
        List<Double> expected = run(reference(spec, 4), 5);
        List<RankState> ranks = distributed(spec, 4, e -> e == 4 ? 2 : 4, 1, 5);
        for (RankState r : ranks) {
            for (int i = 0; i < 5; i++) assertEquals(expected.get(i), r.losses().get(i), CURVE_TOL * expected.get(i), "PR-MoE loss at step " + i);
        }
        assertEquals(2, ranks.get(1).shards().get("h.0.ffn.experts.fc1.weight").rows(), "4 experts over 2 ranks");
        assertEquals(2, ranks.get(1).shards().get("h.1.ffn.experts.fc1.weight").rows(), "8 experts over 4 ranks");
    }

    @Test
    void theHierarchicalAllToAllGivesTheSameRunAsTheFlatOne() {
        ModelSpec spec = spec(true, 2, false, true);
        List<Double> expected = run(reference(spec, 4), 5);
        for (int nodeSize : new int[] {1, 2}) {
            List<List<Double>> got = dev.moe4j.comm.InProcessWorld.run(4, comm -> {
                try (dev.moe4j.core.comm.ProcessGroups groups = new dev.moe4j.core.comm.ProcessGroups(comm);
                     dev.moe4j.comm.HierarchicalCommunicator hier = new dev.moe4j.comm.HierarchicalCommunicator(groups.expertParallel(4), nodeSize)) {
                    var ctx = new dev.moe4j.core.nn.ModelContext(comm.backend(), dev.moe4j.core.tensor.DType.F64, SEED);
                    Trainer t = trainer(ctx, spec, groups, e -> 4, e -> hier, 1);
                    return run(t, 5);
                }
            });
            for (List<Double> l : got) {
                for (int i = 0; i < 5; i++) assertEquals(expected.get(i), l.get(i), CURVE_TOL * expected.get(i), "node size " + nodeSize + ": loss at step " + i);
            }
        }
    }

    @Test
    void aLongRunDoesNotGrowMemoryOnAnyRank() {
        ModelSpec spec = spec(true, 2, true, true);
        List<long[]> bytes = dev.moe4j.comm.InProcessWorld.run(4, comm -> {
            try (dev.moe4j.core.comm.ProcessGroups groups = new dev.moe4j.core.comm.ProcessGroups(comm)) {
                var ctx = new dev.moe4j.core.nn.ModelContext(comm.backend(), dev.moe4j.core.tensor.DType.F64, SEED);
                Trainer t = trainer(ctx, spec, groups, 2, 1);
                run(t, 2);
                long after2 = comm.backend().allocatedBytes();
                run(t, 10);
                return new long[] {after2, comm.backend().allocatedBytes()};
            }
        });
        for (int r = 0; r < bytes.size(); r++) assertEquals(bytes.get(r)[0], bytes.get(r)[1], "allocated bytes on rank " + r + " after 2 and 12 steps");
    }

    /**
     * Validation is shared out over the data-parallel ranks (5 batches over 4 and over 3 ranks: uneven shares, some
     * ranks repeating a batch with weight 0) and still gives the single-process figure on every rank.
     */
    @Test
    void shardedValidationEqualsTheSingleRankValidation() {
        ModelSpec spec = spec(true, 1, false, false);
        for (int[] worldEp : new int[][] {{4, 2}, {3, 1}}) {
            int world = worldEp[0], ep = worldEp[1];
            Trainer ref = reference(spec, world);
            run(ref, 2);
            double expected = ref.validationLoss(5);
            List<Double> got = dev.moe4j.comm.InProcessWorld.run(world, comm -> {
                try (dev.moe4j.core.comm.ProcessGroups groups = new dev.moe4j.core.comm.ProcessGroups(comm)) {
                    dev.moe4j.core.nn.ModelContext ctx = new dev.moe4j.core.nn.ModelContext(comm.backend(), dev.moe4j.core.tensor.DType.F64, SEED);
                    Trainer t = trainer(ctx, spec, groups, ep, 1);
                    run(t, 2);
                    return t.validationLoss(5);
                }
            });
            for (int r = 0; r < world; r++) {
                assertEquals(expected, got.get(r), 1e-12 * expected, "validation on rank " + r + " of " + world + " at ep " + ep);
            }
        }
    }
}
