package dev.moe4j.core.nn;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.cpu.CpuBackend;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
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
    void gradientsDefaultToTheMasterDTypeAndBf16OnlyForABf16Model() {
        for (DType model : new DType[] {DType.F32, DType.BF16, DType.F64}) {
            ModelContext ctx = new ModelContext(new CpuBackend(), model, 1);
            ctx.params().add("w", Init.normal(1), true, 2, 2);
            ctx.allocateParameters();
            DType master = model == DType.F64 ? DType.F64 : DType.F32;
            assertEquals(master, ctx.gradDType(), "default gradient dtype of a " + model + " model");
            assertEquals(master, ctx.params().grad().dtype());
        }
        ModelContext bf16 = new ModelContext(new CpuBackend(), DType.BF16, 1);
        bf16.setGradDType(DType.F32);
        bf16.setGradDType(DType.BF16);
        bf16.params().add("w", Init.normal(1), true, 2, 2);
        bf16.allocateParameters();
        assertEquals(DType.BF16, bf16.params().grad().dtype());
        var late = assertThrows(IllegalStateException.class, () -> bf16.setGradDType(DType.F32));
        assertTrue(late.getMessage().contains("before allocating"), late.getMessage());

        var f32 = assertThrows(IllegalArgumentException.class, () -> new ModelContext(new CpuBackend(), DType.F32, 1).setGradDType(DType.BF16));
        assertEquals("gradient dtype BF16 does not fit model dtype F32: allowed are F32, or BF16 with a BF16 model", f32.getMessage());
        var f64 = assertThrows(IllegalArgumentException.class, () -> new ModelContext(new CpuBackend(), DType.F64, 1).setGradDType(DType.F32));
        assertTrue(f64.getMessage().contains("allowed are F64"), f64.getMessage());
        var i32 = assertThrows(IllegalArgumentException.class, () -> new ModelContext(new CpuBackend(), DType.BF16, 1).setGradDType(DType.I32));
        assertEquals("gradient dtype I32 does not fit model dtype BF16: allowed are F32 and BF16", i32.getMessage());
    }

    @Test
    void flatBuffersPastTwoToTheThirtyOneElementsArePaddedMatrices() {
        assertArrayEquals(new int[] {1000}, Parameters.flatShape(1000));
        long n = 4_300_000_000L;
        int[] s = Parameters.flatShape(n);
        assertEquals(2, s.length);
        assertTrue((long) s[0] * s[1] >= n && (long) (s[0] - 1) * s[1] < n, "the padding is less than one row");
    }

    @Test
    void expertShardsInitialiseAsTheirRowsOfTheWholeTensorAndGroupAfterTheReplicatedParameters() {
        ModelContext whole = new ModelContext(new CpuBackend(), DType.F64, 3);
        whole.params().add("w", Init.normal(1), true, 2, 2);
        Parameter all = whole.params().add("experts", Init.normal(1), true, new ExpertShard(1, 0, 4, 4), 4, 3);
        whole.allocateParameters();
        ModelContext part = new ModelContext(new CpuBackend(), DType.F64, 3);
        Parameter bias = part.params().add("b", Init.zeros(), false, 2);
        Parameter shard = part.params().add("experts", Init.normal(1), true, new ExpertShard(2, 2, 2, 4), 2, 3);
        Parameter w = part.params().add("w", Init.normal(1), true, 2, 2);
        part.allocateParameters();
        assertArrayEquals(java.util.Arrays.copyOfRange(all.master().toDoubles(), 6, 12), shard.master().toDoubles(), "rows 2..3 of the whole tensor");
        assertTrue(shard.isExpert() && !w.isExpert());
        assertEquals(0, w.master().offset(), "replicated decayed parameters first");
        assertEquals(4, shard.master().offset(), "then the decayed experts");
        assertEquals(10, bias.master().offset(), "then the no-decay ones");
        assertEquals(10, part.params().decayCount());
        assertEquals(java.util.List.of(w, shard, bias), part.params().layoutOrder());
        var e = assertThrows(IllegalArgumentException.class, () -> new ModelContext(new CpuBackend(), DType.F64, 1).params()
                .add("x", Init.zeros(), false, new ExpertShard(2, 0, 2, 4), 3, 1));
        assertTrue(e.getMessage().contains("must have 2 rows"), e.getMessage());
    }

    /**
     * After zeroGrad: the first write overwrites the stale gradient (NaN here, as after a skipped step), a second
     * use of the parameter adds to it, an add-only op starts from zero, and a gradient nothing wrote reads zero.
     */
    @Test
    void theFirstWriteAfterZeroGradOverwritesLaterOnesAddAndUnwrittenGradientsFinishAsZero() {
        ModelContext ctx = new ModelContext(new CpuBackend(), DType.F32, 1);
        Backend b = ctx.backend();
        Parameter twice = ctx.params().add("twice", Init.zeros(), true, 2, 2);
        Parameter scattered = ctx.params().add("scattered", Init.zeros(), false, 2, 2);
        Parameter unused = ctx.params().add("unused", Init.zeros(), false, 3);
        ctx.allocateParameters();
        b.fill(ctx.params().grad(), Float.NaN);
        ctx.params().zeroGrad();
        Tensor x = b.fromFloats(DType.F32, new float[] {1, 2, 3, 4}, 2, 2), y = b.fromFloats(DType.F32, new float[] {1, 0, 0, 1}, 2, 2);
        b.matmul(x, true, y, false, twice.grad(), 1f, twice.gradBeta());    // x^T y = x^T
        b.matmul(y, true, y, false, twice.grad(), 2f, twice.gradBeta());    // + 2 y^T y = 2 I
        assertArrayEquals(new float[] {3, 3, 2, 6}, twice.grad().toFloats(), "x^T + 2 I");
        b.scatterAddRows(x, b.fromInts(new int[] {1, 1}, 2), null, scattered.definedGrad());
        assertArrayEquals(new float[] {0, 0, 4, 6}, scattered.grad().toFloats(), "row 0 untouched by the scatter reads zero");
        assertTrue(Float.isNaN(unused.grad().toFloats()[0]), "zeroGrad itself does not fill");
        ctx.params().finishGrads();
        assertArrayEquals(new float[] {0, 0, 0}, unused.grad().toFloats());
        assertArrayEquals(new float[] {3, 3, 2, 6}, twice.grad().toFloats(), "finishing leaves written gradients alone");
        assertEquals(1f, unused.gradBeta(), "a finished gradient is defined: later writes add");
    }
}
