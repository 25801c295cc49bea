package dev.moe4j.comm.nccl;

import org.junit.jupiter.api.Tag;
import org.junit.jupiter.api.Test;

import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assumptions.assumeTrue;

/**
 * The NCCL checks as a JUnit test (-Pgpu). In one process (no WORLD_SIZE) it runs a world of 1; under torchrun
 * each process runs its rank. See moe-comm/GPU-TESTS.md for the 2-process run.
 */
@Tag("gpu")
class NcclCommunicatorGpuTest {
    @Test
    void collectives() throws Exception {
        String why = NcclLibrary.unavailableReason();
        assumeTrue(why == null, why);
        int[] n = new int[1];
        assumeTrue(org.bytedeco.cuda.global.cudart.cudaGetDeviceCount(n) == 0 && n[0] > 0, "no GPU");
        assertTrue(NcclGpuCheck.run("collectives"), "see the FAIL lines above");
    }
}
