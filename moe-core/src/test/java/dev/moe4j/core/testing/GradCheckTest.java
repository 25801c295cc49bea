package dev.moe4j.core.testing;

import dev.moe4j.core.cpu.CpuBackend;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import org.junit.jupiter.api.Test;

import static org.junit.jupiter.api.Assertions.assertThrows;

/** The checker itself must reject a wrong gradient, or every gradient test proves nothing. */
class GradCheckTest {
    @Test
    void rejectsAWrongGradientAndAcceptsTheRightOne() {
        var cpu = new CpuBackend();
        Tensor x = cpu.fromDoubles(DType.F64, new double[] {0.3, -1.2, 2.0}, 3);
        // L = sum x^3  ->  dL/dx = 3x^2
        java.util.function.DoubleSupplier loss = () -> { double s = 0; for (double v : x.toDoubles()) s += v * v * v; return s; };
        Tensor right = cpu.fromDoubles(DType.F64, new double[] {0.27, 4.32, 12.0}, 3);
        Tensor wrong = cpu.fromDoubles(DType.F64, new double[] {0.27, 4.32, 12.0001}, 3);
        GradCheck.check("right", x, right, loss, 10, GradCheck.F64_TOL);
        assertThrows(AssertionError.class, () -> GradCheck.check("wrong", x, wrong, loss, 10, GradCheck.F64_TOL));
    }
}
