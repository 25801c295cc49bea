package dev.moe4j.core.cpu;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.backend.BackendProvider;

/** Registers the CPU backend with {@link java.util.ServiceLoader}; always available, lowest rank. */
public final class CpuBackendProvider implements BackendProvider {
    @Override public String name() { return "cpu"; }

    @Override public int rank() { return 0; }

    @Override public String unavailableReason() { return null; }

    @Override public Backend create(int device) { return new CpuBackend(); }
}
