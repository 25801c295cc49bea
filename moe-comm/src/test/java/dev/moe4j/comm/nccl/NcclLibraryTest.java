package dev.moe4j.comm.nccl;

import dev.moe4j.comm.InProcessWorld;
import dev.moe4j.core.comm.CommOptions;
import org.junit.jupiter.api.Test;

import java.util.Map;

import static org.junit.jupiter.api.Assertions.*;
import static org.junit.jupiter.api.Assumptions.assumeTrue;

/** Where NCCL cannot load, the error says what is missing (this test runs on CPU-only CI machines). */
class NcclLibraryTest {

    @Test
    void missingNcclGivesAClearError() {
        String why = NcclLibrary.unavailableReason();
        assumeTrue(why != null, "NCCL is available here; nothing to check");
        var e = assertThrows(IllegalStateException.class, NcclLibrary::load);
        assertEquals(why, e.getMessage());
        assertTrue(why.contains("libnccl.so.2") || why.contains("only on Linux") || why.contains("too old"), why);
    }

    @Test
    void versionString() {
        assertEquals("2.28.9", NcclLibrary.versionString(22809));
        assertEquals("2.18.0", NcclLibrary.versionString(NcclLibrary.MIN_VERSION));
    }

    @Test
    void cpuBackendIsRejected() {
        assumeTrue(NcclLibrary.unavailableReason() == null, "needs NCCL to get past loading");
        InProcessWorld.run(1, CommOptions.defaults(), comm -> {
            var e = assertThrows(IllegalArgumentException.class, () -> NcclCommunicator.create(comm.backend(), 0, 1,
                    new byte[org.bytedeco.cuda.global.nccl.NCCL_UNIQUE_ID_BYTES], new int[] {0}, "t", null, null));
            assertTrue(e.getMessage().contains("needs a GPU backend"), e.getMessage());
            return null;
        });
        assertNotNull(Map.of());
    }
}
