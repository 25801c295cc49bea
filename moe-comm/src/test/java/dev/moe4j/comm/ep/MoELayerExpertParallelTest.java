package dev.moe4j.comm.ep;

import dev.moe4j.comm.ForwardingCommunicator;
import dev.moe4j.comm.InProcessWorld;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.comm.PeerWindow;
import dev.moe4j.core.comm.ProcessGroups;
import dev.moe4j.core.cpu.CpuBackend;
import dev.moe4j.core.moe.MoE;
import dev.moe4j.core.moe.MoEOutput;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.nn.Parameter;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.testing.Tensors;
import org.junit.jupiter.api.Test;

import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Proxy;
import java.util.ArrayList;
import java.util.List;
import java.util.SplittableRandom;
import java.util.function.Supplier;

import static dev.moe4j.comm.ep.EpFixtures.assertClose;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * One MoE layer at epSize = world = 4 against the single-rank layer (same initial weights: shards initialise as
 * the rows of the whole tensor): each rank's output, l_aux and input gradient equal the single-rank layer's on
 * that rank's tokens, and each rank's expert gradients equal the single-rank gradients accumulated over all
 * ranks' tokens (the experts see every rank's tokens through the all-to-all). Float64, 1e-12 relative. No random
 * routing here (each bare layer draws from its own RNG position; the trainer aligns them, see ExpertParallelTrainingTest).
 */
class MoELayerExpertParallelTest {
    static final int W = 4, S = 5, M = 4, F = 6, E = 8;

    private static MoE.Builder builder(boolean dropless, int k) {
        return MoE.builder().setHiddenSize(M).setFfnSize(F).optNumExperts(E).optK(k).optMinCapacity(0)
                .optCapacityFactor(1.0).optDropless(dropless).optUseRts(false).optTop2SecondExpertSampling(false).optName("moe");
    }

    /** Tokens with positive entries and a gate that prefers expert 0 (and 1) for all of them: ranks owning the others receive nothing. */
    private static Tensor tokens(ModelContext ctx, int rank, boolean skewed) {
        SplittableRandom r = new SplittableRandom(100 + rank);
        double[] v = new double[S * M];
        for (int i = 0; i < v.length; i++) v[i] = skewed ? 0.5 + r.nextDouble() : r.nextDouble() * 2 - 1;
        return ctx.backend().fromDoubles(DType.F64, v, S, M);
    }

    private static void skewGate(ModelContext ctx, MoE moe) {
        Tensor w = moe.gate().weight().master();
        double[] g = new double[E * M];
        for (int j = 0; j < M; j++) { g[j] = 1.0; g[M + j] = 0.5; }
        try (Tensor t = ctx.backend().fromDoubles(DType.F64, g, E, M)) { ctx.backend().copy(t, w); }
    }

    /** The gate's weights set to w, or skewed (skewGate) where w is null. */
    private static void setGate(ModelContext ctx, MoE moe, double[] w) {
        if (w == null) {
            skewGate(ctx, moe);
            return;
        }
        try (Tensor t = ctx.backend().fromDoubles(DType.F64, w, E, M)) { ctx.backend().copy(t, moe.gate().weight().master()); }
    }

    private static Tensor dout(ModelContext ctx, int rank) { return dout(ctx, rank, S); }

    private static Tensor dout(ModelContext ctx, int rank, int tokens) {
        return Tensors.random(ctx.backend(), DType.F64, new SplittableRandom(200 + rank), 1.0, tokens, M);
    }

    /** {@code n} tokens of uniform entries (seeded), the gate routing them as it will. */
    private static Tensor tokens(ModelContext ctx, int seed, int n) {
        SplittableRandom r = new SplittableRandom(100 + seed);
        double[] v = new double[n * M];
        for (int i = 0; i < v.length; i++) v[i] = r.nextDouble() * 2 - 1;
        return ctx.backend().fromDoubles(DType.F64, v, n, M);
    }

    record Result(double[] out, double[] dx, double lAux, List<double[]> expertGrads, List<Integer> firstRow, List<String> calls) {
        /** A rank's result with the expert gradients of its context (after finishGrads) and their first rows. */
        static Result of(ModelContext ctx, double[] out, double[] dx, double lAux, List<String> calls) {
            List<double[]> g = new ArrayList<>();
            List<Integer> first = new ArrayList<>();
            for (Parameter p : ctx.params().all()) {
                if (!p.isExpert()) continue;
                g.add(p.grad().toDoubles());
                first.add(p.expertShard().firstRow());
            }
            return new Result(out, dx, lAux, g, first, calls);
        }
    }

    /** Rank r's expert gradients are the rows of its experts [r*E/W, (r+1)*E/W) of the single-rank gradients. */
    private static void assertExpertGrads(List<Parameter> refExperts, Result got, int r, String what) {
        assertExpertGradsEqual(refExperts.stream().map(p -> p.grad().toDoubles()).toList(), refExperts.stream().map(p -> p.shape().dim(0)).toList(),
                got, r, what);
    }

    /** The same against the single-rank gradients as read (refGrads: the expert parameters' in order, of E experts each). */
    private static void assertExpertGradsEqual(List<double[]> refGrads, Result got, int r, String what) {
        assertExpertGradsEqual(refGrads, java.util.Collections.nCopies(refGrads.size(), E), got, r, what);
    }

    /** experts: each parameter's experts (the layer's E). */
    private static void assertExpertGradsEqual(List<double[]> refGrads, List<Integer> experts, Result got, int r, String what) {
        for (int i = 0; i < refGrads.size(); i++) {
            double[] all = refGrads.get(i);
            int e = experts.get(i), n = got.expertGrads().get(i).length, from = got.firstRow().get(i) * (all.length / e);
            assertEquals(r * (e / W), got.firstRow().get(i), "rank r holds experts [r*E/W, (r+1)*E/W)");
            assertClose(java.util.Arrays.copyOfRange(all, from, from + n), got.expertGrads().get(i), 1e-12, what + ": expert parameter " + i);
        }
    }

    private static void check(boolean dropless, int k, boolean skewed) {
        check(dropless, k, skewed, false);
    }

    private static void check(boolean dropless, int k, boolean skewed, boolean overlap) {
        check(dropless, k, skewed, overlap, MoE.DroplessLayout.AUTO);
    }

    /** layout: the expert-parallel layer's dropless layout; the single-rank reference always sorts. */
    private static void check(boolean dropless, int k, boolean skewed, boolean overlap, MoE.DroplessLayout layout) {
        check(dropless, k, skewed, overlap, layout, true);
    }

    private static void check(boolean dropless, int k, boolean skewed, boolean overlap, MoE.DroplessLayout layout, boolean bias) {
        check(dropless, k, skewed, overlap, layout, bias, false);
    }

    /** peer: the layer may move its rows through the in-process communicator's peer windows (and does unless it pipelines). */
    private static void check(boolean dropless, int k, boolean skewed, boolean overlap, MoE.DroplessLayout layout, boolean bias, boolean peer) {
        // reference: one layer, each rank's batch in turn; expert gradients accumulate over all batches
        ModelContext rc = new ModelContext(new CpuBackend(), DType.F64, 7);
        MoE ref = builder(dropless, k).optExpertBias(bias).optDroplessLayout(MoE.DroplessLayout.SORTED).setContext(rc).build();
        rc.allocateParameters();
        if (skewed) skewGate(rc, ref);
        rc.params().zeroGrad();
        List<double[]> outs = new ArrayList<>(), dxs = new ArrayList<>();
        List<Double> laux = new ArrayList<>();
        for (int r = 0; r < W; r++) {
            MoEOutput o = ref.forward(tokens(rc, r, skewed));
            outs.add(o.output().toDoubles());
            laux.add(o.lAux().toDoubles()[0]);
            dxs.add(ref.backward(dout(rc, r), 0.3f).toDoubles());
        }
        rc.params().finishGrads();
        List<Result> got = runRanks(dropless, k, skewed, overlap, layout, bias, peer);
        List<Parameter> refExperts = rc.params().all().stream().filter(Parameter::isExpert).toList();
        for (int r = 0; r < W; r++) {
            String what = (dropless ? "dropless " + layout : "capacity") + " k=" + k + (skewed ? " skewed" : "") + (overlap ? " overlapped" : "")
                    + (bias ? "" : " no bias") + (peer ? " peer" : "") + " rank " + r;
            List<String> calls = got.get(r).calls();
            long rowExchanges = calls.stream().filter("exchangeRows"::equals).count();
            long allToAlls = calls.stream().filter(c -> c.startsWith("allToAll")).count();
            long windows = calls.stream().filter("openWindow"::equals).count();
            if (peer && !overlap) {
                // X, DY, Y, DX opened once; no collective moves rows (dropless: one count all-gather)
                assertEquals(4, windows, what + ": " + calls);
                assertEquals(0, rowExchanges + allToAlls, what + ": " + calls);
            } else if (overlap) {
                // two stages (one expert each): a block exchange per stage and direction, forward and backward
                assertEquals(8, rowExchanges, what + ": " + calls);
                assertEquals(0, allToAlls, what + ": " + calls);
            } else {
                assertEquals(0, rowExchanges, what + ": no block exchange: " + calls);
                assertEquals(4, allToAlls, what + ": " + calls);
                assertEquals(0, windows, what + ": " + calls);
            }
            assertClose(outs.get(r), got.get(r).out(), 1e-12, what + ": output");
            assertClose(dxs.get(r), got.get(r).dx(), 1e-12, what + ": dx");
            assertEquals(laux.get(r), got.get(r).lAux(), 1e-12, what + ": l_aux stays local");
            assertExpertGrads(refExperts, got.get(r), r, what);
        }
    }

    @Test
    void capacityAndDroplessLayersEqualTheSingleRankLayer() {
        check(false, 1, false);
        check(false, 2, false);
        check(true, 1, false);
        check(true, 2, false);
    }

    @Test
    void ranksWhoseExpertsReceiveNoTokensStillTakePartInTheExchanges() {
        check(true, 1, true);    // every token to expert 0: ranks 1..3 receive no rows
        check(true, 2, true);
        check(false, 2, true);   // capacity: most tokens dropped, empty slots exchanged
    }

    /** Dropless with each rank's local experts padded to equal segments after the exchange: the same layer. */
    @Test
    void paddedDroplessLayersEqualTheSingleRankLayer() {
        check(true, 1, false, false, MoE.DroplessLayout.PADDED);
        check(true, 2, false, false, MoE.DroplessLayout.PADDED);
        check(true, 2, true, false, MoE.DroplessLayout.PADDED);   // ranks with no rows, and one expert with all of them
    }

    /** Experts without biases, as the benchmarks run them. */
    @Test
    void layersWithoutExpertBiasesEqualTheSingleRankLayer() {
        check(false, 2, false, false, MoE.DroplessLayout.AUTO, false);
        check(true, 1, false, false, MoE.DroplessLayout.SORTED, false);
        check(true, 2, true, false, MoE.DroplessLayout.PADDED, false);
    }

    /**
     * The pipeline over expert stages (each stage's rows travel while the previous stage's experts run) computes
     * the same layer; the communicator runs each exchange only at its await, so an early read shows.
     */
    @Test
    void overlappedLayersEqualTheSingleRankLayer() {
        check(false, 1, false, true);
        check(false, 2, false, true);
        check(true, 1, false, true);
        check(true, 2, false, true);
        check(true, 1, true, true);     // ranks and stages with no rows at all
        check(false, 2, true, true);
        check(true, 2, true, true, MoE.DroplessLayout.PADDED);
        check(true, 1, false, true, MoE.DroplessLayout.PADDED, false);
    }

    /**
     * Rows stored straight into the peers' windows (every rank computes where each row lands from the shared routing):
     * the same layer, with skewed routing (ranks that receive nothing), both modes, no biases, a padded dropless layer
     * (padding in the owners' windows); a pipelined one keeps its collectives.
     */
    @Test
    void peerWindowLayersEqualTheSingleRankLayer() {
        for (boolean dropless : new boolean[] {false, true}) {
            for (int k = 1; k <= 2; k++) {
                check(dropless, k, false, false, MoE.DroplessLayout.AUTO, true, true);
                check(dropless, k, true, false, MoE.DroplessLayout.AUTO, true, true);
            }
        }
        check(true, 2, true, false, MoE.DroplessLayout.PADDED, false, true);
        check(false, 2, false, true, MoE.DroplessLayout.AUTO, true, true);
    }

    /**
     * A dropless layer through the windows over three steps, sorted (the CPU's AUTO) and padded: the first step
     * all-gathers the counts and reads them before its dispatch (no window yet); the later ones exchange them through a
     * window and dispatch before the read (destinations from the device's counts). The second routes every token to expert 0 (a skewed gate), so that its rows outgrow the window X:
     * the layer ends that exchange, grows X and dispatches again; the third, with the gate as before, fits the grown
     * windows, whose padding rows then hold the second step's rows until zeroed. Each step equals the single-rank layer
     * on the same tokens, expert gradients included.
     */
    @Test
    void droplessPeerLayersDispatchBeforeTheCountReadAndGrowTheirWindows() {
        for (int variant = 0; variant < 4; variant++) {
            MoE.DroplessLayout layout = variant % 2 == 0 ? MoE.DroplessLayout.AUTO : MoE.DroplessLayout.PADDED;
            boolean bias = variant < 2;   // without biases no per-row table goes up at all
            String what = layout + (bias ? "" : " no bias");
            List<List<Result>> got = droplessPeerStepsMatchTheSingleRankLayer(what, layout, bias, 3,
                    (ctx, rank, step) -> tokens(ctx, rank + W * step, step == 1), (ctx, rank, step) -> dout(ctx, rank),
                    (ctx, moe, step, initial) -> setGate(ctx, moe, step == 1 ? null : initial));
            for (int r = 0; r < W; r++) {
                for (int step = 0; step < 3; step++) {
                    String at = what + " rank " + r + " step " + step;
                    List<String> calls = got.get(r).get(step).calls();
                    assertEquals(0, calls.stream().filter(c -> c.startsWith("allToAll")).count(), at + ": " + calls);
                    long opened = calls.stream().filter("openWindow"::equals).count();
                    if (step == 0) assertEquals(4, opened, at + ": X, Y, DY, DX: " + calls);
                    if (step == 1) assertTrue(opened >= 2, at + ": the counts' window; every token to one owner outgrows X: " + calls);
                    if (step == 2) assertEquals(0, opened, at + ": fits the grown windows: " + calls);
                    // the counts go by all-gather before the windows exist, then through the counts' window
                    assertEquals(step == 0 ? 1 : 0, calls.stream().filter("allGather"::equals).count(), at + ": " + calls);
                }
            }
        }
    }

    /**
     * A dropless layer through the windows whose ranks take different numbers of tokens, more at the second step than
     * any rank took before (Y, sized by the largest rank's rows, must grow: where the experts ran before the count read
     * their outputs beyond it went nowhere, and the forward runs again), fewer at the third (fits), more again at the
     * fourth. Each step equals the single-rank layer on each rank's tokens, expert gradients included; with and
     * without biases, sorted (the CPU's AUTO) and padded.
     */
    @Test
    void droplessPeerLayersTakeMoreTokensThanBefore() {
        int[][] sizes = {{5, 5, 5, 5}, {5, 7, 9, 11}, {9, 8, 7, 6}, {14, 14, 3, 14}};   // [step][rank]
        for (int variant = 0; variant < 4; variant++) {
            MoE.DroplessLayout layout = variant % 2 == 0 ? MoE.DroplessLayout.AUTO : MoE.DroplessLayout.PADDED;
            boolean bias = variant < 2;
            String what = layout + (bias ? "" : " no bias");
            List<List<Result>> got = droplessPeerStepsMatchTheSingleRankLayer(what, layout, bias, sizes.length,
                    (ctx, rank, step) -> tokens(ctx, rank + 7 * sizes[step][rank], sizes[step][rank]),
                    (ctx, rank, step) -> dout(ctx, rank, sizes[step][rank]), (ctx, moe, step, initial) -> {});
            for (int r = 0; r < W; r++) {
                for (int step = 0; step < sizes.length; step++) {
                    String at = what + " rank " + r + " step " + step;
                    List<String> calls = got.get(r).get(step).calls();
                    long opened = calls.stream().filter("openWindow"::equals).count();
                    if (step == 1 || step == 3) assertTrue(opened >= 1, at + ": more rows than any rank had grow the windows: " + calls);
                    if (step == 2) assertEquals(0, opened, at + ": fits: " + calls);
                }
            }
        }
    }

    /** A layer's input (tokens or output gradient) on one rank at one step. */
    interface StepInput {
        Tensor at(ModelContext ctx, int rank, int step);
    }

    /** What is done to a layer before each step (its gate set from its initial weights), on the reference and each rank. */
    interface StepSetup {
        void before(ModelContext ctx, MoE moe, int step, double[] initialGate);
    }

    /**
     * A dropless top-2 layer through the windows (layout, biases) over steps, against the single-rank layer (sorted) on
     * each rank's inputs: at every step each rank's output, input gradient and expert gradients equal the reference's.
     * Returns each rank's results per step, with its communicator calls, for the caller's further checks.
     */
    private static List<List<Result>> droplessPeerStepsMatchTheSingleRankLayer(String what, MoE.DroplessLayout layout, boolean bias, int steps,
                                                                             StepInput tokens, StepInput dout, StepSetup setup) {
        ModelContext rc = new ModelContext(new CpuBackend(), DType.F64, 7);
        MoE ref = builder(true, 2).optExpertBias(bias).optDroplessLayout(MoE.DroplessLayout.SORTED).setContext(rc).build();
        rc.allocateParameters();
        List<List<double[]>> outs = new ArrayList<>(), dxs = new ArrayList<>(), grads = new ArrayList<>();
        double[] gate = ref.gate().weight().master().toDoubles();
        for (int step = 0; step < steps; step++) {
            setup.before(rc, ref, step, gate);
            rc.params().zeroGrad();
            List<double[]> o = new ArrayList<>(), d = new ArrayList<>();
            for (int r = 0; r < W; r++) {
                o.add(ref.forward(tokens.at(rc, r, step)).output().toDoubles());
                d.add(ref.backward(dout.at(rc, r, step), 0.3f).toDoubles());
            }
            outs.add(o);
            dxs.add(d);
            rc.params().finishGrads();
            grads.add(rc.params().all().stream().filter(Parameter::isExpert).map(p -> p.grad().toDoubles()).toList());
        }
        List<List<Result>> got = InProcessWorld.run(W, comm -> {
            try (ProcessGroups groups = new ProcessGroups(comm)) {
                ModelContext ctx = new ModelContext(comm.backend(), DType.F64, 7);
                List<String> calls = new ArrayList<>();
                dev.moe4j.core.comm.Communicator group = new OverlappedGradientSyncTest.Deferring(groups.expertParallel(W), calls, true);
                MoE moe = builder(true, 2).optExpertBias(bias).optEpSize(W).optExpertParallelGroup(group).optDroplessLayout(layout).setContext(ctx).build();
                ctx.allocateParameters();
                List<Result> res = new ArrayList<>();
                double[] initial = moe.gate().weight().master().toDoubles();
                int me = comm.rank();
                for (int step = 0; step < steps; step++) {
                    setup.before(ctx, moe, step, initial);
                    ctx.params().zeroGrad();
                    calls.clear();
                    double[] out = moe.forward(tokens.at(ctx, me, step)).output().toDoubles();
                    double[] dx = moe.backward(dout.at(ctx, me, step), 0.3f).toDoubles();
                    ctx.params().finishGrads();
                    res.add(Result.of(ctx, out, dx, 0, new ArrayList<>(calls)));
                }
                moe.close();
                return res;
            }
        });
        for (int r = 0; r < W; r++) {
            for (int step = 0; step < steps; step++) {
                String at = what + " rank " + r + " step " + step;
                assertClose(outs.get(step).get(r), got.get(r).get(step).out(), 1e-12, at + ": output");
                assertClose(dxs.get(step).get(r), got.get(r).get(step).dx(), 1e-12, at + ": dx");
                assertExpertGradsEqual(grads.get(step), got.get(r).get(step), r, at);
            }
        }
        return got;
    }

    /**
     * Where nothing of a dropless layer's forward needs the counts on the host (the sorted layout, no expert biases, a
     * backend whose grouped products read their offsets on the device: the CPU's), the layer queues its experts before
     * the host waits for the counts; with biases (a per-row table built on the host) or padding (the input's size
     * follows from the counts) the wait comes first. Seen through a backend that logs the counts' read and the grouped
     * products in order, at the second forward (the first opens the windows and reads the counts before its dispatch).
     */
    @Test
    void droplessExpertsRunBeforeTheCountReadWhereNothingNeedsIt() {
        record Case(boolean bias, MoE.DroplessLayout layout, boolean before) {}
        for (Case c : List.of(new Case(false, MoE.DroplessLayout.AUTO, true), new Case(true, MoE.DroplessLayout.AUTO, false),
                new Case(false, MoE.DroplessLayout.PADDED, false))) {
            List<List<String>> logs = InProcessWorld.run(W, comm -> {
                try (ProcessGroups groups = new ProcessGroups(comm)) {
                    List<String> log = new ArrayList<>();
                    Backend spy = logging(comm.backend(), log);
                    Communicator group = on(spy, groups.expertParallel(W), true);
                    ModelContext ctx = new ModelContext(spy, DType.F64, 7);
                    MoE moe = builder(true, 2).optExpertBias(c.bias()).optEpSize(W).optExpertParallelGroup(group).optDroplessLayout(c.layout()).setContext(ctx).build();
                    ctx.allocateParameters();
                    for (int step = 0; step < 2; step++) {
                        log.clear();
                        moe.forward(tokens(ctx, comm.rank() + W * step, false));
                    }
                    List<String> second = new ArrayList<>(log);
                    moe.close();
                    return second;
                }
            });
            for (int r = 0; r < W; r++) {
                List<String> log = logs.get(r);
                int read = log.indexOf("counts read"), product = log.indexOf("grouped product");
                String what = c + " rank " + r + ": " + log;
                assertTrue(read >= 0 && product >= 0, what);
                assertEquals(c.before(), product < read, what);
            }
        }
    }

    /**
     * Group ep on backend spy (a proxy of ep's backend, whose tensors are ep's backend's), with its peer windows or
     * without any (the layers then move rows by the collectives).
     */
    private static Communicator on(Backend spy, Communicator ep, boolean windows) {
        return new ForwardingCommunicator(new OverlappedGradientSyncTest.Deferring(ep, new ArrayList<>(), windows)) {
            @Override public Backend backend() { return spy; }
            @Override public PeerWindow openWindow(long bytes) { return inner.openWindow(bytes); }
            @Override public String describe() { return "spied " + inner.describe(); }
            @Override public Communicator split(int color, int key) { throw new UnsupportedOperationException(); }
            @Override public void close() { inner.close(); }
        };
    }

    /**
     * Ranks with different numbers of tokens on a backend whose preference for equal groups (padding) depends on the
     * rows asked about: the ranks must ask with the same rows (a size of the whole group's), or they lay the group out
     * differently (some padding, some not) and exchange rows to the wrong places. With the windows (steps 1-2) and
     * before them (step 0: the counts read first), with the windows' NCCL-free path and without windows.
     */
    @Test
    void droplessRanksWithDifferentTokenCountsLayTheGroupOutAlike() {
        int[] size = {3, 3, 12, 12};   // rows 6, 6, 24, 24 at k = 2; the spy prefers equal groups from 12 rows
        for (boolean windows : new boolean[] {true, false}) {
            ModelContext rc = new ModelContext(new CpuBackend(), DType.F64, 7);
            MoE ref = builder(true, 2).optDroplessLayout(MoE.DroplessLayout.SORTED).setContext(rc).build();
            rc.allocateParameters();
            List<double[]> outs = new ArrayList<>(), dxs = new ArrayList<>();
            rc.params().zeroGrad();
            for (int r = 0; r < W; r++) {
                outs.add(ref.forward(tokens(rc, r + 50, size[r])).output().toDoubles());
                dxs.add(ref.backward(dout(rc, r, size[r]), 0.3f).toDoubles());
            }
            rc.params().finishGrads();
            List<double[]> grads = rc.params().all().stream().filter(Parameter::isExpert).map(p -> p.grad().toDoubles()).toList();
            List<List<Result>> got = InProcessWorld.run(W, comm -> {
                try (ProcessGroups groups = new ProcessGroups(comm)) {
                    Backend b = comm.backend();
                    Backend spy = (Backend) Proxy.newProxyInstance(Backend.class.getClassLoader(), new Class<?>[] {Backend.class},
                            (proxy, m, args) -> m.getName().equals("prefersEqualGroups") ? (Object) ((long) args[1] >= 12) : call(b, m, args));
                    Communicator group = on(spy, groups.expertParallel(W), windows);
                    ModelContext ctx = new ModelContext(spy, DType.F64, 7);
                    MoE moe = builder(true, 2).optEpSize(W).optExpertParallelGroup(group).optDroplessLayout(MoE.DroplessLayout.AUTO).setContext(ctx).build();
                    ctx.allocateParameters();
                    List<Result> res = new ArrayList<>();
                    int me = comm.rank();
                    for (int step = 0; step < 3; step++) {
                        ctx.params().zeroGrad();
                        double[] out = moe.forward(tokens(ctx, me + 50, size[me])).output().toDoubles();
                        double[] dx = moe.backward(dout(ctx, me, size[me]), 0.3f).toDoubles();
                        ctx.params().finishGrads();
                        res.add(Result.of(ctx, out, dx, 0, List.of()));
                    }
                    moe.close();
                    return res;
                }
            });
            for (int r = 0; r < W; r++) {
                for (int step = 0; step < 3; step++) {
                    String what = (windows ? "windows" : "all-to-all") + " rank " + r + " step " + step;
                    assertClose(outs.get(r), got.get(r).get(step).out(), 1e-12, what + ": output");
                    assertClose(dxs.get(r), got.get(r).get(step).dx(), 1e-12, what + ": dx");
                    assertExpertGradsEqual(grads, got.get(r).get(step), r, what);
                }
            }
        }
    }

    /** A proxied call passed on to b, with b's own exception. */
    private static Object call(Backend b, java.lang.reflect.Method m, Object[] args) throws Throwable {
        try {
            return m.invoke(b, args);
        } catch (InvocationTargetException e) {
            throw e.getCause();
        }
    }

    /** b, logging each grouped product and each read of readIntsLater's values into log. */
    private static Backend logging(Backend b, List<String> log) {
        return (Backend) Proxy.newProxyInstance(Backend.class.getClassLoader(), new Class<?>[] {Backend.class}, (proxy, m, args) -> {
            if (m.getName().startsWith("groupedMatmul")) log.add("grouped product");
            Object out = call(b, m, args);
            if (!m.getName().equals("readIntsLater")) return out;
            @SuppressWarnings("unchecked") Supplier<int[]> values = (Supplier<int[]>) out;
            return (Supplier<int[]>) () -> {
                log.add("counts read");
                return values.get();
            };
        });
    }

    /**
     * Three layers of one group in sequence (each on the one before's output, backward in reverse; capacity top-2, then
     * dropless over E and over 2E experts): they share DY, DX and the dropless layers' count window C, which the third
     * layer's larger counts regrow in the second step, and each rank's output, input gradient and expert gradients
     * equal the single-rank layers'.
     */
    @Test
    void twoLayersOfOneGroupShareTheirGradientWindows() {
        ModelContext rc = new ModelContext(new CpuBackend(), DType.F64, 7);
        MoE a = builder(false, 2).optName("a").setContext(rc).build(), b = builder(true, 1).optName("b").setContext(rc).build();
        MoE c = builder(true, 1).optNumExperts(2 * E).optName("c").setContext(rc).build();
        rc.allocateParameters();
        rc.params().zeroGrad();
        List<double[]> outs = new ArrayList<>(), dxs = new ArrayList<>();
        for (int r = 0; r < W; r++) {
            Tensor h = b.forward(a.forward(tokens(rc, r, false)).output()).output();
            outs.add(c.forward(h).output().toDoubles());
            dxs.add(a.backward(b.backward(c.backward(dout(rc, r), 0.3f), 0.3f), 0.3f).toDoubles());
        }
        rc.params().finishGrads();
        List<Parameter> refExperts = rc.params().all().stream().filter(Parameter::isExpert).toList();
        List<Result> got = InProcessWorld.run(W, comm -> {
            try (ProcessGroups groups = new ProcessGroups(comm)) {
                ModelContext ctx = new ModelContext(comm.backend(), DType.F64, 7);
                List<String> calls = new ArrayList<>();
                dev.moe4j.core.comm.Communicator group = new OverlappedGradientSyncTest.Deferring(groups.expertParallel(W), calls, true);
                MoE la = builder(false, 2).optName("a").optEpSize(W).optExpertParallelGroup(group).setContext(ctx).build();
                MoE lb = builder(true, 1).optName("b").optEpSize(W).optExpertParallelGroup(group).setContext(ctx).build();
                MoE lc = builder(true, 1).optNumExperts(2 * E).optName("c").optEpSize(W).optExpertParallelGroup(group).setContext(ctx).build();
                ctx.allocateParameters();
                ctx.params().zeroGrad();
                for (int step = 0; step < 2; step++) {   // the second step reuses every window but C, which opens and grows
                    ctx.params().zeroGrad();
                    Tensor h = lb.forward(la.forward(tokens(ctx, comm.rank(), false)).output()).output();
                    double[] out = lc.forward(h).output().toDoubles();
                    double[] dx = la.backward(lb.backward(lc.backward(dout(ctx, comm.rank()), 0.3f), 0.3f), 0.3f).toDoubles();
                    if (step == 0) continue;
                    ctx.params().finishGrads();
                    Result res = Result.of(ctx, out, dx, 0, calls);
                    la.close();
                    lb.close();
                    lc.close();
                    return res;
                }
                throw new IllegalStateException("unreachable");
            }
        });
        for (int r = 0; r < W; r++) {
            assertEquals(10, got.get(r).calls().stream().filter("openWindow"::equals).count(),
                    "X and Y per layer; DY, DX and the dropless layers' counts' C shared, C grown once: " + got.get(r).calls());
            assertEquals(3, got.get(r).calls().stream().filter("allGather"::equals).count(),
                    "the first step only: the capacity layer's capacity check, the dropless layers' counts: " + got.get(r).calls());
            assertEquals(0, got.get(r).calls().stream().filter(call -> call.startsWith("allToAll")).count(), got.get(r).calls().toString());
            assertClose(outs.get(r), got.get(r).out(), 1e-12, "rank " + r + ": output");
            assertClose(dxs.get(r), got.get(r).dx(), 1e-12, "rank " + r + ": dx");
            assertExpertGrads(refExperts, got.get(r), r, "rank " + r);
        }
    }

    /**
     * Capacity mode with different token counts per rank (so different capacities): every rank fails at the first
     * forward with an error that names the capacities, through the windows and through the all-to-alls alike, rather
     * than exchanging blocks of sizes the others do not expect.
     */
    @Test
    void capacityLayersOfRanksWithDifferentCapacitiesFailClearly() {
        int[] size = {5, 5, 9, 9};   // capacities 2, 2, 3, 3 (k = 2 over 8 experts)
        for (boolean peer : new boolean[] {true, false}) {
            var e = assertThrows(dev.moe4j.core.comm.CommunicationException.class, () -> InProcessWorld.run(W, comm -> {
                try (ProcessGroups groups = new ProcessGroups(comm)) {
                    ModelContext ctx = new ModelContext(comm.backend(), DType.F64, 7);
                    MoE moe = builder(false, 2).optEpSize(W).optExpertParallelGroup(groups.expertParallel(W)).optPeerExchange(peer).setContext(ctx).build();
                    ctx.allocateParameters();
                    moe.forward(tokens(ctx, comm.rank(), size[comm.rank()]));
                    return null;
                }
            }));
            String all = InProcessWorld.rankFailures(e).toString();
            assertTrue(all.contains("capacities [2, 2, 3, 3]") && all.contains("same number of tokens"), all);
        }
    }

    @Test
    void anExpertParallelLayerNeedsAMatchingGroup() {
        InProcessWorld.run(2, comm -> {
            try (ProcessGroups groups = new ProcessGroups(comm)) {
                ModelContext ctx = new ModelContext(comm.backend(), DType.F64, 7);
                var none = assertThrows(IllegalArgumentException.class, () -> builder(true, 1).optEpSize(2).setContext(ctx).build());
                assertTrue(none.getMessage().contains("optExpertParallelGroup"), none.getMessage());
                var size = assertThrows(IllegalArgumentException.class,
                        () -> builder(true, 1).optEpSize(2).optExpertParallelGroup(groups.expertParallel(1)).setContext(ctx).build());
                assertTrue(size.getMessage().contains("1 ranks but epSize = 2"), size.getMessage());
                var div = assertThrows(IllegalArgumentException.class, () -> MoE.builder().setHiddenSize(M).setFfnSize(F).optNumExperts(6).optEpSize(4).setContext(ctx).build());
                assertTrue(div.getMessage().contains("epSize (4) must divide numExperts (6)"), div.getMessage());
                return null;
            }
        });
    }

    private static List<Result> runRanks(boolean dropless, int k, boolean skewed, boolean overlap, MoE.DroplessLayout layout, boolean bias, boolean peer) {
        return InProcessWorld.run(W, comm -> {
            try (ProcessGroups groups = new ProcessGroups(comm)) {
                ModelContext ctx = new ModelContext(comm.backend(), DType.F64, 7);
                // a communicator that runs each asynchronous exchange only when it is awaited (the latest a GPU side
                // stream could finish), so a missing or early await shows as a wrong result
                List<String> calls = new ArrayList<>();
                dev.moe4j.core.comm.Communicator group = new OverlappedGradientSyncTest.Deferring(groups.expertParallel(W), calls, true);
                MoE moe = builder(dropless, k).optExpertBias(bias).optEpSize(W).optExpertParallelGroup(group).optOverlapAllToAll(overlap)
                        .optDroplessLayout(layout).optPeerExchange(peer).setContext(ctx).build();
                ctx.allocateParameters();
                if (skewed) skewGate(ctx, moe);
                // stale gradients as after a step: a write the layer misses after zeroGrad shows as a wrong value
                for (Parameter p : ctx.params().all()) ctx.backend().fill(p.grad(), 1e6);
                ctx.params().zeroGrad();
                MoEOutput o = moe.forward(tokens(ctx, comm.rank(), skewed));
                double[] out = o.output().toDoubles();
                double l = o.lAux().toDoubles()[0];
                double[] dx = moe.backward(dout(ctx, comm.rank()), 0.3f).toDoubles();
                ctx.params().finishGrads();
                return Result.of(ctx, out, dx, l, calls);
            }
        });
    }
}
