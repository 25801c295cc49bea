package dev.moe4j.core.cpu;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.testing.Tensors;
import org.junit.jupiter.api.Test;

import java.util.SplittableRandom;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

/** Backend.sumRowsGrouped and the bias + activation pair of grouped experts against plain loops, on the CPU's default forms. */
class CpuRowGroupsTest {
    private final Backend cpu = new CpuBackend();

    @Test
    void eachGroupsRowsAreAddedToItsRowOfOut() {
        SplittableRandom rnd = new SplittableRandom(5);
        int rows = 23, c = 4;
        int[] off = {0, 5, 5, 12, 20};   // an empty group; rows 20..22 are past the last offset and not read
        Tensor x = Tensors.random(cpu, DType.F64, rnd, 1, rows, c), out = Tensors.random(cpu, DType.F64, rnd, 1, off.length - 1, c);
        double[] X = x.toDoubles(), before = out.toDoubles();
        cpu.sumRowsGrouped(x, cpu.fromInts(off, off.length), out);
        double[] got = out.toDoubles();
        for (int g = 0; g + 1 < off.length; g++) {
            for (int j = 0; j < c; j++) {
                double s = before[g * c + j];
                for (int r = off[g]; r < off[g + 1]; r++) s += X[r * c + j];
                assertEquals(s, got[g * c + j], 1e-12, "group " + g + " column " + j);
            }
        }
    }

    @Test
    void activationWithGroupBiasAddsEachRowsBiasAndSumsTheGradientPerGroup() {
        SplittableRandom rnd = new SplittableRandom(6);
        int rows = 23, c = 4;
        int[] off = {0, 5, 5, 12, 20};          // rows 20..22: past the last offset, dx written, no sums
        int[] group = new int[rows];
        for (int r = 0; r < rows; r++) group[r] = r % 7 == 2 ? -1 : rnd.nextInt(4);   // -1: no bias
        Tensor x = Tensors.random(cpu, DType.F64, rnd, 1, rows, c), bias = Tensors.random(cpu, DType.F64, rnd, 1, 4, c);
        Tensor dout = Tensors.random(cpu, DType.F64, rnd, 1, rows, c), dbias = Tensors.random(cpu, DType.F64, rnd, 1, 4, c);
        Tensor grp = cpu.fromInts(group, rows), out = cpu.zeros(DType.F64, rows, c), dx = cpu.zeros(DType.F64, rows, c);
        double[] X = x.toDoubles(), B = bias.toDoubles(), D = dout.toDoubles(), dbBefore = dbias.toDoubles();
        cpu.activationGroupBias(Activation.RELU, x, bias, grp, out);
        cpu.activationGroupBiasBackward(Activation.RELU, x, bias, grp, cpu.fromInts(off, off.length), dout, dx, dbias);
        double[] O = out.toDoubles(), DX = dx.toDoubles(), DB = dbias.toDoubles(), want = dbBefore.clone();
        for (int r = 0; r < rows; r++) {
            for (int j = 0; j < c; j++) {
                double pre = X[r * c + j] + (group[r] < 0 ? 0 : B[group[r] * c + j]);
                double grad = pre > 0 ? D[r * c + j] : 0;
                assertEquals(Math.max(0, pre), O[r * c + j], 1e-12, "out row " + r);
                assertEquals(grad, DX[r * c + j], 1e-12, "dx row " + r);
                for (int g = 0; g + 1 < off.length; g++) if (r >= off[g] && r < off[g + 1]) want[g * c + j] += grad;
            }
        }
        for (int i = 0; i < want.length; i++) assertEquals(want[i], DB[i], 1e-12, "dbias element " + i);
    }

    @Test
    void offsetsOutsideTheRowsAreRefused() {
        Tensor x = cpu.zeros(DType.F64, 6, 2), out = cpu.zeros(DType.F64, 2, 2);
        var e = assertThrows(IllegalArgumentException.class, () -> cpu.sumRowsGrouped(x, cpu.fromInts(new int[] {0, 4, 7}, 3), out));
        assertTrue(e.getMessage().contains("non-decreasing within [0, 6]"), e.getMessage());
    }
}
