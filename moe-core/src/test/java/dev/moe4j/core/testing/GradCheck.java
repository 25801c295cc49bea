package dev.moe4j.core.testing;

import dev.moe4j.core.tensor.Tensor;

import java.util.SplittableRandom;
import java.util.function.DoubleSupplier;

import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

/**
 * Central finite differences in float64 against an analytic gradient.
 *
 * <p>Typical use: make every tensor F64 on the CPU backend, define loss = sum(y * r) for a fixed random r
 * (so dL/dy = r), run the backward with dy = r, then {@link #check} each input and parameter.
 */
public final class GradCheck {
    private GradCheck() {}

    /** Relative error bound for float64 checks (the bar). */
    public static final double F64_TOL = 1e-6;

    /**
     * Perturbs up to {@code maxElements} randomly chosen elements of {@code x} by +-h, evaluates {@code loss}
     * and compares (L(x+h) - L(x-h)) / 2h with {@code analytic}. The error is
     * ||numeric - analytic|| / max(||numeric|| + ||analytic||, 1e-30) over the checked elements.
     * x is restored afterwards. Returns the relative error.
     */
    public static double check(String name, Tensor x, Tensor analytic, DoubleSupplier loss, int maxElements, double tol) {
        double[] values = x.toDoubles();
        double[] grad = analytic.toDoubles();
        if (grad.length != values.length) fail(name + ": gradient has " + grad.length + " elements, tensor " + values.length);
        int n = values.length;
        int[] picks = pick(n, maxElements, name.hashCode());
        double diff2 = 0, num2 = 0, ana2 = 0;
        double worst = 0;
        int worstAt = -1;
        for (int i : picks) {
            double v = values[i];
            double h = 1e-6 * Math.max(1.0, Math.abs(v));
            values[i] = v + h;
            set(x, values);
            double lp = loss.getAsDouble();
            values[i] = v - h;
            set(x, values);
            double lm = loss.getAsDouble();
            values[i] = v;
            double numeric = (lp - lm) / (2 * h);
            double d = numeric - grad[i];
            diff2 += d * d;
            num2 += numeric * numeric;
            ana2 += grad[i] * grad[i];
            double scale = Math.abs(numeric) + Math.abs(grad[i]);
            double rel = scale < 1e-12 ? Math.abs(d) : Math.abs(d) / scale;
            if (rel > worst) { worst = rel; worstAt = i; }
        }
        set(x, values);
        double rel = Math.sqrt(diff2) / Math.max(Math.sqrt(num2) + Math.sqrt(ana2), 1e-30);
        if (ana2 == 0 && num2 == 0) fail(name + ": gradient is identically zero on the checked elements; the check would prove nothing");
        assertTrue(rel < tol, String.format("%s: relative error %.3e >= %.1e (worst element %d: %.3e)", name, rel, tol, worstAt, worst));
        return rel;
    }

    private static void set(Tensor x, double[] values) {
        try (Tensor tmp = x.backend().fromDoubles(x.dtype(), values, x.shape().dims())) {
            x.backend().copy(tmp, x);
        }
    }

    private static int[] pick(int n, int max, long seed) {
        if (n <= max) {
            int[] all = new int[n];
            for (int i = 0; i < n; i++) all[i] = i;
            return all;
        }
        SplittableRandom r = new SplittableRandom(seed);
        int[] p = new int[max];
        for (int i = 0; i < max; i++) p[i] = r.nextInt(n);
        return p;
    }
}
