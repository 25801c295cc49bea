package dev.moe4j.comm.ep;

import dev.moe4j.comm.InProcessWorld;
import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.comm.ProcessGroups;
import dev.moe4j.core.cpu.CpuBackend;
import dev.moe4j.core.data.Batch;
import dev.moe4j.core.model.MoESettings;
import dev.moe4j.core.model.ModelSpec;
import dev.moe4j.core.model.Models;
import dev.moe4j.core.nn.ExpertShard;
import dev.moe4j.core.nn.GptConfig;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.nn.Parameter;
import dev.moe4j.core.optim.AdamW;
import dev.moe4j.core.optim.CosineSchedule;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.train.BatchSource;
import dev.moe4j.core.train.GradientSync;
import dev.moe4j.core.train.Trainer;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.SplittableRandom;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

/** Tiny GPT-MoE models and data for the expert-parallel tests: float64, so runs agree to rounding. */
final class EpFixtures {
    private EpFixtures() {}

    static final int VOCAB = 16, SEQ = 8, ROWS = 2, EXPERTS = 8;
    static final long SEED = 5;

    /**
     * Block 1 (of 2) is MoE with 8 experts, capacity factor 1 and no minimum capacity (so capacity mode drops),
     * aux coefficient 0.1 and z-loss 0.01; {@code noisy}: Jitter noise and random token selection (both drawn
     * from the counter-based RNG, which the parallel trainer aligns with the single-process run's).
     */
    static ModelSpec spec(boolean dropless, int k, boolean residual, boolean noisy) {
        GptConfig g = new GptConfig(VOCAB, SEQ, 2, 8, 2, 12, Activation.GELU);
        MoESettings m = new MoESettings(MoESettings.every(2, 2, EXPERTS), k, 1.0, 1.0, 0, residual, noisy ? "Jitter" : null, true, noisy,
                dropless, 0.1, 0.01, 0);
        return new ModelSpec("ep-test", g, m);
    }

    /** Micro-batches that are a pure function of (step, micro): a noisy "next = previous + 1" pattern. */
    static final class Batches implements BatchSource {
        @Override
        public Batch train(int step, int micro) { return make(step * 1009L + micro); }

        @Override
        public List<Batch> validation(int maxBatches) {
            List<Batch> l = new ArrayList<>();
            for (int i = 0; i < maxBatches; i++) l.add(make(-1 - i));
            return l;
        }

        private static Batch make(long seed) {
            SplittableRandom r = new SplittableRandom(seed);
            int[] in = new int[ROWS * SEQ], tg = new int[ROWS * SEQ];
            for (int b = 0; b < ROWS; b++) {
                int t0 = r.nextInt(VOCAB);
                for (int t = 0; t < SEQ; t++) {
                    in[b * SEQ + t] = r.nextInt(5) == 0 ? r.nextInt(VOCAB) : (t0 + t) % VOCAB;
                    tg[b * SEQ + t] = (t0 + t + 1) % VOCAB;
                }
            }
            return new Batch(in, tg, ROWS, SEQ);
        }
    }

    static CosineSchedule schedule() { return new CosineSchedule(1e-2f, 1e-3f, 2, 30); }

    /** One rank's trainer: world {@code groups} (null: single process), {@code micro} micro-batches of the global ones. */
    static Trainer trainer(ModelContext ctx, ModelSpec spec, ProcessGroups groups, int epSize, int micro) {
        return trainer(ctx, spec, groups, e -> Math.min(epSize, e), micro);
    }

    /** As above with a per-layer degree (PR-MoE: a function of the layer's expert count). */
    static Trainer trainer(ModelContext ctx, ModelSpec spec, ProcessGroups groups, java.util.function.IntUnaryOperator epSize, int micro) {
        return trainer(ctx, spec, groups, epSize, groups == null ? null : groups::expertParallel, micro);
    }

    /** As above, the layers dispatching through {@code dispatch.apply(epSize)} (e.g. a hierarchical all-to-all). */
    static Trainer trainer(ModelContext ctx, ModelSpec spec, ProcessGroups groups, java.util.function.IntUnaryOperator epSize,
                           java.util.function.IntFunction<dev.moe4j.core.comm.Communicator> dispatch, int micro) {
        Models.Built built = groups == null ? Models.build(ctx, spec) : Models.build(ctx, spec, epSize, dispatch);
        ctx.allocateParameters();
        int rank = groups == null ? 0 : groups.dataParallel().rank(), world = groups == null ? 1 : groups.dataParallel().size();
        Trainer t = new Trainer(built.gpt(), AdamW.withDefaults(ctx.params()), BatchSource.rankShare(new Batches(), rank, world), schedule(), micro);
        t.setMoELayers(built.moeLayers());
        if (groups != null) t.setGradientSync(new GradientSync(ctx.params(), groups));
        return t;
    }

    /** The single-process reference on the same global batches (world * micro micro-batches per step). */
    static Trainer reference(ModelSpec spec, int globalMicro) {
        ModelContext ctx = new ModelContext(new CpuBackend(), DType.F64, SEED);
        return trainer(ctx, spec, null, 1, globalMicro);
    }

    /** What one rank reports: per parameter (expert ones with their rows), gradients and weights, and losses. */
    record RankState(Map<String, double[]> grads, Map<String, double[]> weights, Map<String, ExpertShard> shards, List<Double> losses) {}

    static RankState state(Trainer t, List<Double> losses) {
        Map<String, double[]> g = new LinkedHashMap<>(), w = new LinkedHashMap<>();
        Map<String, ExpertShard> s = new LinkedHashMap<>();
        for (Parameter p : t.model().context().params().all()) {
            g.put(p.name(), p.grad().toDoubles());
            w.put(p.name(), p.master().toDoubles());
            if (p.isExpert()) s.put(p.name(), p.expertShard());
        }
        return new RankState(g, w, s, losses);
    }

    /** Every parameter of every rank equals the reference's (its rows for expert shards) within tol, relative to the tensor's max. */
    static void assertMatches(RankState ref, List<RankState> ranks, double tol, String what) {
        assertMatches(ref, ranks, tol, true, what);
    }

    /** As above; weights false: the gradients only. */
    static void assertMatches(RankState ref, List<RankState> ranks, double tol, boolean weights, String what) {
        for (int r = 0; r < ranks.size(); r++) {
            RankState st = ranks.get(r);
            for (String name : ref.grads().keySet()) {
                double[] rg = ref.grads().get(name), rw = ref.weights().get(name);
                ExpertShard sh = st.shards().get(name);
                int from = 0, len = rg.length;
                if (sh != null) {
                    int row = rg.length / sh.globalRows();
                    from = sh.firstRow() * row;
                    len = sh.rows() * row;
                }
                double[] eg = Arrays.copyOfRange(rg, from, from + len), ew = Arrays.copyOfRange(rw, from, from + len);
                assertClose(eg, st.grads().get(name), tol, what + ": gradient of " + name + " on rank " + r);
                if (weights) assertClose(ew, st.weights().get(name), tol, what + ": weights of " + name + " on rank " + r);
            }
        }
    }

    static void assertClose(double[] expected, double[] actual, double tol, String what) {
        assertEquals(expected.length, actual.length, what + ": length");
        double scale = 0, err = 0;
        for (int i = 0; i < expected.length; i++) {
            scale = Math.max(scale, Math.abs(expected[i]));
            err = Math.max(err, Math.abs(expected[i] - actual[i]));
        }
        assertTrue(err <= tol * Math.max(scale, 1e-30) || err == 0, what + ": max error " + err + " vs max |value| " + scale + " (tol " + tol + ")");
    }

    static List<Double> run(Trainer t, int steps) {
        List<Double> l = new ArrayList<>();
        for (int i = 0; i < steps; i++) l.add(t.trainStep().loss());
        return l;
    }

    /** A world of {@code world} ranks at expert-parallel degree ep, {@code micro} micro-batches each, run for steps. */
    static List<RankState> distributed(ModelSpec spec, int world, int ep, int micro, int steps) {
        return distributed(spec, world, e -> Math.min(ep, e), micro, steps);
    }

    static List<RankState> distributed(ModelSpec spec, int world, java.util.function.IntUnaryOperator ep, int micro, int steps) {
        return InProcessWorld.run(world, comm -> {
            try (ProcessGroups groups = new ProcessGroups(comm)) {
                ModelContext ctx = new ModelContext(comm.backend(), DType.F64, SEED);
                Trainer t = trainer(ctx, spec, groups, ep, micro);
                return state(t, run(t, steps));
            }
        });
    }
}
