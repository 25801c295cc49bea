package dev.moe4j.core.moe;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.cpu.CpuBackend;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.nn.Parameter;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.testing.GradCheck;
import dev.moe4j.core.testing.Tensors;
import org.junit.jupiter.api.Test;

import java.lang.reflect.Proxy;
import java.util.SplittableRandom;
import java.util.function.UnaryOperator;

import static org.junit.jupiter.api.Assertions.*;

/** The MoE layer on the CPU backend: float64 finite differences, capped vs dropless, noise, the builder. */
class MoELayerTest {
    private static final int S = 12, M = 6, F = 5, E = 3;
    private final CpuBackend b = new CpuBackend();

    private MoE.Builder base() {
        return MoE.builder().setHiddenSize(M).setFfnSize(F).optNumExperts(E).optMinCapacity(0);
    }

    /** Builds on a fresh context, allocates and fills every parameter with O(1) random values. */
    private static MoE build(ModelContext ctx, MoE.Builder builder, long seed) {
        MoE moe = builder.setContext(ctx).build();
        ctx.allocateParameters();
        SplittableRandom rnd = new SplittableRandom(seed);
        for (Parameter p : ctx.params().all()) {
            try (Tensor t = Tensors.random(ctx.backend(), p.master().dtype(), rnd, 0.6, p.shape().dims())) {
                ctx.backend().copy(t, p.master());
            }
        }
        return moe;
    }

    /**
     * loss = sum(out * r) + auxCoeff * l_aux + zCoeff * z; checks dx and every parameter gradient against
     * float64 central differences. The RNG position is reset before each forward so noise and RTS repeat.
     */
    private void gradCheck(String name, UnaryOperator<MoE.Builder> cfg, boolean training, boolean expectDrops) {
        ModelContext ctx = new ModelContext(b, DType.F64, 42);
        ctx.setTraining(training);
        MoE moe = build(ctx, cfg.apply(base()), 7);
        SplittableRandom rnd = new SplittableRandom(name.hashCode());
        Tensor x = Tensors.random(b, DType.F64, rnd, 1.0, S, M);
        Tensor r = Tensors.random(b, DType.F64, rnd, 1.0, S, M);
        float aux = 0.5f;
        double zc = moe.config().zLossCoeff();
        long rng = ctx.rngOffset();
        MoEOutput out = moe.forward(x);
        if (expectDrops) assertTrue(moe.droppedFraction() > 0, name + ": the case should drop tokens");
        else assertEquals(0.0, moe.droppedFraction(), 0.0, name + ": nothing may be dropped");
        ctx.params().zeroGrad();
        Tensor dx = moe.backward(r, aux);
        ctx.params().finishGrads();
        var loss = (java.util.function.DoubleSupplier) () -> {
            ctx.setRngOffset(rng);
            MoEOutput o = moe.forward(x);
            double v = Tensors.dot(o.output(), r) + aux * o.lAux().toDoubles()[0] + zc * o.zLoss().toDoubles()[0];
            o.output().close();
            return v;
        };
        GradCheck.check(name + " dx", x, dx, loss, 40, GradCheck.F64_TOL);
        for (Parameter p : ctx.params().all()) {
            GradCheck.check(name + " " + p.name(), p.master(), p.grad(), loss, 25, GradCheck.F64_TOL);
        }
        out.output().close();
        moe.close();
        ctx.params().close();
    }

    @Test
    void top1CappedWithDropsMatchesFiniteDifferences() {
        gradCheck("top1", c -> c.optK(1).optUseRts(true).optZLossCoeff(0.01), true, true);
    }

    @Test
    void top2CappedWithDropsMatchesFiniteDifferences() {
        gradCheck("top2", c -> c.optK(2).optCapacityFactor(0.6).optZLossCoeff(0.02), true, true);
    }

    @Test
    void droplessTop2MatchesFiniteDifferences() {
        gradCheck("dropless", c -> c.optK(2).optDropless(true).optActivation(Activation.SWIGLU), false, false);
    }

    @Test
    void residualMatchesFiniteDifferences() {
        gradCheck("residual", c -> c.optK(1).optUseResidual(true).optCapacityFactor(0.5), false, true);
    }

    @Test
    void sharedExpertsAndJitterMatchFiniteDifferences() {
        gradCheck("shared", c -> c.optK(2).optDropTokens(false).optSharedExperts(2, 3).optNoisyGatePolicy("Jitter").optExpertBias(false), true, false);
    }

    @Test
    void everyActivationMatchesFiniteDifferences() {
        for (Activation a : Activation.values()) {
            gradCheck("act " + a, c -> c.optK(1).optCapacityFactor(0.7).optActivation(a), false, true);
        }
    }

    /** Two identical layers (same seed, same declarations): one capped with room for every token, one dropless. */
    @Test
    void cappedWithLargeCapacityEqualsDroplessExactly() {
        for (int k = 1; k <= 2; k++) {
            final int kk = k;
            UnaryOperator<MoE.Builder> cfg = c -> c.optK(kk).optTop2SecondExpertSampling(false);
            ModelContext c1 = new ModelContext(b, DType.F32, 5), c2 = new ModelContext(b, DType.F32, 5);
            MoE capped = build(c1, cfg.apply(base()).optCapacityFactor(E), 3);
            MoE dropless = build(c2, cfg.apply(base()).optDropless(true), 3);
            Tensor x = Tensors.random(b, DType.F32, new SplittableRandom(8), 1.0, S, M);
            MoEOutput a = capped.forward(x), d = dropless.forward(x);
            assertEquals(S, capped.lastCapacity(), "capacity ceil(S/E * E * k) capped at S");
            assertEquals(0, dropless.lastCapacity());
            assertEquals(0.0, capped.droppedFraction(), 0.0);
            assertArrayEquals(d.output().toFloats(), a.output().toFloats(), "k=" + k + ": outputs must be bit-identical");
            assertArrayEquals(d.lAux().toFloats(), a.lAux().toFloats());
            assertArrayEquals(d.counts().toInts(), a.counts().toInts());
            Tensor r = Tensors.random(b, DType.F32, new SplittableRandom(9), 1.0, S, M);
            // row order inside an expert may differ (RTS slots), so the weight-gradient sums may round differently
            assertTrue(Tensors.relError(capped.backward(r, 0.1f).toDoubles(), dropless.backward(r, 0.1f).toDoubles()) < 1e-6, "k=" + k + ": dx");
            assertTrue(Tensors.relError(c1.params().grad().toDoubles(), c2.params().grad().toDoubles()) < 1e-6, "k=" + k + ": parameter gradients");
        }
    }

    @Test
    void paddedDroplessTop2MatchesFiniteDifferences() {
        gradCheck("padded", c -> c.optK(2).optDropless(true).optDroplessLayout(MoE.DroplessLayout.PADDED).optZLossCoeff(0.1), true, false);
    }

    /**
     * Dropless in the padded layout (capacity = the largest expert count) against the sorted layout, with the
     * gate's noise on: the same choices, the same output and losses bit for bit, gradients equal up to summation order.
     */
    @Test
    void paddedDroplessLayoutEqualsSorted() {
        for (int k = 1; k <= 2; k++) {
            final int kk = k;
            UnaryOperator<MoE.Builder> cfg = c -> c.optK(kk).optDropless(true).optNoisyGatePolicy("RSample");
            ModelContext c1 = new ModelContext(b, DType.F32, 5), c2 = new ModelContext(b, DType.F32, 5);
            c1.setTraining(true);
            c2.setTraining(true);
            MoE sorted = build(c1, cfg.apply(base()).optDroplessLayout(MoE.DroplessLayout.SORTED), 3);
            MoE padded = build(c2, cfg.apply(base()).optDroplessLayout(MoE.DroplessLayout.PADDED), 3);
            // the first input (by seed) whose routing is uneven, so that the padded layout really pads
            Tensor x = null;
            MoEOutput s = null;
            for (long seed = 8; seed < 100 && s == null; seed++) {
                if (x != null) x.close();
                x = Tensors.random(b, DType.F32, new SplittableRandom(seed), 1.0, S, M);
                long rng = c1.rngOffset();
                MoEOutput o = sorted.forward(x);
                if (java.util.Arrays.stream(o.counts().toInts()).max().orElseThrow() * E > S * k) s = o;
                else c1.setRngOffset(rng);   // the accepted forward and the padded one draw the same noise
            }
            assertNotNull(s, "k=" + k + ": no uneven routing found");
            MoEOutput p = padded.forward(x);
            int[] counts = s.counts().toInts();
            assertEquals(0, padded.lastCapacity(), "a padded dropless layer still reports dropless");
            assertEquals(0.0, padded.droppedFraction(), 0.0);
            assertArrayEquals(counts, p.counts().toInts(), "k=" + k + ": counts");
            assertArrayEquals(s.output().toFloats(), p.output().toFloats(), "k=" + k + ": outputs must be bit-identical");
            assertArrayEquals(s.lAux().toFloats(), p.lAux().toFloats(), "k=" + k + ": l_aux");
            Tensor r = Tensors.random(b, DType.F32, new SplittableRandom(9), 1.0, S, M);
            c1.params().zeroGrad();
            c2.params().zeroGrad();
            double dxErr = Tensors.relError(padded.backward(r, 0.1f).toDoubles(), sorted.backward(r, 0.1f).toDoubles());
            c1.params().finishGrads();
            c2.params().finishGrads();
            assertTrue(dxErr < 1e-6, "k=" + k + ": dx " + dxErr);
            double gErr = Tensors.relError(c2.params().grad().toDoubles(), c1.params().grad().toDoubles());
            assertTrue(gErr < 1e-6, "k=" + k + ": parameter gradients " + gErr);
        }
    }

    /**
     * The layer writes every buffer before reading it (the dispatch buffer and its gradient are no longer zero-filled:
     * the counts forms of moePermute / moeUnpermuteBackward zero the unused capacity and the padding): on a backend
     * whose {@code empty} tensors hold NaN, as a GPU's may hold garbage, the output, dx and every gradient equal the
     * plain CPU backend's bit for bit. Capped with drops (top-1 RTS, top-2), padded and sorted dropless, residual.
     */
    /**
     * A dropless layer in the AUTO layout asks its backend, with the layer's shape (S * k routed rows over E experts),
     * whether to pad to equal groups and whether to read the expert offsets to the host for its grouped products; it
     * does what the answers say.
     */
    @Test
    void droplessAutoLayoutAsksTheBackendWithTheLayersShape() {
        for (boolean equal : new boolean[] {false, true}) {
            for (boolean host : new boolean[] {false, true}) {
                java.util.List<long[]> asked = new java.util.ArrayList<>();   // {rows, groups} of each question
                java.util.List<Object[]> products = new java.util.ArrayList<>();   // {rows, host offsets} of each grouped product
                Backend spy = (Backend) Proxy.newProxyInstance(Backend.class.getClassLoader(), new Class<?>[] {Backend.class},
                        (proxy, method, args) -> switch (method.getName()) {
                            case "prefersEqualGroups" -> { asked.add(new long[] {(long) args[1], (int) args[2]}); yield equal; }
                            case "wantsHostOffsets" -> { asked.add(new long[] {(long) args[1], (int) args[2]}); yield host; }
                            case "groupedMatmul" -> {
                                if (args.length == 7) products.add(new Object[] {((Tensor) args[0]).rows(), args[4]});
                                yield method.invoke(b, args);
                            }
                            default -> method.invoke(b, args);
                        });
                ModelContext ctx = new ModelContext(spy, DType.F32, 5);
                ctx.setTraining(true);
                int k = 2, tokens = 48;
                MoE moe = build(ctx, base().optK(k).optDropless(true), 3);
                Tensor x = Tensors.random(b, DType.F32, new SplittableRandom(8), 1.0, tokens, M);
                int[] counts = moe.forward(x).counts().toInts();
                int most = java.util.Arrays.stream(counts).max().orElseThrow();
                String what = "equal groups preferred " + equal + ", host offsets wanted " + host;
                assertFalse(asked.isEmpty(), what + ": the layer asked");
                for (long[] q : asked) assertArrayEquals(new long[] {(long) tokens * k, E}, q, what + ": the layer's shape");
                boolean pads = equal && (long) E * most <= MoE.MAX_DROPLESS_PADDING * tokens * k;
                assertFalse(products.isEmpty(), what);
                for (Object[] pr : products) {
                    assertEquals(pads ? E * most : tokens * k, (int) pr[0], what + ": rows of the grouped products");
                    assertEquals(pads || host, pr[1] != null, what + ": host offsets given");
                }
            }
        }
    }

    /**
     * Grouped experts without a first bias take their activation with the products (groupedMatmulActivation and its
     * backward, which a backend may fuse); with expert biases the bias goes with the activation instead.
     */
    @Test
    void expertActivationGoesWithTheProductsWithoutAFirstBias() {
        for (boolean bias : new boolean[] {false, true}) {
            java.util.Map<String, Integer> calls = new java.util.HashMap<>();
            Backend spy = (Backend) Proxy.newProxyInstance(Backend.class.getClassLoader(), new Class<?>[] {Backend.class},
                    (proxy, method, args) -> {
                        calls.merge(method.getName(), 1, Integer::sum);
                        return method.invoke(b, args);
                    });
            ModelContext ctx = new ModelContext(spy, DType.F32, 5);
            ctx.setTraining(true);
            MoE moe = build(ctx, base().optK(2).optExpertBias(bias), 3);
            Tensor x = Tensors.random(b, DType.F32, new SplittableRandom(8), 1.0, S, M);
            Tensor r = Tensors.random(b, DType.F32, new SplittableRandom(9), 1.0, S, M);
            moe.forward(x);
            ctx.params().zeroGrad();
            moe.backward(r, 0.1f);
            int fused = bias ? 0 : 1;
            assertEquals(fused, calls.getOrDefault("groupedMatmulActivation", 0), "bias " + bias + ": forward");
            assertEquals(fused, calls.getOrDefault("groupedMatmulActivationBackward", 0), "bias " + bias + ": backward");
            assertEquals(bias ? 1 : 0, calls.getOrDefault("activationGroupBias", 0), "bias " + bias + ": the bias with the activation");
        }
    }

    @Test
    void readsNoUnwrittenMemory() {
        Backend garbage = (Backend) Proxy.newProxyInstance(Backend.class.getClassLoader(), new Class<?>[] {Backend.class},
                (proxy, method, args) -> {
                    if (!method.getName().equals("empty")) return method.invoke(b, args);
                    Tensor t = b.zeros((DType) args[0], (int[]) args[1]);
                    b.fill(t, Double.NaN);
                    return t;
                });
        java.util.Map<String, UnaryOperator<MoE.Builder>> cases = new java.util.LinkedHashMap<>();
        cases.put("capped top-1 RTS", c -> c.optK(1));
        cases.put("capped top-2", c -> c.optK(2));
        cases.put("padded dropless top-2", c -> c.optK(2).optDropless(true).optDroplessLayout(MoE.DroplessLayout.PADDED));
        cases.put("sorted dropless top-1", c -> c.optK(1).optDropless(true).optDroplessLayout(MoE.DroplessLayout.SORTED));
        cases.put("residual, capped top-1", c -> c.optK(1).optUseResidual(true));
        cases.forEach((name, cfg) -> {
            double[][] got = new double[2][];
            for (int i = 0; i < 2; i++) {
                ModelContext ctx = new ModelContext(i == 0 ? b : garbage, DType.F32, 5);
                ctx.setTraining(true);
                MoE moe = build(ctx, cfg.apply(base()).optZLossCoeff(0.1), 3);
                int tokens = 48;   // enough for uneven loads: drops and free rows at capacity factor 1
                Tensor x = Tensors.random(b, DType.F32, new SplittableRandom(8), 1.0, tokens, M);
                Tensor r = Tensors.random(b, DType.F32, new SplittableRandom(9), 1.0, tokens, M);
                double[] out = moe.forward(x).output().toDoubles();
                int k = moe.config().k(), rows = moe.lastCapacity() * E;
                double kept = (1 - moe.droppedFraction()) * tokens * k;
                if (rows > 0) assertTrue(moe.droppedFraction() > 0 && kept < rows, name + ": the case should drop and leave rows free");
                ctx.params().zeroGrad();
                double[] dx = moe.backward(r, 0.1f).toDoubles();
                ctx.params().finishGrads();
                got[i] = java.util.stream.DoubleStream.concat(java.util.stream.DoubleStream.concat(
                        java.util.Arrays.stream(out), java.util.Arrays.stream(dx)), java.util.Arrays.stream(ctx.params().grad().toDoubles())).toArray();
                moe.close();
                ctx.params().close();
            }
            assertArrayEquals(got[0], got[1], name + ": output, dx and gradients with NaN-filled empty tensors");
        });
    }

    /** A bf16 model gates in fp32 from the fp32 master weights and stays close to the fp32 model. */
    @Test
    void bf16ModelTracksTheF32ModelAndAccumulatesGradients() {
        ModelContext c32 = new ModelContext(b, DType.F32, 5), c16 = new ModelContext(b, DType.BF16, 5);
        UnaryOperator<MoE.Builder> cfg = c -> c.optK(2).optDropless(true).optActivation(Activation.GEGLU).optTop2SecondExpertSampling(false);
        MoE m32 = build(c32, cfg.apply(base()), 3), m16 = build(c16, cfg.apply(base()), 3);
        c16.backend().copy(c16.params().master(), c16.params().value());
        assertEquals(DType.F32, m16.gate().dtype());
        assertEquals(DType.BF16, c16.params().value().dtype());
        Tensor x32 = Tensors.random(b, DType.F32, new SplittableRandom(8), 1.0, S, M);
        Tensor x16 = b.empty(DType.BF16, S, M);
        b.copy(x32, x16);
        MoEOutput o32 = m32.forward(x32), o16 = m16.forward(x16);
        assertEquals(DType.BF16, o16.output().dtype());
        assertArrayEquals(o32.counts().toInts(), o16.counts().toInts(), "same routing");
        assertTrue(Tensors.relError(o16.output().toDoubles(), o32.output().toDoubles()) < 3e-2);
        Tensor r = Tensors.random(b, DType.F32, new SplittableRandom(9), 1.0, S, M);
        m32.backward(r, 0.01f);
        double[] once = c32.params().grad().toDoubles();
        m32.forward(x32);
        m32.backward(r, 0.01f);
        double[] twice = c32.params().grad().toDoubles();
        for (int i = 0; i < once.length; i++) assertEquals(2 * once[i], twice[i], 1e-5 * (1 + Math.abs(once[i])), "gradients accumulate");
        Tensor r16 = b.empty(DType.BF16, S, M);
        b.copy(r, r16);
        m16.backward(r16, 0.01f);
        assertTrue(Tensors.relError(c16.params().grad().toDoubles(), once) < 5e-2);
    }

    /** Steps run inside a Scope leave no tensor behind; a layer used without scopes frees its state on the next forward. */
    @Test
    void memoryIsFlatAcrossScopedSteps() {
        ModelContext ctx = new ModelContext(b, DType.F32, 5);
        MoE moe = build(ctx, base().optK(2).optUseResidual(true).optSharedExperts(1, 4).optNoisyGatePolicy("Jitter"), 3);
        Tensor x = Tensors.random(b, DType.F32, new SplittableRandom(8), 1.0, S, M);
        Tensor r = Tensors.random(b, DType.F32, new SplittableRandom(9), 1.0, S, M);
        long before = b.allocatedBytes();
        for (int step = 0; step < 3; step++) {
            try (var scope = dev.moe4j.core.tensor.Scope.open()) {
                moe.forward(x);
                moe.backward(r, 0.01f);
            }
            assertEquals(before, b.allocatedBytes(), "step " + step);
        }
        moe.forward(x).output().close();
        moe.backward(r, 0.01f).close();
        long held = b.allocatedBytes();
        moe.forward(x).output().close();
        moe.backward(r, 0.01f).close();
        assertEquals(held, b.allocatedBytes(), "unscoped steps do not grow");
        moe.close();
        assertEquals(before, b.allocatedBytes(), "close frees the saved state");
    }

    @Test
    void capacityFollowsDeepSpeed() {
        ModelContext ctx = new ModelContext(b, DType.F32, 1);
        MoE m = MoE.builder().setContext(ctx).setHiddenSize(4).setFfnSize(4).optNumExperts(4).build();
        assertEquals(4, m.capacity(8), "ceil(8/4) = 2 raised to minCapacity 4");
        assertEquals(8, m.capacity(32));
        assertEquals(2, m.capacity(2), "never more than S");
        MoE m2 = MoE.builder().setContext(ctx).optName("b").setHiddenSize(4).setFfnSize(4).optNumExperts(4).optK(2)
                .optMinCapacity(0).optCapacityFactor(1.5).optEvalCapacityFactor(0.5).build();
        assertEquals(15, m2.capacity(20), "top-2 doubles the factor: ceil(20/4 * 3)");
        ctx.setTraining(false);
        assertEquals(5, m2.capacity(20), "eval factor: ceil(20/4 * 1)");
    }

    @Test
    void noiseOnlyInTraining() {
        for (String policy : new String[] {"RSample", "Jitter"}) {
            ModelContext c1 = new ModelContext(b, DType.F64, 5), c2 = new ModelContext(b, DType.F64, 5);
            MoE noisy = build(c1, base().optK(2).optDropless(true).optNoisyGatePolicy(policy), 3);
            MoE clean = build(c2, base().optK(2).optDropless(true).optTop2SecondExpertSampling(false), 3);
            Tensor x = Tensors.random(b, DType.F64, new SplittableRandom(8), 1.0, S, M);
            c1.setTraining(false);
            c2.setTraining(false);
            assertArrayEquals(clean.forward(x).output().toDoubles(), noisy.forward(x).output().toDoubles(), 0.0, policy + ": eval is noise-free");
            c1.setTraining(true);
            c2.setTraining(true);
            double[] yc = clean.forward(x).output().toDoubles();
            double[] yn = noisy.forward(x).output().toDoubles();
            assertTrue(Tensors.relError(yn, yc) > 1e-6, policy + ": training adds noise");
        }
    }

    @Test
    void rtsRoutingIsReproducibleUnderASeed() {
        double[][] runs = new double[3][];
        long[] seeds = {11, 11, 12};
        for (int i = 0; i < 3; i++) {
            ModelContext ctx = new ModelContext(b, DType.F64, seeds[i]);
            MoE moe = build(ctx, MoE.builder().setHiddenSize(M).setFfnSize(F).optNumExperts(2).optMinCapacity(0).optCapacityFactor(0.5), 3);
            Tensor x = Tensors.random(b, DType.F64, new SplittableRandom(8), 1.0, 40, M);
            runs[i] = moe.forward(x).output().toDoubles();
            assertTrue(moe.droppedFraction() > 0.2);
        }
        assertArrayEquals(runs[0], runs[1], 0.0);
        assertTrue(Tensors.relError(runs[2], runs[0]) > 1e-3, "another seed drops other tokens");
    }

    @Test
    void builderRejectsBadConfigurationsNamingTheParameter() {
        ModelContext ctx = new ModelContext(b, DType.F32, 1);
        assertMessage("k", () -> MoE.builder().setContext(ctx).setHiddenSize(4).setFfnSize(4).optNumExperts(2).optK(3).build());
        assertMessage("epSize", () -> MoE.builder().setContext(ctx).setHiddenSize(4).setFfnSize(4).optNumExperts(6).optEpSize(4).build());
        assertMessage("epSize", () -> MoE.builder().setContext(ctx).setHiddenSize(4).setFfnSize(4).optNumExperts(4).optEpSize(2).build());
        assertMessage("capacityFactor", () -> MoE.builder().setContext(ctx).setHiddenSize(4).setFfnSize(4).optCapacityFactor(0).build());
        assertMessage("evalCapacityFactor", () -> MoE.builder().setContext(ctx).setHiddenSize(4).setFfnSize(4).optEvalCapacityFactor(-1).build());
        assertMessage("noisyGatePolicy", () -> MoE.builder().setContext(ctx).setHiddenSize(4).setFfnSize(4).optNoisyGatePolicy("Gaussian").build());
        assertMessage("hiddenSize", () -> MoE.builder().setContext(ctx).setFfnSize(4).build());
        assertMessage("ffnSize", () -> MoE.builder().setContext(ctx).setHiddenSize(4).build());
        assertMessage("minCapacity", () -> MoE.builder().setContext(ctx).setHiddenSize(4).setFfnSize(4).optMinCapacity(-1).build());
        assertMessage("context", () -> MoE.builder().setHiddenSize(4).setFfnSize(4).build());
        assertMessage("sharedFfnSize", () -> MoE.builder().setContext(ctx).setHiddenSize(4).setFfnSize(4).optSharedExperts(1, 0).build());
        MoE ok = MoE.builder().setContext(ctx).setHiddenSize(4).setFfnSize(4).optNoisyGatePolicy("None").build();
        assertNull(ok.config().noisyGatePolicy());
        assertEquals(1, ok.config().numExperts());
        assertEquals(4, ok.config().minCapacity());
        assertTrue(ok.config().useRts() && ok.config().dropTokens() && ok.config().top2SecondExpertSampling());
    }

    private static void assertMessage(String param, org.junit.jupiter.api.function.Executable e) {
        IllegalArgumentException ex = assertThrows(IllegalArgumentException.class, e);
        assertTrue(ex.getMessage().contains(param), "message should name " + param + ": " + ex.getMessage());
    }
}
