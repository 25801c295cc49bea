package dev.moe4j.core.cpu;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.testing.GradCheck;
import dev.moe4j.core.testing.Tensors;
import org.junit.jupiter.api.Test;

import java.util.SplittableRandom;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

class CpuMatmulTest {
    private final Backend cpu = new CpuBackend();

    @Test
    void matmulMatchesNaiveLoopsForEveryTransposeAndOddSizes() {
        SplittableRandom rnd = new SplittableRandom(1);
        for (boolean ta : new boolean[] {false, true}) {
            for (boolean tb : new boolean[] {false, true}) {
                int m = 7, k = 5, n = 3;
                Tensor a = Tensors.random(cpu, DType.F64, rnd, 1, ta ? k : m, ta ? m : k);
                Tensor b = Tensors.random(cpu, DType.F64, rnd, 1, tb ? n : k, tb ? k : n);
                Tensor c = Tensors.random(cpu, DType.F64, rnd, 1, m, n);
                double[] A = a.toDoubles(), B = b.toDoubles(), C0 = c.toDoubles();
                cpu.matmul(a, ta, b, tb, c, 0.5f, 2f);
                double[] C = c.toDoubles();
                for (int i = 0; i < m; i++) {
                    for (int j = 0; j < n; j++) {
                        double s = 0;
                        for (int p = 0; p < k; p++) s += (ta ? A[p * m + i] : A[i * k + p]) * (tb ? B[j * k + p] : B[p * n + j]);
                        assertEquals(0.5 * s + 2 * C0[i * n + j], C[i * n + j], 1e-12, "ta=" + ta + " tb=" + tb + " at " + i + "," + j);
                    }
                }
            }
        }
    }

    @Test
    void matmulGradientMatchesFiniteDifferences() {
        SplittableRandom rnd = new SplittableRandom(2);
        Tensor a = Tensors.random(cpu, DType.F64, rnd, 1, 6, 4);
        Tensor b = Tensors.random(cpu, DType.F64, rnd, 1, 4, 5);
        Tensor r = Tensors.random(cpu, DType.F64, rnd, 1, 6, 5);
        Tensor c = cpu.zeros(DType.F64, 6, 5);
        Tensor da = cpu.zeros(DType.F64, 6, 4), db = cpu.zeros(DType.F64, 4, 5);
        cpu.matmul(r, false, b, true, da, 1f, 0f);   // dA = dC B^T
        cpu.matmul(a, true, r, false, db, 1f, 0f);   // dB = A^T dC
        java.util.function.DoubleSupplier loss = () -> { cpu.matmul(a, false, b, false, c, 1f, 0f); return Tensors.dot(c, r); };
        GradCheck.check("dA", a, da, loss, 100, GradCheck.F64_TOL);
        GradCheck.check("dB", b, db, loss, 100, GradCheck.F64_TOL);
    }

    @Test
    void shapeMismatchNamesTheProblem() {
        Tensor a = cpu.zeros(DType.F32, 3, 4), b = cpu.zeros(DType.F32, 5, 2), c = cpu.zeros(DType.F32, 3, 2);
        var e = assertThrows(IllegalArgumentException.class, () -> cpu.matmul(a, false, b, false, c, 1f, 0f));
        assertEquals("matmul: inner dimensions differ: op(A) is [3, 4], op(B) is [5, 2]", e.getMessage());
    }

    /** beside() holds CPU callers to the CUDA backend's rules: one side work open at a time, no GEMMs inside. */
    @Test
    void besideRefusesWhatTheCudaBackendRefuses() {
        Tensor a = cpu.fromDoubles(DType.F32, new double[] {1, 2, 3, 4}, 2, 2), c = cpu.zeros(DType.F32, 2, 2);
        Tensor offsets = cpu.fromInts(new int[] {0, 1, 2}, 3), w = cpu.fromDoubles(DType.F32, new double[8], 2, 2, 2);
        assertThrows(IllegalStateException.class, () -> cpu.beside(() -> cpu.matmul(a, false, a, false, c, 1f, 0f)).join());
        assertThrows(IllegalStateException.class, () -> cpu.beside(() -> cpu.groupedMatmul(a, w, false, offsets, c, 0f)).join());
        assertThrows(IllegalStateException.class, () -> cpu.beside(() -> cpu.groupedMatmulWeightGrad(a, c, offsets, w, 0f)).join());
        assertThrows(IllegalStateException.class, () -> cpu.beside(() -> cpu.beside(() -> { })).join());
        // a failed side work is joined: the next may open
        Backend.SideWork open = cpu.beside(() -> cpu.scale(a, 2, c));
        assertThrows(IllegalStateException.class, () -> cpu.beside(() -> { }), "a second side work before the first is joined");
        open.join();
        cpu.beside(() -> { }).join();
        assertEquals(java.util.List.of(2.0, 4.0, 6.0, 8.0), java.util.Arrays.stream(c.toDoubles()).boxed().toList(), "the side work ran");
        cpu.matmul(a, false, a, false, c, 1f, 0f);   // after the join, GEMMs again
        assertEquals(7.0, c.toDoubles()[0]);
    }
}
