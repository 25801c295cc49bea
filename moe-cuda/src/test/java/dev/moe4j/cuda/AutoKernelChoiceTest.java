package dev.moe4j.cuda;

import dev.moe4j.cuda.CudaBackend.GroupedForm;
import org.junit.jupiter.api.Test;

import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * AUTO's choice of our wgmma kernels over cuBLAS (CudaBackend.autoPicksWgmma), the measured policy of
 * docs/benchmarks.md: runs everywhere (no GPU needed), so that a change of the rule shows in CI.
 */
class AutoKernelChoiceTest {

    private static int[] equal(int e, int rows) {
        int[] o = new int[e + 1];
        for (int g = 0; g <= e; g++) o[g] = g * rows;
        return o;
    }

    @Test
    void theFusedActivationOnlyWhereNoExpertPasses64Rows() {
        int[] capped64 = equal(128, 64);
        assertTrue(CudaBackend.autoPicksWgmma(GroupedForm.FORWARD, 128, 8192, capped64, true));
        assertTrue(CudaBackend.autoPicksWgmma(GroupedForm.DATA_GRAD, 128, 8192, capped64, true));
        int[] oneOver = capped64.clone();
        oneOver[1] += 1;   // expert 0 with 65 rows, expert 1 with 63
        assertFalse(CudaBackend.autoPicksWgmma(GroupedForm.FORWARD, 128, 8192, oneOver, true), "an expert past one 64-row tile");
        assertFalse(CudaBackend.autoPicksWgmma(GroupedForm.DATA_GRAD, 128, 128 * 91, equal(128, 91), true), "a padded dropless layout");
        assertFalse(CudaBackend.autoPicksWgmma(GroupedForm.FORWARD, 128, 8192, null, true), "offsets not on the host");
    }

    @Test
    void thePlainProductsByRowsPerExpertAndForm() {
        int[] capped64 = equal(128, 64);
        assertTrue(CudaBackend.autoPicksWgmma(GroupedForm.DATA_GRAD, 128, 8192, capped64, false));
        assertFalse(CudaBackend.autoPicksWgmma(GroupedForm.WEIGHT_GRAD, 128, 8192, capped64, false), "cuBLAS's weight gradient is faster");
        assertFalse(CudaBackend.autoPicksWgmma(GroupedForm.FORWARD, 128, 8192, capped64, false), "equal groups: one strided-batched cuBLAS GEMM");
        int[] unequal = capped64.clone();
        unequal[1] -= 3;
        assertTrue(CudaBackend.autoPicksWgmma(GroupedForm.FORWARD, 128, 8192, unequal, false), "unequal groups");
        assertTrue(CudaBackend.autoPicksWgmma(GroupedForm.FORWARD, 128, 8192, null, false), "unequal groups not read to the host");
        // tensor-core-bound: 256 rows per expert (top-2) and more
        assertFalse(CudaBackend.autoPicksWgmma(GroupedForm.DATA_GRAD, 64, 16384, equal(64, 256), false));
        assertFalse(CudaBackend.autoPicksWgmma(GroupedForm.FORWARD, 64, 16384, equal(64, 256), true));
    }
}
