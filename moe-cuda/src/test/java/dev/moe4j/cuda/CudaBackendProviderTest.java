package dev.moe4j.cuda;

import dev.moe4j.core.backend.BackendProvider;
import dev.moe4j.core.backend.Backends;
import org.junit.jupiter.api.Test;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

/** Runs everywhere (CI has no GPU): the provider is found, ranks above the CPU and probes without throwing. */
class CudaBackendProviderTest {

    @Test
    void registeredWithRank100AndAProbeThatNeverThrows() {
        BackendProvider cuda = Backends.providers().stream().filter(p -> p.name().equals("cuda")).findFirst().orElseThrow();
        assertEquals(100, cuda.rank());
        assertEquals("cuda", Backends.providers().get(0).name(), "CUDA ranks above the CPU");
        String why = cuda.unavailableReason();
        System.out.println("cuda backend here: " + (why == null ? "available" : why));
        if (why != null) assertFalse(why.isBlank());
        assertTrue(Backends.debugEnvironment().contains("cuda"));
    }
}
