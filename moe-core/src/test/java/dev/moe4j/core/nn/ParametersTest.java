package dev.moe4j.core.nn;

import dev.moe4j.core.cpu.CpuBackend;
import dev.moe4j.core.tensor.DType;
import org.junit.jupiter.api.Test;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

class ParametersTest {
    @Test
    void decayedParametersComeFirstAndViewsShareTheFlatBuffers() {
        ModelContext ctx = new ModelContext(new CpuBackend(), DType.BF16, 1);
        Parameter bias = ctx.params().add("b", Init.ones(), false, 3);
        Parameter w = ctx.params().add("w", Init.normal(1), true, 2, 2);
        ctx.allocateParameters();
        assertEquals(4, ctx.params().decayCount());
        assertEquals(7, ctx.params().count());
        assertEquals(4, bias.master().offset(), "no-decay parameters follow the decayed ones");
        assertEquals(DType.F32, w.master().dtype());
        assertEquals(DType.BF16, w.value().dtype());
        assertArrayEquals(new float[] {1, 1, 1}, bias.value().toFloats());
        ctx.backend().fill(w.grad(), 2);
        assertEquals(8.0, java.util.Arrays.stream(ctx.params().grad().toDoubles()).sum(), "grad views write into the flat buffer");
        assertThrows(IllegalArgumentException.class, () -> ctx.params().get("nope"));
    }

    @Test
    void flatBuffersPastTwoToTheThirtyOneElementsArePaddedMatrices() {
        assertArrayEquals(new int[] {1000}, Parameters.flatShape(1000));
        long n = 4_300_000_000L;
        int[] s = Parameters.flatShape(n);
        assertEquals(2, s.length);
        assertTrue((long) s[0] * s[1] >= n && (long) (s[0] - 1) * s[1] < n, "the padding is less than one row");
    }
}
