package dev.moe4j.cuda;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.cpu.CpuBackend;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.testing.Tensors;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.BeforeAll;

import java.util.SplittableRandom;

import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * Shared set-up of the GPU tests: a CUDA backend next to the CPU reference, paired random tensors holding
 * the same values on both, and comparisons by relative L2 error. Skipped (not failed) where no GPU is usable.
 *
 * <p>Tolerances (relative L2 error against the CPU's float64 arithmetic rounded to the output dtype):
 * {@link #F32_TOL} for F32 outputs (fp32 accumulation order and fast-math differences), {@link #BF16_TOL} for BF16
 * outputs or BF16 inputs (8 bits of mantissa; one rounding step can differ).
 */
abstract class GpuTestBase {
    static final double F32_TOL = 1e-5;
    static final double BF16_TOL = 1e-2;

    static CudaBackend gpu;
    static CpuBackend cpu;
    SplittableRandom rnd = new SplittableRandom(42);

    @BeforeAll
    static void open() {
        String why = new CudaBackendProvider().unavailableReason();
        Assumptions.assumeTrue(why == null, () -> "no usable GPU, CUDA tests skipped: " + why);
        if (gpu == null) gpu = new CudaBackend(0);
        cpu = new CpuBackend();
    }

    @AfterAll
    static void sync() {
        if (gpu != null) gpu.synchronize();
    }

    static double tol(DType... dts) {
        for (DType d : dts) if (d == DType.BF16) return BF16_TOL;
        return F32_TOL;
    }

    /** The same random values (uniform in [-scale, scale), never all zero) on the CPU [0] and on the GPU [1]. */
    Tensor[] rand(DType dt, double scale, int... shape) {
        Tensor c = Tensors.random(cpu, dt, rnd, scale, shape);
        return new Tensor[] {c, gpu.fromDoubles(dt, c.toDoubles(), shape)};
    }

    Tensor[] ints(int lo, int hi, int... shape) {
        Tensor c = Tensors.randomInts(cpu, rnd, lo, hi, shape);
        return new Tensor[] {c, gpu.fromInts(c.toInts(), shape)};
    }

    Tensor[] of(int[] values, int... shape) {
        return new Tensor[] {cpu.fromInts(values, shape), gpu.fromInts(values, shape)};
    }

    static Backend on(int i) { return i == 0 ? cpu : gpu; }

    /** Asserts the GPU tensor matches the CPU one within tol (relative L2) and returns the error seen. */
    static double check(String what, Tensor[] pair, double tol) {
        double[] want = pair[0].toDoubles(), got = pair[1].toDoubles();
        double err = Tensors.relError(got, want);
        System.out.printf("%-48s %-5s rel err %.3e (tol %.0e)%n", what, pair[1].dtype(), err, tol);
        assertTrue(err <= tol, what + ": relative error " + err + " > " + tol);
        return err;
    }

    static void checkInts(String what, Tensor[] pair) {
        int[] want = pair[0].toInts(), got = pair[1].toInts();
        org.junit.jupiter.api.Assertions.assertArrayEquals(want, got, what);
        System.out.printf("%-48s I32   exact%n", what);
    }
}
