package dev.moe4j.core.cpu;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.backend.AdamWParams;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.backend.Checks;
import dev.moe4j.core.backend.GateOutputs;
import dev.moe4j.core.backend.GateSpec;
import dev.moe4j.core.backend.Philox;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Shape;
import dev.moe4j.core.tensor.Tensor;

import java.util.concurrent.atomic.AtomicLong;

/**
 * The reference backend: pure Java, multi-threaded over rows.
 *
 * <p>Every tensor is stored as a {@code double[]} whatever its dtype; arithmetic runs in float64 and each
 * op rounds what it writes to the output's dtype (F32: float, BF16: nearest-even bf16, I32: integer). So F32
 * and BF16 tensors hold exactly the values a float32 / bf16 device would store, while F64 tensors give the
 * float64 reference mode used by the finite-difference gradient checks. Clarity comes first here: it is the
 * backend every other one is tested against.
 */
public final class CpuBackend implements Backend {
    private final AtomicLong allocated = new AtomicLong();

    @Override public String name() { return "cpu"; }

    @Override public boolean supports(DType dtype) { return true; }

    // ------------------------------------------------------------------ storage

    /** The Java array behind a CPU tensor and the bytes it accounts for. */
    static final class CpuStorage implements dev.moe4j.core.tensor.Storage {
        final double[] data;
        private final long bytes;
        private final AtomicLong counter;
        private boolean released;

        CpuStorage(int n, long bytes, AtomicLong counter) {
            this.data = new double[n];
            this.bytes = bytes;
            this.counter = counter;
            counter.addAndGet(bytes);
        }

        @Override public long byteSize() { return bytes; }

        @Override public void release() {
            if (!released) { released = true; counter.addAndGet(-bytes); }
        }
    }

    /** The backing array of a CPU tensor (element i of t is at {@code data(t)[off(t) + i]}). */
    static double[] data(Tensor t) {
        if (!(t.storage() instanceof CpuStorage s)) {
            throw new IllegalArgumentException(t + " is not a CPU tensor");
        }
        if (t.isClosed()) throw new IllegalStateException(t + " was closed");
        // as on a GPU, a view outliving its storage's owner is an error (the CPU would otherwise read stale data)
        if (s.released) throw new IllegalStateException(t + ": its storage was released (a view of a closed tensor)");
        return s.data;
    }

    static int off(Tensor t) { return Math.toIntExact(t.offset()); }

    /** Rounds the elements of t to its dtype after an op wrote float64 values into them. */
    static void round(Tensor t) {
        DType dt = t.dtype();
        if (dt == DType.F64) return;
        double[] d = data(t);
        int o = off(t), n = Math.toIntExact(t.numel());
        for (int i = o; i < o + n; i++) d[i] = dt.round(d[i]);
    }

    @Override
    public Tensor zeros(DType dtype, int... shape) {
        Shape s = Shape.of(shape);
        long n = s.numel();
        if (n > Integer.MAX_VALUE - 8) throw new IllegalArgumentException("CPU tensors hold at most 2^31 elements, asked for " + dtype + s);
        return Tensor.owning(this, new CpuStorage((int) n, n * dtype.bytes(), allocated), dtype, s);
    }

    @Override
    public Tensor fromFloats(DType dtype, float[] data, int... shape) {
        Tensor t = zeros(dtype, shape);
        Checks.numel("fromFloats", "data", t, data.length);
        double[] d = data(t);
        for (int i = 0; i < data.length; i++) d[i] = data[i];
        round(t);
        return t;
    }

    @Override
    public Tensor fromDoubles(DType dtype, double[] data, int... shape) {
        Tensor t = zeros(dtype, shape);
        Checks.numel("fromDoubles", "data", t, data.length);
        System.arraycopy(data, 0, data(t), 0, data.length);
        round(t);
        return t;
    }

    @Override
    public Tensor fromInts(int[] data, int... shape) {
        Tensor t = zeros(DType.I32, shape);
        Checks.numel("fromInts", "data", t, data.length);
        double[] d = data(t);
        for (int i = 0; i < data.length; i++) d[i] = data[i];
        return t;
    }

    @Override
    public float[] toFloats(Tensor t) {
        double[] d = data(t);
        int o = off(t), n = Math.toIntExact(t.numel());
        float[] r = new float[n];
        for (int i = 0; i < n; i++) r[i] = (float) d[o + i];
        return r;
    }

    @Override
    public double[] toDoubles(Tensor t) {
        int o = off(t), n = Math.toIntExact(t.numel());
        double[] r = new double[n];
        System.arraycopy(data(t), o, r, 0, n);
        return r;
    }

    @Override
    public int[] toInts(Tensor t) {
        double[] d = data(t);
        int o = off(t), n = Math.toIntExact(t.numel());
        int[] r = new int[n];
        for (int i = 0; i < n; i++) r[i] = (int) d[o + i];
        return r;
    }

    @Override
    public void copy(Tensor src, Tensor dst) {
        Checks.numel("copy", "dst", dst, src.numel());
        System.arraycopy(data(src), off(src), data(dst), off(dst), Math.toIntExact(src.numel()));
        round(dst);
    }

    @Override
    public void fill(Tensor t, double value) {
        double[] d = data(t);
        int o = off(t), n = Math.toIntExact(t.numel());
        java.util.Arrays.fill(d, o, o + n, t.dtype().round(value));
    }

    @Override public void synchronize() {}

    @Override public long allocatedBytes() { return allocated.get(); }

    // ------------------------------------------------------------------ random

    @Override
    public void randomUniform(Tensor out, double lo, double hi, long seed, long offset) {
        double[] d = data(out);
        int o = off(out);
        Parallel.range(Math.toIntExact(out.numel()), 4096, (a, b) -> {
            for (int i = a; i < b; i++) d[o + i] = lo + (hi - lo) * Philox.uniform(seed, offset + i);
        });
        round(out);
    }

    @Override
    public void randomNormal(Tensor out, double mean, double std, long seed, long offset) {
        double[] d = data(out);
        int o = off(out);
        Parallel.range(Math.toIntExact(out.numel()), 4096, (a, b) -> {
            for (int i = a; i < b; i++) d[o + i] = mean + std * Philox.normal(seed, offset + i);
        });
        round(out);
    }

    // ------------------------------------------------------------------ side work

    private boolean insideBeside, besideOpen;

    /**
     * Runs work at once, holding it to the CUDA backend's rules so that CPU tests catch their breach: one side work
     * open at a time (joined before the next), no GEMMs inside.
     */
    @Override
    public SideWork beside(Runnable work) {
        if (insideBeside) throw new IllegalStateException("beside: already inside side work");
        if (besideOpen) throw new IllegalStateException("beside: the previous side work was not joined");
        besideOpen = true;
        insideBeside = true;
        try {
            work.run();
        } catch (RuntimeException | Error e) {
            besideOpen = false;   // as CUDA's: what failed is joined before the error leaves
            throw e;
        } finally {
            insideBeside = false;
        }
        return () -> besideOpen = false;
    }

    /** GEMMs are refused inside beside(), as on CUDA (cuBLAS is bound to the main stream there). */
    private void noGemmBeside(String op) {
        if (insideBeside) throw new IllegalStateException(op + " inside beside(): GEMMs run on the main stream only");
    }

    // ------------------------------------------------------------------ matrix products

    @Override
    public void matmul(Tensor a, boolean transA, Tensor b, boolean transB, Tensor c, float alpha, float beta) {
        noGemmBeside("matmul");
        int[] d = Checks.matmul(a, transA, b, transB, c);
        int batch = d[0], m = d[1], n = d[2], k = d[3];
        double[] A = data(a), B = data(b), C = data(c);
        int ao = off(a), bo = off(b), co = off(c);
        for (int bt = 0; bt < batch; bt++) {
            CpuMath.gemm(A, ao + bt * m * k, transA, B, bo + bt * k * n, transB, C, co + bt * m * n, m, n, k, alpha, beta);
        }
        round(c);
    }

    @Override
    public void groupedMatmul(Tensor a, Tensor w, boolean transW, Tensor offsets, int[] hostOffsets, Tensor c, float beta) {
        sameOffsets("groupedMatmul", offsets, hostOffsets);
        groupedMatmul(a, w, transW, offsets, c, beta);
    }

    @Override
    public void groupedMatmulWeightGrad(Tensor a, Tensor dy, Tensor offsets, int[] hostOffsets, Tensor dw, float beta) {
        sameOffsets("groupedMatmulWeightGrad", offsets, hostOffsets);
        groupedMatmulWeightGrad(a, dy, offsets, dw, beta);
    }

    /** The CPU reference holds callers to their promise that hostOffsets equal the device offsets (a GPU cannot check). */
    private static void sameOffsets(String op, Tensor offsets, int[] hostOffsets) {
        if (hostOffsets != null && !java.util.Arrays.equals(hostOffsets, offsets.toInts())) {
            throw new IllegalArgumentException(op + ": hostOffsets " + java.util.Arrays.toString(hostOffsets) + " differ from offsets "
                    + java.util.Arrays.toString(offsets.toInts()));
        }
    }

    @Override
    public void groupedMatmul(Tensor a, Tensor w, boolean transW, Tensor offsets, Tensor c, float beta) {
        String op = "groupedMatmul";
        noGemmBeside(op);
        int[] d = Checks.groupedMatmul(op, a, w, transW, offsets, c);
        int e = d[0], k = d[1], n = d[2], t = d[3];
        int[] offs = checkOffsets(op, offsets, t);
        double[] A = data(a), W = data(w), C = data(c);
        for (int g = 0; g < e; g++) {
            int rows = offs[g + 1] - offs[g];
            if (rows == 0) continue;
            CpuMath.gemm(A, off(a) + offs[g] * k, false, W, off(w) + g * k * n, transW, C, off(c) + offs[g] * n, rows, n, k, 1f, beta);
        }
        round(c);
    }

    @Override
    public void groupedMatmulWeightGrad(Tensor a, Tensor dy, Tensor offsets, Tensor dw, float beta) {
        String op = "groupedMatmulWeightGrad";
        noGemmBeside(op);
        int[] d = Checks.groupedMatmulWeightGrad(op, a, dy, offsets, dw);
        int e = d[0], k = d[1], n = d[2], t = d[3];
        int[] offs = checkOffsets(op, offsets, t);
        double[] A = data(a), DY = data(dy), DW = data(dw);
        for (int g = 0; g < e; g++) {
            int rows = offs[g + 1] - offs[g];
            if (rows == 0) {
                int at = off(dw) + g * k * n;
                if (beta == 0f) java.util.Arrays.fill(DW, at, at + k * n, 0.0);
                else if (beta != 1f) for (int i = 0; i < k * n; i++) DW[at + i] *= beta;
                continue;
            }
            // dW_g [K,N] = A_g^T [K,rows] * dY_g [rows,N]
            CpuMath.gemm(A, off(a) + offs[g] * k, true, DY, off(dy) + offs[g] * n, false, DW, off(dw) + g * k * n, k, n, rows, 1f, beta);
        }
        round(dw);
    }

    private int[] checkOffsets(String op, Tensor offsets, int rows) {
        return Checks.groupOffsets(op, toInts(offsets), rows);
    }

    // ------------------------------------------------------------------ elementwise

    @Override
    public void add(Tensor a, double alpha, Tensor b, double beta, Tensor out) {
        Checks.numel("add", "b", b, a.numel());
        Checks.numel("add", "out", out, a.numel());
        double[] A = data(a), B = data(b), O = data(out);
        int ao = off(a), bo = off(b), oo = off(out);
        Parallel.range(Math.toIntExact(a.numel()), 8192, (s, e) -> {
            for (int i = s; i < e; i++) O[oo + i] = alpha * A[ao + i] + beta * B[bo + i];
        });
        round(out);
    }

    @Override
    public void mul(Tensor a, Tensor b, Tensor out) {
        Checks.numel("mul", "b", b, a.numel());
        Checks.numel("mul", "out", out, a.numel());
        double[] A = data(a), B = data(b), O = data(out);
        int ao = off(a), bo = off(b), oo = off(out);
        Parallel.range(Math.toIntExact(a.numel()), 8192, (s, e) -> {
            for (int i = s; i < e; i++) O[oo + i] = A[ao + i] * B[bo + i];
        });
        round(out);
    }

    @Override
    public void scale(Tensor x, double alpha, Tensor out) {
        Checks.numel("scale", "out", out, x.numel());
        double[] X = data(x), O = data(out);
        int xo = off(x), oo = off(out);
        Parallel.range(Math.toIntExact(x.numel()), 8192, (s, e) -> {
            for (int i = s; i < e; i++) O[oo + i] = alpha * X[xo + i];
        });
        round(out);
    }

    @Override
    public void addBias(Tensor x, Tensor bias, Tensor out) {
        int c = x.cols();
        Checks.numel("addBias", "bias", bias, c);
        Checks.matrix("addBias", "out", out, x.rows(), c);
        double[] X = data(x), Bs = data(bias), O = data(out);
        int xo = off(x), bo = off(bias), oo = off(out);
        Parallel.range(x.rows(), 64, (s, e) -> {
            for (int r = s; r < e; r++) for (int j = 0; j < c; j++) O[oo + r * c + j] = X[xo + r * c + j] + Bs[bo + j];
        });
        round(out);
    }

    @Override
    public void sumRows(Tensor x, Tensor out, float beta) {
        int c = x.cols(), n = x.rows();
        Checks.numel("sumRows", "out", out, c);
        double[] X = data(x), O = data(out);
        int xo = off(x), oo = off(out);
        Parallel.range(c, 16, (s, e) -> {
            for (int j = s; j < e; j++) {
                double acc = 0;
                for (int r = 0; r < n; r++) acc += X[xo + r * c + j];
                O[oo + j] = beta == 0 ? acc : beta * O[oo + j] + acc;
            }
        });
        round(out);
    }

    @Override
    public void rowDot(Tensor a, Tensor b, Tensor out) {
        int c = a.cols(), n = a.rows();
        Checks.matrix("rowDot", "b", b, n, c);
        Checks.numel("rowDot", "out", out, n);
        double[] A = data(a), B = data(b), O = data(out);
        int ao = off(a), bo = off(b), oo = off(out);
        Parallel.range(n, 64, (s, e) -> {
            for (int r = s; r < e; r++) {
                double acc = 0;
                for (int j = 0; j < c; j++) acc += A[ao + r * c + j] * B[bo + r * c + j];
                O[oo + r] = acc;
            }
        });
        round(out);
    }

    @Override
    public void activation(Activation act, Tensor x, Tensor out) {
        int f = out.cols(), n = out.rows();
        Checks.matrix("activation", "x", x, n, act.inputWidth(f));
        double[] X = data(x), O = data(out);
        int xo = off(x), oo = off(out), w = act.inputWidth(f);
        Parallel.range(n, 16, (s, e) -> {
            for (int r = s; r < e; r++) {
                for (int j = 0; j < f; j++) {
                    double v = X[xo + r * w + j];
                    O[oo + r * f + j] = switch (act) {
                        case RELU -> v > 0 ? v : 0;
                        case GELU -> CpuMath.gelu(v);
                        case GEGLU -> CpuMath.gelu(v) * X[xo + r * w + f + j];
                        case SWIGLU -> CpuMath.silu(v) * X[xo + r * w + f + j];
                    };
                }
            }
        });
        round(out);
    }

    @Override
    public void activationBackward(Activation act, Tensor x, Tensor dout, Tensor dx) {
        int f = dout.cols(), n = dout.rows(), w = act.inputWidth(f);
        Checks.matrix("activationBackward", "x", x, n, w);
        Checks.matrix("activationBackward", "dx", dx, n, w);
        double[] X = data(x), DO = data(dout), DX = data(dx);
        int xo = off(x), go = off(dout), dxo = off(dx);
        Parallel.range(n, 16, (s, e) -> {
            for (int r = s; r < e; r++) {
                for (int j = 0; j < f; j++) {
                    double v = X[xo + r * w + j], g = DO[go + r * f + j];
                    switch (act) {
                        case RELU -> DX[dxo + r * w + j] = v > 0 ? g : 0;
                        case GELU -> DX[dxo + r * w + j] = g * CpuMath.geluGrad(v);
                        case GEGLU -> {
                            double b = X[xo + r * w + f + j];
                            DX[dxo + r * w + j] = g * b * CpuMath.geluGrad(v);
                            DX[dxo + r * w + f + j] = g * CpuMath.gelu(v);
                        }
                        case SWIGLU -> {
                            double b = X[xo + r * w + f + j];
                            DX[dxo + r * w + j] = g * b * CpuMath.siluGrad(v);
                            DX[dxo + r * w + f + j] = g * CpuMath.silu(v);
                        }
                    }
                }
            }
        });
        round(dx);
    }

    // ------------------------------------------------------------------ normalisation

    @Override
    public void layerNorm(Tensor x, Tensor gamma, Tensor beta, float eps, Tensor out, Tensor mean, Tensor rstd) {
        int c = x.cols(), n = x.rows();
        Checks.numel("layerNorm", "gamma", gamma, c);
        Checks.numel("layerNorm", "beta", beta, c);
        Checks.matrix("layerNorm", "out", out, n, c);
        Checks.numel("layerNorm", "mean", mean, n);
        Checks.numel("layerNorm", "rstd", rstd, n);
        double[] X = data(x), G = data(gamma), B = data(beta), O = data(out), MU = data(mean), RS = data(rstd);
        int xo = off(x), go = off(gamma), bo = off(beta), oo = off(out), mo = off(mean), ro = off(rstd);
        Parallel.range(n, 16, (s, e) -> {
            for (int r = s; r < e; r++) {
                double mu = 0;
                for (int j = 0; j < c; j++) mu += X[xo + r * c + j];
                mu /= c;
                double var = 0;
                for (int j = 0; j < c; j++) { double d = X[xo + r * c + j] - mu; var += d * d; }
                var /= c;
                double rs = 1.0 / Math.sqrt(var + eps);
                // Keep the saved statistics in the precision of their tensors, and normalise with those.
                mu = mean.dtype().round(mu);
                rs = rstd.dtype().round(rs);
                for (int j = 0; j < c; j++) O[oo + r * c + j] = (X[xo + r * c + j] - mu) * rs * G[go + j] + B[bo + j];
                MU[mo + r] = mu;
                RS[ro + r] = rs;
            }
        });
        round(out);
    }

    @Override
    public void layerNormBackward(Tensor dout, Tensor x, Tensor gamma, Tensor mean, Tensor rstd,
                                  Tensor dx, Tensor dgamma, Tensor dbeta) {
        int c = x.cols(), n = x.rows();
        Checks.matrix("layerNormBackward", "dout", dout, n, c);
        Checks.matrix("layerNormBackward", "dx", dx, n, c);
        Checks.numel("layerNormBackward", "dgamma", dgamma, c);
        Checks.numel("layerNormBackward", "dbeta", dbeta, c);
        double[] DO = data(dout), X = data(x), G = data(gamma), MU = data(mean), RS = data(rstd), DX = data(dx), DG = data(dgamma), DB = data(dbeta);
        int doo = off(dout), xo = off(x), go = off(gamma), mo = off(mean), ro = off(rstd), dxo = off(dx), dgo = off(dgamma), dbo = off(dbeta);
        Parallel.range(n, 16, (s, e) -> {
            for (int r = s; r < e; r++) {
                double mu = MU[mo + r], rs = RS[ro + r];
                double meanDn = 0, meanDnX = 0;   // mean of (dout*gamma) and of (dout*gamma*xhat)
                for (int j = 0; j < c; j++) {
                    double xhat = (X[xo + r * c + j] - mu) * rs;
                    double dn = DO[doo + r * c + j] * G[go + j];
                    meanDn += dn;
                    meanDnX += dn * xhat;
                }
                meanDn /= c;
                meanDnX /= c;
                for (int j = 0; j < c; j++) {
                    double xhat = (X[xo + r * c + j] - mu) * rs;
                    double dn = DO[doo + r * c + j] * G[go + j];
                    DX[dxo + r * c + j] = (dn - meanDn - xhat * meanDnX) * rs;
                }
            }
        });
        Parallel.range(c, 16, (s, e) -> {
            for (int j = s; j < e; j++) {
                double dg = 0, db = 0;
                for (int r = 0; r < n; r++) {
                    double xhat = (X[xo + r * c + j] - MU[mo + r]) * RS[ro + r];
                    double g = DO[doo + r * c + j];
                    dg += g * xhat;
                    db += g;
                }
                DG[dgo + j] += dg;
                DB[dbo + j] += db;
            }
        });
        round(dx);
        round(dgamma);
        round(dbeta);
    }

    @Override
    public void softmax(Tensor x, Tensor out) {
        int c = x.cols(), n = x.rows();
        Checks.matrix("softmax", "out", out, n, c);
        double[] X = data(x), O = data(out);
        int xo = off(x), oo = off(out);
        Parallel.range(n, 16, (s, e) -> {
            for (int r = s; r < e; r++) CpuMath.softmaxRow(X, xo + r * c, O, oo + r * c, c, 1.0);
        });
        round(out);
    }

    @Override
    public void softmaxBackward(Tensor y, Tensor dy, Tensor dx) {
        int c = y.cols(), n = y.rows();
        Checks.matrix("softmaxBackward", "dy", dy, n, c);
        Checks.matrix("softmaxBackward", "dx", dx, n, c);
        double[] Y = data(y), DY = data(dy), DX = data(dx);
        int yo = off(y), dyo = off(dy), dxo = off(dx);
        Parallel.range(n, 16, (s, e) -> {
            for (int r = s; r < e; r++) {
                double dot = 0;
                for (int j = 0; j < c; j++) dot += Y[yo + r * c + j] * DY[dyo + r * c + j];
                for (int j = 0; j < c; j++) DX[dxo + r * c + j] = Y[yo + r * c + j] * (DY[dyo + r * c + j] - dot);
            }
        });
        round(dx);
    }

    // ------------------------------------------------------------------ attention

    @Override
    public void attention(Tensor qkv, int heads, Tensor out, Tensor lse) {
        CpuAttention.forward(qkv, heads, out, lse);
    }

    @Override
    public void attentionBackward(Tensor dout, Tensor qkv, Tensor out, Tensor lse, int heads, Tensor dqkv) {
        CpuAttention.backward(dout, qkv, out, lse, heads, dqkv);
    }

    // ------------------------------------------------------------------ embedding and losses

    @Override
    public void embedding(Tensor tokens, Tensor wte, Tensor wpe, Tensor out) {
        String op = "embedding";
        Checks.dtype(op, "tokens", tokens, DType.I32);
        Checks.rank(op, "tokens", tokens, 2);
        int b = tokens.dim(0), t = tokens.dim(1), c = wte.cols(), v = wte.rows();
        Checks.matrix(op, "out", out, (long) b * t, c);
        if (wpe != null) {
            Checks.cols(op, "wpe", wpe, c);
            if (wpe.rows() < t) throw new IllegalArgumentException(op + ": sequence length " + t + " exceeds the " + wpe.rows() + " positions of wpe");
        }
        double[] TK = data(tokens), WTE = data(wte), O = data(out);
        double[] WPE = wpe == null ? null : data(wpe);
        int tko = off(tokens), teo = off(wte), oo = off(out), peo = wpe == null ? 0 : off(wpe);
        for (int i = 0; i < b * t; i++) {
            int tok = (int) TK[tko + i];
            if (tok < 0 || tok >= v) throw new IllegalArgumentException(op + ": token " + tok + " at position " + i + " is outside the vocabulary [0, " + v + ")");
        }
        Parallel.range(b * t, 64, (s, e) -> {
            for (int i = s; i < e; i++) {
                int tok = (int) TK[tko + i], pos = i % t;
                for (int j = 0; j < c; j++) {
                    O[oo + i * c + j] = WTE[teo + tok * c + j] + (WPE == null ? 0 : WPE[peo + pos * c + j]);
                }
            }
        });
        round(out);
    }

    @Override
    public void embeddingBackward(Tensor dout, Tensor tokens, Tensor dwte, Tensor dwpe) {
        int b = tokens.dim(0), t = tokens.dim(1), c = dwte.cols();
        Checks.matrix("embeddingBackward", "dout", dout, (long) b * t, c);
        double[] DO = data(dout), TK = data(tokens), DTE = data(dwte);
        int doo = off(dout), tko = off(tokens), dteo = off(dwte);
        // Parallel over columns: two tokens may be equal, but columns never collide.
        Parallel.range(c, 8, (s, e) -> {
            for (int i = 0; i < b * t; i++) {
                int tok = (int) TK[tko + i];
                for (int j = s; j < e; j++) DTE[dteo + tok * c + j] += DO[doo + i * c + j];
            }
        });
        round(dwte);
        if (dwpe != null) {
            double[] DPE = data(dwpe);
            int dpeo = off(dwpe);
            Parallel.range(t, 8, (s, e) -> {
                for (int pos = s; pos < e; pos++) {
                    for (int bb = 0; bb < b; bb++) {
                        int i = bb * t + pos;
                        for (int j = 0; j < c; j++) DPE[dpeo + pos * c + j] += DO[doo + i * c + j];
                    }
                }
            });
            round(dwpe);
        }
    }

    @Override
    public void crossEntropy(Tensor logits, Tensor targets, Tensor losses) {
        int v = logits.cols(), n = logits.rows();
        Checks.dtype("crossEntropy", "targets", targets, DType.I32);
        Checks.numel("crossEntropy", "targets", targets, n);
        Checks.numel("crossEntropy", "losses", losses, n);
        double[] L = data(logits), T = data(targets), O = data(losses);
        int lo = off(logits), to = off(targets), oo = off(losses);
        checkTargets("crossEntropy", T, to, n, v);
        Parallel.range(n, 8, (s, e) -> {
            for (int r = s; r < e; r++) {
                int tgt = (int) T[to + r];
                O[oo + r] = tgt < 0 ? 0 : CpuMath.logSumExp(L, lo + r * v, v, 1.0) - L[lo + r * v + tgt];
            }
        });
        round(losses);
    }

    @Override
    public void crossEntropyBackward(Tensor logits, Tensor targets, float scale, Tensor dlogits) {
        int v = logits.cols(), n = logits.rows();
        Checks.numel("crossEntropyBackward", "targets", targets, n);
        Checks.matrix("crossEntropyBackward", "dlogits", dlogits, n, v);
        double[] L = data(logits), T = data(targets), D = data(dlogits);
        int lo = off(logits), to = off(targets), dlo = off(dlogits);
        checkTargets("crossEntropyBackward", T, to, n, v);
        Parallel.range(n, 8, (s, e) -> {
            for (int r = s; r < e; r++) {
                int tgt = (int) T[to + r];
                if (tgt < 0) {
                    java.util.Arrays.fill(D, dlo + r * v, dlo + r * v + v, 0.0);
                    continue;
                }
                CpuMath.softmaxRow(L, lo + r * v, D, dlo + r * v, v, 1.0);
                for (int j = 0; j < v; j++) D[dlo + r * v + j] *= scale;
                D[dlo + r * v + tgt] -= scale;
            }
        });
        round(dlogits);
    }

    private static void checkTargets(String op, double[] t, int o, int n, int v) {
        for (int r = 0; r < n; r++) {
            int tgt = (int) t[o + r];
            if (tgt >= v) throw new IllegalArgumentException(op + ": target " + tgt + " at row " + r + " is outside the vocabulary [0, " + v + ")");
        }
    }

    @Override
    public void distillationLoss(Tensor student, Tensor teacher, float temperature, Tensor losses) {
        int v = student.cols(), n = student.rows();
        Checks.matrix("distillationLoss", "teacher", teacher, n, v);
        Checks.numel("distillationLoss", "losses", losses, n);
        if (!(temperature > 0)) throw new IllegalArgumentException("distillationLoss: temperature must be > 0, got " + temperature);
        double[] S = data(student), T = data(teacher), O = data(losses);
        int so = off(student), to = off(teacher), oo = off(losses);
        double inv = 1.0 / temperature, t2 = (double) temperature * temperature;
        Parallel.range(n, 8, (s, e) -> {
            for (int r = s; r < e; r++) {
                double lseS = CpuMath.logSumExp(S, so + r * v, v, inv), lseT = CpuMath.logSumExp(T, to + r * v, v, inv);
                double kl = 0;
                for (int j = 0; j < v; j++) {
                    double logPt = T[to + r * v + j] * inv - lseT, logPs = S[so + r * v + j] * inv - lseS;
                    kl += Math.exp(logPt) * (logPt - logPs);
                }
                O[oo + r] = t2 * kl;
            }
        });
        round(losses);
    }

    @Override
    public void distillationLossBackward(Tensor student, Tensor teacher, float temperature, float scale, Tensor dstudent) {
        int v = student.cols(), n = student.rows();
        Checks.matrix("distillationLossBackward", "teacher", teacher, n, v);
        Checks.matrix("distillationLossBackward", "dstudent", dstudent, n, v);
        double[] S = data(student), T = data(teacher), D = data(dstudent);
        int so = off(student), to = off(teacher), dso = off(dstudent);
        double inv = 1.0 / temperature;
        // d/ds_j of T^2 * KL = T * (p_s,j - p_t,j)
        Parallel.range(n, 8, (s, e) -> {
            double[] ps = new double[v], pt = new double[v];
            for (int r = s; r < e; r++) {
                CpuMath.softmaxRow(S, so + r * v, ps, 0, v, inv);
                CpuMath.softmaxRow(T, to + r * v, pt, 0, v, inv);
                for (int j = 0; j < v; j++) D[dso + r * v + j] = scale * temperature * (ps[j] - pt[j]);
            }
        });
        round(dstudent);
    }

    // ------------------------------------------------------------------ rows by index

    @Override
    public void gatherRows(Tensor src, Tensor idx, Tensor out) {
        int c = src.cols(), m = Math.toIntExact(idx.numel()), n = src.rows();
        Checks.dtype("gatherRows", "idx", idx, DType.I32);
        Checks.matrix("gatherRows", "out", out, m, c);
        double[] S = data(src), I = data(idx), O = data(out);
        int so = off(src), io = off(idx), oo = off(out);
        for (int r = 0; r < m; r++) {
            if ((int) I[io + r] >= n) throw new IllegalArgumentException("gatherRows: idx[" + r + "] = " + (int) I[io + r] + " but src has " + n + " rows");
        }
        Parallel.range(m, 64, (s, e) -> {
            for (int r = s; r < e; r++) {
                int from = (int) I[io + r];
                for (int j = 0; j < c; j++) O[oo + r * c + j] = from < 0 ? 0 : S[so + from * c + j];
            }
        });
        round(out);
    }

    @Override
    public void scatterRowsTo(Tensor src, Tensor dest, Tensor[] dsts) {
        Checks.scatterRowsTo(src, dest, dsts);
        int c = src.cols(), n = src.rows();
        double[] S = data(src), D = data(dest);
        int so = off(src), dof = off(dest);
        for (int m = 0; m < n; m++) {   // every destination checked before anything is written
            int q = (int) D[dof + 2 * m], row = (int) D[dof + 2 * m + 1];
            if (q < 0) continue;
            if (q >= dsts.length) throw new IllegalArgumentException("scatterRowsTo: dest[" + m + "] names destination " + q + " of " + dsts.length);
            if (row < 0 || row >= dsts[q].rows()) {
                throw new IllegalArgumentException("scatterRowsTo: dest[" + m + "] = row " + row + " of dsts[" + q + "], which has " + dsts[q].rows() + " rows");
            }
        }
        for (int m = 0; m < n; m++) {
            int q = (int) D[dof + 2 * m], row = (int) D[dof + 2 * m + 1];
            if (q >= 0) System.arraycopy(S, so + m * c, data(dsts[q]), off(dsts[q]) + row * c, c);
        }
    }

    @Override
    public void scatterAddRows(Tensor src, Tensor idx, Tensor w, Tensor dst) {
        int c = src.cols(), m = src.rows(), n = dst.rows();
        Checks.dtype("scatterAddRows", "idx", idx, DType.I32);
        Checks.numel("scatterAddRows", "idx", idx, m);
        Checks.cols("scatterAddRows", "dst", dst, c);
        if (w != null) Checks.numel("scatterAddRows", "w", w, m);
        double[] S = data(src), I = data(idx), D = data(dst);
        double[] W = w == null ? null : data(w);
        int so = off(src), io = off(idx), dso = off(dst), wo = w == null ? 0 : off(w);
        for (int r = 0; r < m; r++) {
            if ((int) I[io + r] >= n) throw new IllegalArgumentException("scatterAddRows: idx[" + r + "] = " + (int) I[io + r] + " but dst has " + n + " rows");
        }
        Parallel.range(c, 8, (s, e) -> {
            for (int r = 0; r < m; r++) {
                int to = (int) I[io + r];
                if (to < 0) continue;
                double wr = W == null ? 1 : W[wo + r];
                for (int j = s; j < e; j++) D[dso + to * c + j] += wr * S[so + r * c + j];
            }
        });
        round(dst);
    }

    // ------------------------------------------------------------------ reductions

    @Override
    public void sum(Tensor x, Tensor out) {
        Checks.numel("sum", "out", out, 1);
        double[] X = data(x);
        int xo = off(x), n = Math.toIntExact(x.numel());
        double acc = 0;
        for (int i = 0; i < n; i++) acc += X[xo + i];
        data(out)[off(out)] = acc;
        round(out);
    }

    @Override
    public void sumSquares(Tensor x, Tensor out, float beta) {
        Checks.numel("sumSquares", "out", out, 1);
        double[] X = data(x);
        int xo = off(x), n = Math.toIntExact(x.numel());
        double acc = Parallel.sum(n, 16384, (s, e) -> {
            double a = 0;
            for (int i = s; i < e; i++) a += X[xo + i] * X[xo + i];
            return a;
        });
        double[] O = data(out);
        O[off(out)] = beta == 0 ? acc : beta * O[off(out)] + acc;
        round(out);
    }

    // ------------------------------------------------------------------ MoE routing

    @Override
    public void moeGate(GateSpec spec, Tensor logits, GateOutputs out) {
        CpuMoE.gate(spec, logits, out);
    }

    @Override
    public void moeGateBackward(GateSpec spec, Tensor logits, GateOutputs saved, Tensor dweights,
                                float lauxCoeff, float zlossCoeff, Tensor dlogits) {
        CpuMoE.gateBackward(spec, logits, saved, dweights, lauxCoeff, zlossCoeff, dlogits);
    }

    @Override
    public void moePermute(Tensor x, Tensor dest, Tensor buf) {
        CpuMoE.permute(x, dest, buf);
    }

    @Override
    public void moePermute(Tensor x, Tensor dest, Tensor counts, int capacity, Tensor buf) {
        boolean[] free = CpuMoE.freeSlots("moePermute", dest, counts, capacity, "buf", buf);
        CpuMoE.permute(x, dest, buf);
        CpuMoE.zeroRows(buf, free);
    }

    @Override
    public void moeUnpermute(Tensor buf, Tensor dest, Tensor w, Tensor out) {
        CpuMoE.unpermute(buf, dest, w, out);
    }

    @Override
    public void moeUnpermuteBackward(Tensor dout, Tensor buf, Tensor dest, Tensor w, Tensor dbuf, Tensor dw) {
        CpuMoE.unpermuteBackward(dout, buf, dest, w, dbuf, dw);
    }

    @Override
    public void moeUnpermuteBackward(Tensor dout, Tensor buf, Tensor dest, Tensor w, Tensor counts, int capacity, Tensor dbuf, Tensor dw) {
        boolean[] free = CpuMoE.freeSlots("moeUnpermuteBackward", dest, counts, capacity, "dbuf", dbuf);
        CpuMoE.unpermuteBackward(dout, buf, dest, w, dbuf, dw);
        CpuMoE.zeroRows(dbuf, free);
    }

    // ------------------------------------------------------------------ optimizer

    @Override
    public void adamw(Tensor param, Tensor grad, Tensor m, Tensor v, AdamWParams h, Tensor normSq, Tensor modelCopy) {
        long n = param.numel();
        Checks.numel("adamw", "grad", grad, n);
        Checks.numel("adamw", "m", m, n);
        Checks.numel("adamw", "v", v, n);
        if (modelCopy != null) Checks.numel("adamw", "modelCopy", modelCopy, n);
        double clip = 1;
        if (normSq != null) {
            double sq = data(normSq)[off(normSq)];
            if (!Double.isFinite(sq)) return;  // skip the whole update: the step is reported as skipped by the trainer
            double norm = Math.sqrt(sq);
            if (h.maxGradNorm() > 0 && norm > h.maxGradNorm()) clip = h.maxGradNorm() / norm;
        }
        double[] P = data(param), G = data(grad), M = data(m), V = data(v);
        double[] MC = modelCopy == null ? null : data(modelCopy);
        int po = off(param), go = off(grad), mo = off(m), vo = off(v), mco = modelCopy == null ? 0 : off(modelCopy);
        double b1 = h.beta1(), b2 = h.beta2(), lr = h.lr(), eps = h.eps(), wd = h.weightDecay();
        double c1 = 1 - Math.pow(b1, h.step()), c2 = 1 - Math.pow(b2, h.step()), scale = clip;
        DType pd = param.dtype(), md = m.dtype(), vd = v.dtype();
        DType cd = modelCopy == null ? null : modelCopy.dtype();
        Parallel.range(Math.toIntExact(n), 8192, (s, e) -> {
            for (int i = s; i < e; i++) {
                double g = G[go + i] * scale;
                double mi = md.round(b1 * M[mo + i] + (1 - b1) * g);
                double vi = vd.round(b2 * V[vo + i] + (1 - b2) * g * g);
                M[mo + i] = mi;
                V[vo + i] = vi;
                double p = P[po + i];
                p -= lr * ((mi / c1) / (Math.sqrt(vi / c2) + eps) + wd * p);
                P[po + i] = pd.round(p);
                if (MC != null) MC[mco + i] = cd.round(P[po + i]);
            }
        });
    }

    @Override
    public void close() {}
}
