package dev.moe4j.core.testing;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;

import java.util.SplittableRandom;

/** Fresh random test tensors (never zeros) and comparisons. */
public final class Tensors {
    private Tensors() {}

    /** Uniform in [-scale, scale), rounded to dtype. */
    public static Tensor random(Backend b, DType dtype, SplittableRandom rnd, double scale, int... shape) {
        long n = 1;
        for (int d : shape) n *= d;
        double[] v = new double[Math.toIntExact(n)];
        for (int i = 0; i < v.length; i++) v[i] = (rnd.nextDouble() * 2 - 1) * scale;
        return b.fromDoubles(dtype, v, shape);
    }

    /** Integers in [lo, hi). */
    public static Tensor randomInts(Backend b, SplittableRandom rnd, int lo, int hi, int... shape) {
        long n = 1;
        for (int d : shape) n *= d;
        int[] v = new int[Math.toIntExact(n)];
        for (int i = 0; i < v.length; i++) v[i] = lo + rnd.nextInt(hi - lo);
        return b.fromInts(v, shape);
    }

    /** ||a - b|| / max(||b||, 1e-30); NaN anywhere gives +Inf. */
    public static double relError(double[] a, double[] b) {
        if (a.length != b.length) throw new AssertionError("lengths differ: " + a.length + " vs " + b.length);
        double d2 = 0, b2 = 0;
        for (int i = 0; i < a.length; i++) {
            if (!Double.isFinite(a[i]) || !Double.isFinite(b[i])) return Double.POSITIVE_INFINITY;
            double d = a[i] - b[i];
            d2 += d * d;
            b2 += b[i] * b[i];
        }
        return Math.sqrt(d2) / Math.max(Math.sqrt(b2), 1e-30);
    }

    /** sum_i y[i] * r[i]: the scalar loss whose gradient with respect to y is r. */
    public static double dot(Tensor y, Tensor r) {
        double[] a = y.toDoubles(), b = r.toDoubles();
        double s = 0;
        for (int i = 0; i < a.length; i++) s += a[i] * b[i];
        return s;
    }
}
