package dev.moe4j.cuda;

import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Scope;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.testing.Tensors;
import org.junit.jupiter.api.Tag;
import org.junit.jupiter.api.Test;

import java.util.ArrayList;
import java.util.List;

import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * The measured cuBLASLt algorithm choice for bf16 strided-batched GEMMs ({@link LtGemmTuner}) against the CPU
 * reference: the capacity-padded expert products in their three forms (forward, data gradient with the weight
 * transposed, weight gradient with the activation transposed), as rank-3 matmuls and as grouped products over equal
 * groups, bf16 and fp32 outputs. Each case runs twice with beta 0 (the first call tunes, the second takes the cached
 * choice) on an output filled with NaN (beta 0 must not read it), then twice with beta 1 (the choice made with beta 0).
 * Once with the choice by timing, then with every heuristic candidate forced in turn, since timing may pick any.
 */
@Tag("gpu")
class CudaGemmTuneTest extends GpuTestBase {
    static final int E = 16, ROWS = 64, K = 256, N = 512, T = E * ROWS;

    /** One product: its output on the CPU [0] and the GPU [1], and the call on either side. */
    private record Case(String name, Tensor[] out, Call call) {}

    @FunctionalInterface
    private interface Call { void run(int side, float beta); }

    private List<Case> cases(DType out) {
        int[] offs = new int[E + 1];
        for (int g = 0; g <= E; g++) offs[g] = g * ROWS;
        Tensor[] o = of(offs, E + 1);
        List<Case> cs = new ArrayList<>();
        // rank-3 matmuls: [E, ROWS, K] x [E, K, N]; [E, ROWS, N] x [E, K, N]^T; [E, ROWS, K]^T x [E, ROWS, N]
        Tensor[] a = rand(DType.BF16, 1, E, ROWS, K), w = rand(DType.BF16, 1, E, K, N), dy = rand(DType.BF16, 1, E, ROWS, N);
        Tensor[] y = {cpu.empty(out, E, ROWS, N), gpu.empty(out, E, ROWS, N)};
        cs.add(new Case("matmul batched forward (NN)", y, (i, beta) -> on(i).matmul(a[i], false, w[i], false, y[i], 1f, beta)));
        Tensor[] dx = {cpu.empty(out, E, ROWS, K), gpu.empty(out, E, ROWS, K)};
        cs.add(new Case("matmul batched data gradient (NT)", dx, (i, beta) -> on(i).matmul(dy[i], false, w[i], true, dx[i], 1f, beta)));
        Tensor[] dw = {cpu.empty(out, E, K, N), gpu.empty(out, E, K, N)};
        cs.add(new Case("matmul batched weight gradient (TN)", dw, (i, beta) -> on(i).matmul(a[i], true, dy[i], false, dw[i], 1f, beta)));
        // grouped over E equal groups of ROWS rows (one strided-batched GEMM)
        Tensor[] ga = rand(DType.BF16, 1, T, K), gdy = rand(DType.BF16, 1, T, N), gw = rand(DType.BF16, 1, E, K, N);
        Tensor[] gy = {cpu.empty(out, T, N), gpu.empty(out, T, N)};
        cs.add(new Case("groupedMatmul forward", gy, (i, beta) -> on(i).groupedMatmul(ga[i], gw[i], false, o[i], offs, gy[i], beta)));
        Tensor[] gdx = {cpu.empty(out, T, K), gpu.empty(out, T, K)};
        cs.add(new Case("groupedMatmul data gradient (transW)", gdx, (i, beta) -> on(i).groupedMatmul(gdy[i], gw[i], true, o[i], offs, gdx[i], beta)));
        Tensor[] gdw = {cpu.empty(out, E, K, N), gpu.empty(out, E, K, N)};
        cs.add(new Case("groupedMatmulWeightGrad", gdw, (i, beta) -> on(i).groupedMatmulWeightGrad(ga[i], gdy[i], o[i], offs, gdw[i], beta)));
        // the activations one element into a buffer: A only 2-byte aligned (cuBLASLt is told the real alignment)
        Tensor[] raw = rand(DType.BF16, 1, T * K + 1);
        Tensor[] ma = {raw[0].view(1, T, K), raw[1].view(1, T, K)};
        Tensor[] my = {cpu.empty(out, T, N), gpu.empty(out, T, N)};
        cs.add(new Case("groupedMatmul forward, A 2-byte aligned", my, (i, beta) -> on(i).groupedMatmul(ma[i], gw[i], false, o[i], offs, my[i], beta)));
        return cs;
    }

    /** beta 0 twice on a NaN-filled output, then beta 1 twice; the output after each pair. */
    private static double[][] sequence(Case c, int side) {
        on(side).fill(c.out[side], Double.NaN);
        c.call.run(side, 0f);
        c.call.run(side, 0f);
        double[] first = c.out[side].toDoubles();
        c.call.run(side, 1f);
        c.call.run(side, 1f);
        return new double[][] {first, c.out[side].toDoubles()};
    }

    private static void compare(String what, double[] got, double[] want) {
        double err = Tensors.relError(got, want);
        System.out.printf("%-72s rel err %.3e (tol %.0e)%n", what, err, BF16_TOL);
        assertTrue(err <= BF16_TOL, what + ": relative error " + err + " > " + BF16_TOL);
    }

    @Test
    void expertFormsMatchTheCpuWithEveryCandidate() {
        LtGemmTuner tuner = gpu.ltTuner();   // null with -Dmoe4j.cuda.ltTune=false: the old path alone
        try (Scope scope = Scope.open()) {
            for (DType out : new DType[] {DType.BF16, DType.F32}) {
                List<Case> cs = cases(out);
                List<double[][]> want = new ArrayList<>();
                for (Case c : cs) want.add(sequence(c, 0));
                // -1: the choice by timing; 0..CANDIDATES-1: that heuristic candidate (the old call where there are fewer)
                int passes = tuner == null ? 1 : LtGemmTuner.CANDIDATES + 1;
                for (int pass = 0; pass < passes; pass++) {
                    int forced = pass - 1;
                    if (tuner != null) {
                        tuner.clear();
                        tuner.forced = forced;
                    }
                    long runsBefore = tuner == null ? 0 : tuner.ltRuns;
                    for (int j = 0; j < cs.size(); j++) {
                        Case c = cs.get(j);
                        double[][] got = sequence(c, 1);
                        String what = c.name + " -> " + out + (forced < 0 ? " (timed)" : " (candidate " + forced + ")");
                        compare(what + " beta 0", got[0], want.get(j)[0]);
                        compare(what + " beta 1", got[1], want.get(j)[1]);
                    }
                    if (tuner != null) {
                        System.out.printf("pass %d: %d shapes tuned, %d on cuBLASLt, %d cublasLtMatmul calls%n%s",
                                forced, tuner.tunedShapes(), tuner.ltShapes(), tuner.ltRuns - runsBefore, tuner.describe());
                        assertTrue(tuner.tunedShapes() >= 3, "the three forms should each have been tuned: " + tuner.tunedShapes());
                        if (forced == 0) {
                            assertTrue(tuner.ltShapes() > 0, "cuBLASLt had no candidate for any bf16 expert shape");
                            assertTrue(tuner.ltRuns > runsBefore, "no product ran through cublasLtMatmul");
                        }
                    }
                }
            }
        } finally {
            if (tuner != null) {
                tuner.forced = -1;
                tuner.clear();
            }
        }
    }
}
