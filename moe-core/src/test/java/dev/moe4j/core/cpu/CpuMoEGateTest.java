package dev.moe4j.core.cpu;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.backend.GateOutputs;
import dev.moe4j.core.backend.GateSpec;
import dev.moe4j.core.backend.Philox;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.testing.GradCheck;
import dev.moe4j.core.testing.Tensors;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.CsvSource;

import java.lang.reflect.InvocationHandler;
import java.lang.reflect.Proxy;
import java.util.Arrays;
import java.util.HashSet;
import java.util.Set;
import java.util.SplittableRandom;

import static org.junit.jupiter.api.Assertions.*;

/** The fused gate and the index-based permute / unpermute of the CPU reference, against hand-computed cases. */
class CpuMoEGateTest {
    private final CpuBackend b = new CpuBackend();

    private GateOutputs outputs(DType dt, int s, int e, int k) {
        return new GateOutputs(b.zeros(dt, s, e), b.zeros(DType.I32, s, k), b.zeros(DType.I32, s, k), b.zeros(dt, s, k),
                b.zeros(DType.I32, e), b.zeros(DType.I32, e + 1), b.zeros(dt, 2));
    }

    private GateOutputs gate(double[][] logits, GateSpec spec, DType dt) {
        int s = logits.length, e = logits[0].length;
        double[] flat = Arrays.stream(logits).flatMapToDouble(Arrays::stream).toArray();
        Tensor l = b.fromDoubles(dt, flat, s, e);
        GateOutputs o = outputs(dt, s, e, spec.k());
        b.moeGate(spec, l, o);
        return o;
    }

    private static double[] softmax(double[] row) {
        double m = Arrays.stream(row).max().orElseThrow(), sum = 0;
        double[] p = new double[row.length];
        for (int i = 0; i < row.length; i++) sum += p[i] = Math.exp(row[i] - m);
        for (int i = 0; i < row.length; i++) p[i] /= sum;
        return p;
    }

    /** l_aux by the formula: E * sum_e mean_s(gates) * mean_s(first choice == e). */
    private static double laux(double[][] logits, int[] firstChoice) {
        int s = logits.length, e = logits[0].length;
        double r = 0;
        for (int j = 0; j < e; j++) {
            double me = 0, ce = 0;
            for (int t = 0; t < s; t++) {
                me += softmax(logits[t])[j];
                if (firstChoice[t] == j) ce++;
            }
            r += (me / s) * (ce / s);
        }
        return e * r;
    }

    @Test
    void top1DropsByPositionAtCapacity() {
        // tokens 0,1,2,4 prefer expert 0; 3,5 expert 1; capacity 2: tokens 2 and 4 are dropped
        double[][] l = {{2, 0}, {1, 0}, {3, 1}, {0, 2}, {0.5, 0}, {0, 1}};
        GateOutputs o = gate(l, new GateSpec(1, 2, false, false, false, 7, 0), DType.F64);
        assertArrayEquals(new int[] {0, 0, 0, 1, 0, 1}, o.experts().toInts());
        assertArrayEquals(new int[] {0, 1, -1, 2, -1, 3}, o.dest().toInts());
        assertArrayEquals(new int[] {4, 2}, o.counts().toInts(), "counts are before dropping");
        assertArrayEquals(new int[] {0, 2, 4}, o.offsets().toInts());
        double[] w = o.weights().toDoubles();
        int[] chosen = {0, 0, 0, 1, 0, 1};
        for (int s = 0; s < 6; s++) {
            double expected = (s == 2 || s == 4) ? 0 : softmax(l[s])[chosen[s]];
            assertEquals(expected, w[s], 1e-15, "weight of token " + s);
        }
        double[] losses = o.losses().toDoubles();
        assertEquals(laux(l, chosen), losses[0], 1e-14);
        double z = 0;
        for (double[] row : l) {
            double lse = Math.log(Arrays.stream(row).map(Math::exp).sum());
            z += lse * lse;
        }
        assertEquals(z / 6, losses[1], 1e-14);
        double[] g = o.gates().toDoubles();
        assertEquals(softmax(l[3])[1], g[3 * 2 + 1], 1e-15);
    }

    @Test
    void minCapacityWorthOfSlotsKeepsEveryToken() {
        double[][] l = {{2, 0}, {1, 0}, {3, 1}, {0, 2}, {0.5, 0}, {0, 1}};
        GateOutputs o = gate(l, new GateSpec(1, 4, false, false, false, 7, 0), DType.F64);
        assertArrayEquals(new int[] {0, 1, 2, 4, 3, 5}, o.dest().toInts());
    }

    @Test
    void top2SecondChoiceSlotsComeAfterAllFirstChoicesAndWeightsRenormalise() {
        // first choices: t0,t1,t3 -> e0; t2 -> e1. second: t0 -> e1, t1 -> e2, t2 -> e0, t3 -> e1
        double[][] l = {{3, 2, 0}, {3, 0, 1}, {2, 3, 0}, {2.5, 1.5, 0}};
        int c = 3;
        GateOutputs o = gate(l, new GateSpec(2, c, false, false, false, 7, 0), DType.F64);
        assertArrayEquals(new int[] {0, 1, 0, 2, 1, 0, 0, 1}, o.experts().toInts());
        // e0: first-choice slots 0,1,2 (t0,t1,t3); t2's second choice would be slot 3 = C: dropped
        // e1: t2 first (slot 0), then t0 (slot 1), t3 (slot 2); e2: t1 second (slot 0)
        assertArrayEquals(new int[] {0, c + 1, 1, 2 * c, c, -1, 2, c + 2}, o.dest().toInts());
        assertArrayEquals(new int[] {4, 3, 1}, o.counts().toInts());
        assertArrayEquals(new int[] {0, 3, 6, 9}, o.offsets().toInts());
        double[] w = o.weights().toDoubles();
        double[] p0 = softmax(l[0]), p2 = softmax(l[2]);
        assertEquals(p0[0] / (p0[0] + p0[1]), w[0], 1e-15);
        assertEquals(p0[1] / (p0[0] + p0[1]), w[1], 1e-15);
        assertEquals(1.0, w[4], 1e-15, "the only kept choice gets weight 1");
        assertEquals(0.0, w[5], 0.0);
        assertTrue(p2[1] < 0.99);
        assertEquals(laux(l, new int[] {0, 0, 1, 0}), o.losses().toDoubles()[0], 1e-14);
    }

    @Test
    void rtsKeepsTheHighestPrioritiesReproduciblyAndDifferentlyAcrossSeeds() {
        int s = 64, e = 2, c = 8;
        double[][] l = new double[s][];
        for (int t = 0; t < s; t++) l[t] = new double[] {1, 0};
        long seed = 1234, offset = 99;
        GateOutputs o = gate(l, new GateSpec(1, c, true, false, false, seed, offset), DType.F64);
        int[] dest = o.dest().toInts();
        // independent recompute from the documented counters: priority(s) = uniform(seed, offset + S*E + s*k)
        Integer[] order = new Integer[s];
        for (int t = 0; t < s; t++) order[t] = t;
        double[] prio = new double[s];
        for (int t = 0; t < s; t++) prio[t] = Philox.uniform(seed, offset + (long) s * e + t);
        Arrays.sort(order, (x, y) -> Double.compare(prio[y], prio[x]));
        for (int r = 0; r < s; r++) {
            int t = order[r];
            assertEquals(r < c ? r : -1, dest[t], "token " + t + " of priority rank " + r);
        }
        Set<Integer> kept = keptSet(dest);
        assertEquals(c, kept.size());
        assertNotEquals(Set.of(0, 1, 2, 3, 4, 5, 6, 7), kept, "RTS must not keep by position");
        assertArrayEquals(dest, gate(l, new GateSpec(1, c, true, false, false, seed, offset), DType.F64).dest().toInts(), "same seed, same drops");
        assertNotEquals(kept, keptSet(gate(l, new GateSpec(1, c, true, false, false, seed + 1, offset), DType.F64).dest().toInts()));
        assertNotEquals(kept, keptSet(gate(l, new GateSpec(1, c, true, false, false, seed, offset + 1000), DType.F64).dest().toInts()));
    }

    private static Set<Integer> keptSet(int[] dest) {
        Set<Integer> kept = new HashSet<>();
        for (int t = 0; t < dest.length; t++) if (dest[t] >= 0) kept.add(t);
        return kept;
    }

    @Test
    void gumbelChoicesFollowTheDocumentedCounters() {
        int s = 40, e = 4, k = 2;
        long seed = 5, offset = 17;
        SplittableRandom rnd = new SplittableRandom(3);
        double[][] l = new double[s][e];
        for (double[] row : l) for (int j = 0; j < e; j++) row[j] = rnd.nextDouble() * 0.5;
        GateOutputs o = gate(l, new GateSpec(k, 0, false, true, true, seed, offset), DType.F64);
        int[] ex = o.experts().toInts();
        int differ = 0;
        for (int t = 0; t < s; t++) {
            double[] noisy = new double[e];
            for (int j = 0; j < e; j++) {
                int w0 = Philox.block(seed, offset + (long) t * e + j)[0];
                double u = ((w0 >>> 8) + 0.5) / 16777216.0;
                noisy[j] = l[t][j] - Math.log(-Math.log(u));
            }
            Integer[] idx = {0, 1, 2, 3};
            Arrays.sort(idx, (x, y) -> Double.compare(noisy[y], noisy[x]));
            assertEquals(idx[0], ex[t * k], "first choice of token " + t);
            assertEquals(idx[1], ex[t * k + 1], "second choice of token " + t);
            int clean = 0;
            for (int j = 1; j < e; j++) if (l[t][j] > l[t][clean]) clean = j;
            if (clean != ex[t * k]) differ++;
        }
        assertTrue(differ > 0, "noise changed no choice");
    }

    @Test
    void droplessKeepsEveryChoiceSortedByExpert() {
        int s = 10, e = 3, k = 2;
        SplittableRandom rnd = new SplittableRandom(11);
        double[][] l = new double[s][e];
        for (double[] row : l) for (int j = 0; j < e; j++) row[j] = rnd.nextDouble() * 4;
        GateOutputs o = gate(l, new GateSpec(k, 0, false, false, false, 1, 0), DType.F64);
        int[] dest = o.dest().toInts(), ex = o.experts().toInts(), counts = o.counts().toInts(), off = o.offsets().toInts();
        assertEquals(s * k, off[e]);
        boolean[] seen = new boolean[s * k];
        for (int i = 0; i < s * k; i++) {
            assertTrue(dest[i] >= off[ex[i]] && dest[i] < off[ex[i] + 1], "choice " + i + " lies in its expert's rows");
            assertFalse(seen[dest[i]], "row " + dest[i] + " used twice");
            seen[dest[i]] = true;
        }
        for (int j = 0; j < e; j++) assertEquals(off[j + 1] - off[j], counts[j]);
        double[] w = o.weights().toDoubles();
        for (int t = 0; t < s; t++) assertEquals(1.0, w[t * k] + w[t * k + 1], 1e-14);
    }

    @Test
    void rejectsKLargerThanExperts() {
        Tensor l = b.fromDoubles(DType.F32, new double[] {1, 2, 3, 4}, 2, 2);
        var ex = assertThrows(IllegalArgumentException.class, () -> b.moeGate(new GateSpec(3, 2, false, false, false, 0, 0), l, outputs(DType.F32, 2, 2, 3)));
        assertTrue(ex.getMessage().contains("k"), ex.getMessage());
    }

    /**
     * The counts forms of moePermute and moeUnpermuteBackward into NaN-filled buffers give what the plain forms give
     * into zeroed ones: every row written, the unused capacity (CAPPED, with drops) and the padding (PADDED) 0. Backend's
     * default (fill, then the plain form) gives the same. Counts or a buffer of another routing are rejected.
     */
    @ParameterizedTest
    @CsvSource({"1, 5, 40, 9, CAPPED", "2, 5, 40, 17, CAPPED", "1, 5, 40, 0, PADDED", "2, 4, 30, 0, PADDED", "2, 4, 30, 0, SORTED"})
    void countsFormsWriteEveryRowOfTheBuffer(int k, int e, int s, int capacity, String layout) {
        SplittableRandom rnd = new SplittableRandom(31L * k + e);
        Tensor logits = Tensors.random(b, DType.F32, rnd, 2, s, e);
        GateOutputs first = outputs(DType.F32, s, e, k);
        b.moeGate(new GateSpec(k, capacity, false, false, false, 5, 0), logits, first);
        // PADDED: MoE's padded dropless layout, the gate with capacity = the largest count (what moeGatePad gives)
        int c = layout.equals("PADDED") ? Arrays.stream(first.counts().toInts()).max().orElseThrow() : capacity;
        GateOutputs o = c == capacity ? first : outputs(DType.F32, s, e, k);
        if (o != first) b.moeGate(new GateSpec(k, c, false, false, false, 5, 0), logits, o);
        int m = 7, rows = c > 0 ? e * c : s * k;
        int[] dest = o.dest().toInts(), counts = o.counts().toInts();
        long addressed = Arrays.stream(dest).filter(d -> d >= 0).count();
        if (c > 0) assertTrue(addressed < rows, "the case should leave rows of the buffer free");
        assertEquals(layout.equals("CAPPED"), addressed < (long) s * k, "drops exactly when capped");
        Backend viaDefaults = (Backend) Proxy.newProxyInstance(Backend.class.getClassLoader(), new Class<?>[] {Backend.class},
                (proxy, method, args) -> method.isDefault() && method.getName().startsWith("moe")
                        ? InvocationHandler.invokeDefault(proxy, method, args) : method.invoke(b, args));

        Tensor x = Tensors.random(b, DType.F32, rnd, 1, s, m), want = b.zeros(DType.F32, rows, m);
        b.moePermute(x, o.dest(), want);
        for (int i = 0; i < 2; i++) {
            Tensor buf = b.zeros(DType.F32, rows, m);
            b.fill(buf, Double.NaN);
            (i == 0 ? b : viaDefaults).moePermute(x, o.dest(), o.counts(), c, buf);
            assertArrayEquals(want.toDoubles(), buf.toDoubles(), "moePermute's counts form, " + (i == 0 ? "CpuBackend" : "Backend's default"));
        }

        Tensor dout = Tensors.random(b, DType.F32, rnd, 1, s, m), y = Tensors.random(b, DType.F32, rnd, 1, rows, m);
        Tensor wantDbuf = b.zeros(DType.F32, rows, m), wantDw = b.zeros(DType.F32, s, k);
        b.moeUnpermuteBackward(dout, y, o.dest(), o.weights(), wantDbuf, wantDw);
        for (int i = 0; i < 2; i++) {
            Tensor dbuf = b.zeros(DType.F32, rows, m), dw = b.zeros(DType.F32, s, k);
            b.fill(dbuf, Double.NaN);
            (i == 0 ? b : viaDefaults).moeUnpermuteBackward(dout, y, o.dest(), o.weights(), o.counts(), c, dbuf, dw);
            String on = i == 0 ? "CpuBackend" : "Backend's default";
            assertArrayEquals(wantDbuf.toDoubles(), dbuf.toDoubles(), "moeUnpermuteBackward's counts form, " + on + ": dbuf");
            assertArrayEquals(wantDw.toDoubles(), dw.toDoubles(), "moeUnpermuteBackward's counts form, " + on + ": dw");
        }

        // another routing's counts (one more choice for an expert with free slots), or a buffer of another size
        Tensor buf = b.zeros(DType.F32, rows, m);
        if (c > 0) {
            int[] bad = counts.clone();
            int free = 0;
            while (bad[free] >= c) free++;
            bad[free]++;
            var ex = assertThrows(IllegalArgumentException.class, () -> b.moePermute(x, o.dest(), b.fromInts(bad, e), c, buf));
            assertTrue(ex.getMessage().contains("row"), ex.getMessage());
            assertThrows(IllegalArgumentException.class, () -> b.moeUnpermuteBackward(dout, y, o.dest(), o.weights(), b.fromInts(bad, e), c, buf, null));
        }
        Tensor other = b.zeros(DType.F32, rows + 1, m);
        var ex = assertThrows(IllegalArgumentException.class, () -> b.moePermute(x, o.dest(), o.counts(), c, other));
        assertTrue(ex.getMessage().contains("buf"), ex.getMessage());
    }

    /**
     * moeGatePad of a dropless routing is the gate routed again with that capacity (at least the largest count), on the
     * same logits and random draws: the same dest and offsets, and every other output of that call equals the
     * dropless one's. A capacity below the largest count, or a routing with drops, is refused.
     */
    @ParameterizedTest
    @CsvSource({"1, 5, 40, 0, false, false", "2, 6, 50, 0, false, true", "2, 4, 30, 3, true, false", "3, 7, 33, 1, true, true"})
    void padIsTheGateRoutedWithThatCapacity(int k, int e, int s, int extra, boolean rsample, boolean second) {
        SplittableRandom rnd = new SplittableRandom(97L * k + s);
        Tensor logits = Tensors.random(b, DType.F32, rnd, 2, s, e);
        GateOutputs dropless = outputs(DType.F32, s, e, k);
        b.moeGate(new GateSpec(k, 0, false, rsample, second, 11, 1L << 20), logits, dropless);
        int most = Arrays.stream(dropless.counts().toInts()).max().orElseThrow(), c = most + extra;
        GateOutputs routed = outputs(DType.F32, s, e, k);
        b.moeGate(new GateSpec(k, c, false, rsample, second, 11, 1L << 20), logits, routed);
        Tensor dest = b.zeros(DType.I32, s, k), offsets = b.zeros(DType.I32, e + 1);
        b.moeGatePad(dropless, c, dest, offsets);
        assertArrayEquals(routed.dest().toInts(), dest.toInts(), "dest");
        assertArrayEquals(routed.offsets().toInts(), offsets.toInts(), "offsets");
        assertTrue(Arrays.stream(dest.toInts()).allMatch(d -> d >= 0 && d < e * c), "nothing dropped, every row inside E*C");
        assertArrayEquals(routed.gates().toDoubles(), dropless.gates().toDoubles(), "gates");
        assertArrayEquals(routed.experts().toInts(), dropless.experts().toInts(), "experts");
        assertArrayEquals(routed.weights().toDoubles(), dropless.weights().toDoubles(), "weights");
        assertArrayEquals(routed.counts().toInts(), dropless.counts().toInts(), "counts");
        assertArrayEquals(routed.losses().toDoubles(), dropless.losses().toDoubles(), "losses");

        var low = assertThrows(IllegalArgumentException.class, () -> b.moeGatePad(dropless, most - 1, dest, offsets));
        assertTrue(low.getMessage().contains("largest expert count " + most), low.getMessage());
        if (most > 1) {
            GateOutputs capped = outputs(DType.F32, s, e, k);
            b.moeGate(new GateSpec(k, most - 1, false, rsample, second, 11, 1L << 20), logits, capped);
            var drops = assertThrows(IllegalArgumentException.class, () -> b.moeGatePad(capped, most, dest, offsets));
            assertTrue(drops.getMessage().contains("drops"), drops.getMessage());
        }
    }

    // ---------------------------------------------------------------- gradients

    private void checkGateBackward(int k, int capacity, int s, int e, long seed) {
        SplittableRandom rnd = new SplittableRandom(seed);
        Tensor logits = Tensors.random(b, DType.F64, rnd, 2.0, s, e);
        Tensor r = Tensors.random(b, DType.F64, rnd, 1.0, s, k);
        float lc = 0.7f, zc = 0.3f;
        GateSpec spec = new GateSpec(k, capacity, false, false, false, 3, 0);
        GateOutputs o = outputs(DType.F64, s, e, k);
        b.moeGate(spec, logits, o);
        if (capacity > 0) assertTrue(Arrays.stream(o.dest().toInts()).anyMatch(d -> d < 0), "the case should drop something");
        Tensor dlogits = b.zeros(DType.F64, s, e);
        b.moeGateBackward(spec, logits, o, r, lc, zc, dlogits);
        GradCheck.check("dlogits k=" + k + " C=" + capacity, logits, dlogits, () -> {
            GateOutputs p = outputs(DType.F64, s, e, k);
            b.moeGate(spec, logits, p);
            double[] ls = p.losses().toDoubles();
            return Tensors.dot(p.weights(), r) + lc * ls[0] + zc * ls[1];
        }, 200, GradCheck.F64_TOL);
    }

    @Test
    void gateBackwardTop1WithDropsMatchesFiniteDifferences() { checkGateBackward(1, 3, 16, 4, 1); }

    @Test
    void gateBackwardTop2WithDropsMatchesFiniteDifferences() { checkGateBackward(2, 4, 12, 4, 2); }

    @Test
    void gateBackwardTop3DroplessMatchesFiniteDifferences() { checkGateBackward(3, 0, 9, 5, 3); }

    @Test
    void unpermuteAndItsBackwardMatchFiniteDifferences() {
        SplittableRandom rnd = new SplittableRandom(9);
        int s = 5, m = 3, k = 2, rows = 12;
        Tensor buf = Tensors.random(b, DType.F64, rnd, 1, rows, m);
        Tensor w = Tensors.random(b, DType.F64, rnd, 1, s, k);
        Tensor dest = b.fromInts(new int[] {3, 0, 7, -1, 11, 2, 5, 6, -1, 4}, s, k);
        Tensor r = Tensors.random(b, DType.F64, rnd, 1, s, m);
        Tensor out = b.zeros(DType.F64, s, m);
        b.moeUnpermute(buf, dest, w, out);
        double[] o = out.toDoubles(), bb = buf.toDoubles(), ww = w.toDoubles();
        assertEquals(ww[0] * bb[3 * m + 1] + ww[1] * bb[1], o[1], 1e-15);
        assertEquals(ww[6] * bb[5 * m + 2] + ww[7] * bb[6 * m + 2], o[3 * m + 2], 1e-15);
        Tensor dbuf = b.zeros(DType.F64, rows, m), dw = b.zeros(DType.F64, s, k);
        b.moeUnpermuteBackward(r, buf, dest, w, dbuf, dw);
        GradCheck.check("dbuf", buf, dbuf, () -> { b.moeUnpermute(buf, dest, w, out); return Tensors.dot(out, r); }, 100, GradCheck.F64_TOL);
        GradCheck.check("dw", w, dw, () -> { b.moeUnpermute(buf, dest, w, out); return Tensors.dot(out, r); }, 100, GradCheck.F64_TOL);
        // permute then unweighted unpermute: each token's rows summed back
        Tensor x = Tensors.random(b, DType.F64, rnd, 1, s, m);
        Tensor pb = b.zeros(DType.F64, rows, m);
        b.moePermute(x, dest, pb);
        double[] xs = x.toDoubles(), ps = pb.toDoubles();
        assertEquals(xs[3 * m], ps[5 * m], 0.0);
        assertEquals(xs[3 * m], ps[6 * m], 0.0);
        assertEquals(xs[2 * m + 1], ps[11 * m + 1], 0.0);
        assertEquals(0.0, ps[m], 0.0, "unaddressed rows untouched");
        Tensor back = b.zeros(DType.F64, s, m);
        b.moeUnpermute(pb, dest, null, back);
        assertEquals(2 * xs[0], back.toDoubles()[0], 1e-15);
        assertEquals(xs[m + 1], back.toDoubles()[m + 1], 1e-15);
        assertThrows(IllegalArgumentException.class, () -> b.moePermute(x, dest, b.zeros(DType.F64, 8, m)));
    }
}
