package dev.moe4j.core.cpu;

/** Scalar maths and the one GEMM loop of the CPU backend, all in float64. */
final class CpuMath {
    private CpuMath() {}

    private static final double SQRT_2_OVER_PI = Math.sqrt(2.0 / Math.PI);

    /** GELU, tanh approximation. */
    static double gelu(double x) {
        double u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
        return 0.5 * x * (1 + Math.tanh(u));
    }

    static double geluGrad(double x) {
        double u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
        double t = Math.tanh(u);
        double du = SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x);
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du;
    }

    static double sigmoid(double x) { return 1 / (1 + Math.exp(-x)); }

    static double silu(double x) { return x * sigmoid(x); }

    static double siluGrad(double x) {
        double s = sigmoid(x);
        return s * (1 + x * (1 - s));
    }

    /** log(sum_j exp(scale * x[o + j])) over n elements. */
    static double logSumExp(double[] x, int o, int n, double scale) {
        double max = Double.NEGATIVE_INFINITY;
        for (int j = 0; j < n; j++) max = Math.max(max, scale * x[o + j]);
        double s = 0;
        for (int j = 0; j < n; j++) s += Math.exp(scale * x[o + j] - max);
        return max + Math.log(s);
    }

    /** out[oo + j] = softmax(scale * x[xo ..])_j over n elements. */
    static void softmaxRow(double[] x, int xo, double[] out, int oo, int n, double scale) {
        double max = Double.NEGATIVE_INFINITY;
        for (int j = 0; j < n; j++) max = Math.max(max, scale * x[xo + j]);
        double s = 0;
        for (int j = 0; j < n; j++) { double e = Math.exp(scale * x[xo + j] - max); out[oo + j] = e; s += e; }
        for (int j = 0; j < n; j++) out[oo + j] /= s;
    }

    /**
     * C[m,n] = alpha * op(A) * op(B) + beta * C, row-major with the given element offsets; op(A) [m,k], op(B) [k,n].
     * A is [m,k] (or [k,m] with transA), B is [k,n] (or [n,k] with transB). Parallel over rows of C.
     */
    static void gemm(double[] a, int ao, boolean transA, double[] b, int bo, boolean transB,
                     double[] c, int co, int m, int n, int k, double alpha, double beta) {
        // Work in the "row of A times rows of B" form, whose inner loop (acc[j] += a * b[j]) the JIT vectorises;
        // a transposed B is copied once into [k, n] order for that.
        final double[] bk;
        final int bko;
        if (transB) {
            bk = new double[k * n];
            for (int j = 0; j < n; j++) for (int p = 0; p < k; p++) bk[p * n + j] = b[bo + j * k + p];
            bko = 0;
        } else {
            bk = b;
            bko = bo;
        }
        Parallel.range(m, Math.max(1, 32768 / Math.max(1, n * k)), (s, e) -> {
            double[] acc = new double[n];
            for (int i = s; i < e; i++) {
                java.util.Arrays.fill(acc, 0.0);
                for (int p = 0; p < k; p++) {
                    double av = transA ? a[ao + p * m + i] : a[ao + i * k + p];
                    int bp = bko + p * n;
                    for (int j = 0; j < n; j++) acc[j] += av * bk[bp + j];
                }
                int ci = co + i * n;
                if (beta == 0) {
                    for (int j = 0; j < n; j++) c[ci + j] = alpha * acc[j];
                } else {
                    for (int j = 0; j < n; j++) c[ci + j] = alpha * acc[j] + beta * c[ci + j];
                }
            }
        });
    }
}
