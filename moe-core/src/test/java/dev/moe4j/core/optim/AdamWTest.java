package dev.moe4j.core.optim;

import dev.moe4j.core.cpu.CpuBackend;
import dev.moe4j.core.nn.Init;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.nn.Parameter;
import dev.moe4j.core.tensor.DType;
import org.junit.jupiter.api.Test;

import java.util.SplittableRandom;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

class AdamWTest {
    private final CpuBackend cpu = new CpuBackend();

    /** Textbook AdamW (Loshchilov & Hutter) on plain arrays, one parameter group. */
    private static void reference(double[] p, double[] g, double[] m, double[] v, double lr, double b1, double b2, double eps, double wd, int t, double clip) {
        for (int i = 0; i < p.length; i++) {
            double gi = g[i] * clip;
            m[i] = b1 * m[i] + (1 - b1) * gi;
            v[i] = b2 * v[i] + (1 - b2) * gi * gi;
            double mh = m[i] / (1 - Math.pow(b1, t)), vh = v[i] / (1 - Math.pow(b2, t));
            p[i] = p[i] - lr * (mh / (Math.sqrt(vh) + eps) + wd * p[i]);
        }
    }

    @Test
    void matchesTheTextbookUpdateWithDecayOnlyOnMatricesAndClipping() {
        ModelContext ctx = new ModelContext(cpu, DType.F64, 3);
        Parameter w = ctx.params().add("w", Init.normal(1), true, 3, 4);
        Parameter b = ctx.params().add("b", Init.normal(1), false, 5);
        ctx.allocateParameters();
        AdamW opt = new AdamW(ctx.params(), 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f);
        SplittableRandom r = new SplittableRandom(5);
        double[] pw = w.master().toDoubles(), pb = b.master().toDoubles();
        double[] mw = new double[12], vw = new double[12], mb = new double[5], vb = new double[5];
        for (int t = 1; t <= 3; t++) {
            double[] gw = new double[12], gb = new double[5];
            double sq = 0;
            for (int i = 0; i < 12; i++) { gw[i] = r.nextDouble() * 2 - 1; sq += gw[i] * gw[i]; }
            for (int i = 0; i < 5; i++) { gb[i] = r.nextDouble() * 2 - 1; sq += gb[i] * gb[i]; }
            cpu.copy(cpu.fromDoubles(DType.F64, gw, 3, 4), w.grad());
            cpu.copy(cpu.fromDoubles(DType.F64, gb, 5), b.grad());
            double norm = Math.sqrt(sq), clip = norm > 0.5 ? 0.5 / norm : 1;
            double lr = 1e-2 * t;
            double sqDevice = opt.step((float) lr).toDoubles()[0];
            assertEquals(sq, sqDevice, 1e-12);
            reference(pw, gw, mw, vw, (float) lr, 0.9f, 0.95f, 1e-8f, 0.1f, t, clip);
            reference(pb, gb, mb, vb, (float) lr, 0.9f, 0.95f, 1e-8f, 0.0, t, clip);
            assertArrayEquals(pw, w.master().toDoubles(), 1e-12, "decayed weights at step " + t);
            assertArrayEquals(pb, b.master().toDoubles(), 1e-12, "undecayed bias at step " + t);
        }
    }

    @Test
    void aNonFiniteGradientSkipsTheWholeUpdate() {
        ModelContext ctx = new ModelContext(cpu, DType.F32, 3);
        Parameter w = ctx.params().add("w", Init.normal(1), true, 4);
        ctx.allocateParameters();
        AdamW opt = AdamW.withDefaults(ctx.params());
        float[] before = w.master().toFloats();
        cpu.copy(cpu.fromFloats(DType.F32, new float[] {1, Float.NaN, 2, 3}, 4), w.grad());
        double sq = opt.step(1e-2f).toDoubles()[0];
        assertEquals(Double.NaN, sq);
        assertArrayEquals(before, w.master().toFloats(), "parameters must not change on a NaN step");
        assertArrayEquals(new float[4], opt.firstMoment().toFloats(), "moments must not change on a NaN step");
        cpu.copy(cpu.fromFloats(DType.F32, new float[] {0, 0, 3, 4}, 4), w.grad());
        assertEquals(25.0, opt.step(1e-2f).toDoubles()[0], 1e-6, "the next step's norm does not read the NaN one");
    }

    @Test
    void badHyperParametersAreRejectedWithTheirName() {
        ModelContext ctx = new ModelContext(cpu, DType.F32, 3);
        ctx.params().add("w", Init.normal(1), true, 4);
        ctx.allocateParameters();
        var e = assertThrows(IllegalArgumentException.class, () -> new AdamW(ctx.params(), 1.5f, 0.95f, 1e-8f, 0.1f, 1f));
        assertEquals("beta1 must be in [0, 1), got 1.5", e.getMessage());
    }

    @Test
    void cosineScheduleWarmsUpThenDecays() {
        CosineSchedule s = new CosineSchedule(1f, 0.1f, 10, 110);
        assertEquals(0.1f, s.lr(0), 1e-6);
        assertEquals(1f, s.lr(9), 1e-6);
        assertEquals(0.55f, s.lr(60), 1e-6);
        assertEquals(0.1f, s.lr(110), 1e-6);
    }
}
