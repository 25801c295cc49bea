package dev.moe4j.core.cpu;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.testing.GradCheck;
import dev.moe4j.core.testing.Tensors;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.EnumSource;

import java.util.SplittableRandom;
import java.util.function.DoubleSupplier;

import static dev.moe4j.core.testing.GradCheck.F64_TOL;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

/** Every backward op of the CPU backend against float64 central differences, on odd random shapes. */
class CpuOpsGradientTest {
    private final Backend cpu = new CpuBackend();
    private final SplittableRandom rnd = new SplittableRandom(42);
    private static final DType F = DType.F64;

    private Tensor rand(int... shape) { return Tensors.random(cpu, F, rnd, 1, shape); }

    @ParameterizedTest
    @EnumSource(Activation.class)
    void activation(Activation act) {
        int n = 5, f = 7;
        Tensor x = rand(n, act.inputWidth(f)), r = rand(n, f), y = cpu.zeros(F, n, f), dx = cpu.zeros(F, n, act.inputWidth(f));
        cpu.activationBackward(act, x, r, dx);
        GradCheck.check(act + " dx", x, dx, () -> { cpu.activation(act, x, y); return Tensors.dot(y, r); }, 200, F64_TOL);
    }

    @Test
    void layerNorm() {
        int n = 6, c = 9;
        Tensor x = rand(n, c), g = rand(c), b = rand(c), r = rand(n, c);
        Tensor out = cpu.zeros(F, n, c), mean = cpu.zeros(F, n), rstd = cpu.zeros(F, n);
        Tensor dx = cpu.zeros(F, n, c), dg = rand(c), db = rand(c);
        double[] dg0 = dg.toDoubles(), db0 = db.toDoubles();
        DoubleSupplier loss = () -> { cpu.layerNorm(x, g, b, 1e-5f, out, mean, rstd); return Tensors.dot(out, r); };
        loss.getAsDouble();
        cpu.layerNormBackward(r, x, g, mean, rstd, dx, dg, db);
        // dgamma and dbeta accumulate: subtract what was there before.
        Tensor dgOnly = cpu.fromDoubles(F, minus(dg.toDoubles(), dg0), c), dbOnly = cpu.fromDoubles(F, minus(db.toDoubles(), db0), c);
        GradCheck.check("dx", x, dx, loss, 200, F64_TOL);
        GradCheck.check("dgamma", g, dgOnly, loss, 200, F64_TOL);
        GradCheck.check("dbeta", b, dbOnly, loss, 200, F64_TOL);
    }

    @Test
    void softmax() {
        Tensor x = rand(4, 11), r = rand(4, 11), y = cpu.zeros(F, 4, 11), dx = cpu.zeros(F, 4, 11);
        cpu.softmax(x, y);
        cpu.softmaxBackward(y, r, dx);
        GradCheck.check("softmax dx", x, dx, () -> { cpu.softmax(x, y); return Tensors.dot(y, r); }, 200, F64_TOL);
    }

    @Test
    void attention() {
        int b = 2, t = 5, h = 3, d = 4, c = h * d;
        Tensor qkv = rand(b, t, 3 * c), r = rand(b * t, c), out = cpu.zeros(F, b * t, c), lse = cpu.zeros(F, b, h, t);
        Tensor dqkv = cpu.zeros(F, b, t, 3 * c);
        DoubleSupplier loss = () -> { cpu.attention(qkv, h, out, lse); return Tensors.dot(out, r); };
        loss.getAsDouble();
        cpu.attentionBackward(r, qkv, out, lse, h, dqkv);
        GradCheck.check("attention dqkv", qkv, dqkv, loss, 400, F64_TOL);
    }

    @Test
    void attentionIsCausal() {
        int b = 1, t = 6, h = 2, c = 8;
        Tensor qkv = rand(b, t, 3 * c), out1 = cpu.zeros(F, t, c), out2 = cpu.zeros(F, t, c), lse = cpu.zeros(F, b, h, t);
        cpu.attention(qkv, h, out1, lse);
        double[] v = qkv.toDoubles();
        for (int j = 0; j < 3 * c; j++) v[(t - 1) * 3 * c + j] += 5;  // change only the last token
        cpu.attention(cpu.fromDoubles(F, v, b, t, 3 * c), h, out2, lse);
        double[] a = out1.toDoubles(), z = out2.toDoubles();
        for (int i = 0; i < (t - 1) * c; i++) assertEquals(a[i], z[i], 0.0, "output of an earlier token changed");
    }

    @Test
    void crossEntropy() {
        int n = 7, v = 10;
        Tensor logits = rand(n, v), losses = cpu.zeros(F, n), dl = cpu.zeros(F, n, v);
        int[] tg = new int[n];
        for (int i = 0; i < n; i++) tg[i] = rnd.nextInt(v);
        tg[3] = -1;  // ignored row
        Tensor targets = cpu.fromInts(tg, n), sum = cpu.zeros(F, 1);
        cpu.crossEntropyBackward(logits, targets, 0.5f, dl);
        GradCheck.check("CE dlogits", logits, dl, () -> { cpu.crossEntropy(logits, targets, losses); cpu.sum(losses, sum); return 0.5 * sum.toDoubles()[0]; }, 200, F64_TOL);
        assertEquals(0.0, losses.toDoubles()[3], "ignored row must have zero loss");
    }

    @Test
    void distillation() {
        int n = 4, v = 9;
        float temp = 2.5f;
        Tensor s = rand(n, v), t = rand(n, v), losses = cpu.zeros(F, n), ds = cpu.zeros(F, n, v), sum = cpu.zeros(F, 1);
        cpu.distillationLossBackward(s, t, temp, 1f, ds);
        GradCheck.check("KD dstudent", s, ds, () -> { cpu.distillationLoss(s, t, temp, losses); cpu.sum(losses, sum); return sum.toDoubles()[0]; }, 200, F64_TOL);
        cpu.distillationLoss(t, t, temp, losses);
        for (double l : losses.toDoubles()) assertEquals(0.0, l, 1e-12, "KL of a distribution with itself");
    }

    @Test
    void embedding() {
        int b = 2, t = 3, v = 5, c = 4;
        Tensor wte = rand(v, c), wpe = rand(t + 2, c), r = rand(b * t, c), out = cpu.zeros(F, b * t, c);
        Tensor tokens = cpu.fromInts(new int[] {1, 4, 1, 0, 1, 3}, b, t);
        Tensor dwte = cpu.zeros(F, v, c), dwpe = cpu.zeros(F, t + 2, c);
        cpu.embeddingBackward(r, tokens, dwte, dwpe);
        DoubleSupplier loss = () -> { cpu.embedding(tokens, wte, wpe, out); return Tensors.dot(out, r); };
        GradCheck.check("dwte", wte, dwte, loss, 100, F64_TOL);
        GradCheck.check("dwpe", wpe, dwpe, loss, 100, F64_TOL);
    }

    @Test
    void groupedMatmulAndWeightGrad() {
        int t = 9, k = 5, n = 3, e = 3;
        Tensor a = rand(t, k), w = rand(e, k, n), wt = rand(e, n, k), r = rand(t, n), c = cpu.zeros(F, t, n);
        Tensor offsets = cpu.fromInts(new int[] {0, 4, 4, 8}, e + 1);  // an empty expert, and a last row left out
        Tensor dw = cpu.zeros(F, e, k, n), dwt = cpu.zeros(F, e, n, k), da = cpu.zeros(F, t, k);
        cpu.groupedMatmulWeightGrad(a, r, offsets, dw, 0f);
        cpu.groupedMatmulWeightGrad(r, a, offsets, dwt, 0f);   // transposed layout: swap the operands
        cpu.groupedMatmul(r, w, true, offsets, da, 0f);        // dA = dY W^T per expert
        DoubleSupplier loss = () -> { cpu.fill(c, 0); cpu.groupedMatmul(a, w, false, offsets, c, 0f); return Tensors.dot(c, r); };
        DoubleSupplier lossT = () -> { cpu.fill(c, 0); cpu.groupedMatmul(a, wt, true, offsets, c, 0f); return Tensors.dot(c, r); };
        GradCheck.check("grouped dW", w, dw, loss, 200, F64_TOL);
        GradCheck.check("grouped dW transposed", wt, dwt, lossT, 200, F64_TOL);
        double[] daV = da.toDoubles();
        for (int j = 0; j < k; j++) assertEquals(0.0, daV[8 * k + j], "row past offsets[E] must be untouched");
        Tensor daHead = cpu.fromDoubles(F, java.util.Arrays.copyOf(daV, 8 * k), 8, k);
        Tensor aHead = a.rowSlice(0, 8);
        GradCheck.check("grouped dA", aHead, daHead, loss, 200, F64_TOL);
        // host offsets: the same result when they agree, a clear refusal when they do not
        Tensor c2 = cpu.zeros(F, t, n);
        cpu.fill(c, 0);
        cpu.groupedMatmul(a, w, false, offsets, c, 0f);
        cpu.groupedMatmul(a, w, false, offsets, new int[] {0, 4, 4, 8}, c2, 0f);
        assertArrayEquals(c.toDoubles(), c2.toDoubles());
        IllegalArgumentException e1 = assertThrows(IllegalArgumentException.class,
                () -> cpu.groupedMatmul(a, w, false, offsets, new int[] {0, 4, 5, 8}, c2, 0f));
        assertTrue(e1.getMessage().contains("hostOffsets [0, 4, 5, 8] differ from offsets [0, 4, 4, 8]"), e1.getMessage());
        assertThrows(IllegalArgumentException.class, () -> cpu.groupedMatmulWeightGrad(a, r, offsets, new int[] {0, 3, 4, 8}, dw, 0f));
    }

    @Test
    void gatherScatterAreAdjoint() {
        int n = 6, m = 8, c = 3;
        Tensor src = rand(n, c), r = rand(m, c), out = cpu.zeros(F, m, c), w = rand(m);
        Tensor idx = cpu.fromInts(new int[] {5, 0, -1, 2, 2, 4, 0, 1}, m);
        Tensor dsrc = cpu.zeros(F, n, c);
        cpu.scatterAddRows(r, idx, null, dsrc);
        GradCheck.check("gather dsrc", src, dsrc, () -> { cpu.gatherRows(src, idx, out); return Tensors.dot(out, r); }, 100, F64_TOL);
        cpu.gatherRows(src, idx, out);
        double[] o = out.toDoubles();
        for (int j = 0; j < c; j++) assertEquals(0.0, o[2 * c + j], "negative index gathers zeros");
        Tensor dst = cpu.zeros(F, n, c);
        cpu.scatterAddRows(r, idx, w, dst);
        double[] d = dst.toDoubles(), rv = r.toDoubles(), wv = w.toDoubles();
        double expect = wv[3] * rv[3 * c + 1] + wv[4] * rv[4 * c + 1];
        assertEquals(expect, d[2 * c + 1], 1e-12, "weighted scatter-add sums duplicates");
    }

    private static double[] minus(double[] a, double[] b) {
        double[] r = new double[a.length];
        for (int i = 0; i < a.length; i++) r[i] = a[i] - b[i];
        return r;
    }
}
