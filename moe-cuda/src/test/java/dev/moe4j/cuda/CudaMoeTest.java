package dev.moe4j.cuda;

import dev.moe4j.core.backend.GateOutputs;
import dev.moe4j.core.backend.GateSpec;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.testing.Tensors;
import org.junit.jupiter.api.Tag;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.CsvSource;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * The MoE routing ops on the GPU against {@link MoeReference} (a float64 host model of the documented
 * semantics) and float64 finite differences. {@link CudaMoeVsCpuTest} compares the same ops with CpuBackend.
 */
@Tag("gpu")
class CudaMoeTest extends GpuTestBase {

    static double[] toD(float[] f) { double[] d = new double[f.length]; for (int i = 0; i < f.length; i++) d[i] = f[i]; return d; }

    @ParameterizedTest
    @CsvSource({"1, 6, 37, 9", "2, 6, 37, 9", "2, 5, 41, 0", "3, 8, 50, 0", "1, 16, 300, 0", "2, 4, 33, 5"})
    void gateMatchesTheDocumentedSemantics(int k, int e, int s, int capacity) {
        Tensor logits = Tensors.random(gpu, DType.F32, rnd, 2, s, e);
        double[] l = logits.toDoubles();
        MoeReference ref = new MoeReference(l, s, e, k, capacity);
        GateOutputs out = CudaMoeVsCpuTest.outputs(gpu, s, e, k);
        GateSpec spec = new GateSpec(k, capacity, false, false, false, 1, 0);
        gpu.moeGate(spec, logits, out);
        assertArrayEquals(ref.experts, out.experts().toInts(), "experts");
        assertArrayEquals(ref.dest, out.dest().toInts(), "dest");
        assertArrayEquals(ref.counts, out.counts().toInts(), "counts");
        assertArrayEquals(ref.offsets, out.offsets().toInts(), "offsets");
        double eg = Tensors.relError(out.gates().toDoubles(), ref.gates);
        double ew = Tensors.relError(out.weights().toDoubles(), ref.weights);
        double el = Tensors.relError(out.losses().toDoubles(), ref.losses);
        System.out.printf("moeGate k=%d E=%d S=%d C=%d: gates %.2e weights %.2e losses %.2e%n", k, e, s, capacity, eg, ew, el);
        assertTrue(eg < 1e-6 && ew < 1e-6 && el < 1e-5, "gate values differ: " + eg + " " + ew + " " + el);
        if (capacity > 0) assertTrue(java.util.Arrays.stream(ref.dest).anyMatch(d -> d < 0), "the test should drop some tokens");

        // backward against central differences of the float64 model (top-k and slots stay fixed for small steps)
        float lauxCoeff = 0.7f, zlossCoeff = 0.3f;
        Tensor dw = Tensors.random(gpu, DType.F32, rnd, 1, s, k), dlogits = gpu.zeros(DType.F32, s, e);
        gpu.moeGateBackward(spec, logits, out, dw, lauxCoeff, zlossCoeff, dlogits);
        double[] dwd = dw.toDoubles(), fd = new double[s * e];
        double h = 1e-6;
        for (int i = 0; i < s * e; i++) {
            double keep = l[i];
            l[i] = keep + h;
            double up = new MoeReference(l, s, e, k, capacity).objective(dwd, lauxCoeff, zlossCoeff);
            l[i] = keep - h;
            double dn = new MoeReference(l, s, e, k, capacity).objective(dwd, lauxCoeff, zlossCoeff);
            l[i] = keep;
            fd[i] = (up - dn) / (2 * h);
        }
        double eb = Tensors.relError(dlogits.toDoubles(), fd);
        System.out.printf("moeGateBackward k=%d E=%d S=%d C=%d vs finite differences: %.2e%n", k, e, s, capacity, eb);
        assertTrue(eb < 1e-4, "moeGateBackward differs from finite differences: " + eb);
    }

    @ParameterizedTest
    // widths 48 and 64 in bf16 take the 8-column kernels, 45 the generic ones
    @CsvSource({"1, 6, 37, 9, F32, 45", "2, 6, 37, 9, BF16, 45", "2, 5, 41, 0, F32, 45", "2, 6, 37, 9, BF16, 48", "1, 5, 41, 0, BF16, 64"})
    void permuteUnpermuteAndBackward(int k, int e, int s, int capacity, DType dt, int m) {
        Tensor logits = Tensors.random(gpu, DType.F32, rnd, 2, s, e);
        GateOutputs out = CudaMoeVsCpuTest.outputs(gpu, s, e, k);
        gpu.moeGate(new GateSpec(k, capacity, false, false, false, 1, 0), logits, out);
        int rows = capacity > 0 ? e * capacity : s * k;
        int[] dest = out.dest().toInts();
        double[] w = out.weights().toDoubles();
        Tensor x = Tensors.random(gpu, dt, rnd, 1, s, m), buf = Tensors.random(gpu, dt, rnd, 1, rows, m);
        double[] bufBefore = buf.toDoubles(), xd = x.toDoubles();
        gpu.moePermute(x, out.dest(), buf);
        double[] want = bufBefore.clone();
        for (int t = 0; t < s; t++) for (int j = 0; j < k; j++) {
            int d = dest[t * k + j];
            if (d >= 0) System.arraycopy(xd, t * m, want, d * m, m);
        }
        assertArrayEquals(want, buf.toDoubles(), "moePermute: rows copied exactly, others untouched");

        Tensor y = gpu.zeros(dt, s, m);
        gpu.moeUnpermute(buf, out.dest(), out.weights(), y);
        double[] bd = buf.toDoubles(), yw = new double[s * m];
        for (int t = 0; t < s; t++) for (int j = 0; j < k; j++) {
            int d = dest[t * k + j];
            if (d >= 0) for (int c = 0; c < m; c++) yw[t * m + c] += w[t * k + j] * bd[d * m + c];
        }
        double eu = Tensors.relError(y.toDoubles(), yw);
        assertTrue(eu < tol(dt), "moeUnpermute: " + eu);

        Tensor dout = Tensors.random(gpu, dt, rnd, 1, s, m), dbuf = Tensors.random(gpu, dt, rnd, 1, rows, m), dwt = gpu.zeros(DType.F32, s, k);
        double[] dbBefore = dbuf.toDoubles(), dod = dout.toDoubles();
        gpu.moeUnpermuteBackward(dout, buf, out.dest(), out.weights(), dbuf, dwt);
        double[] dbw = dbBefore.clone(), dww = new double[s * k];
        for (int t = 0; t < s; t++) for (int j = 0; j < k; j++) {
            int d = dest[t * k + j];
            if (d < 0) continue;
            double dot = 0;
            for (int c = 0; c < m; c++) { dbw[d * m + c] = dt.round(w[t * k + j] * dod[t * m + c]); dot += dod[t * m + c] * bd[d * m + c]; }
            dww[t * k + j] = dot;
        }
        double ed = Tensors.relError(dbuf.toDoubles(), dbw), ew = Tensors.relError(dwt.toDoubles(), dww);
        System.out.printf("moe permute/unpermute k=%d C=%d %s: unpermute %.2e dbuf %.2e dw %.2e%n", k, capacity, dt, eu, ed, ew);
        assertTrue(ed < tol(dt) && ew < 1e-5, "moeUnpermuteBackward: " + ed + " " + ew);
    }
}
