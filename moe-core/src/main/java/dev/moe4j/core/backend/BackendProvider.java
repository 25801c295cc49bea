package dev.moe4j.core.backend;

/**
 * How a backend module makes itself known: list the implementation in
 * {@code META-INF/services/dev.moe4j.core.backend.BackendProvider}.
 */
public interface BackendProvider {
    /** The name users select it by ("cpu", "cuda"). */
    String name();

    /** Higher wins when the user names no backend (CUDA above CPU). */
    int rank();

    /**
     * Null when this backend can run here, else a sentence saying why not (missing library, no GPU, driver
     * too old) and what to install. Must not throw.
     */
    String unavailableReason();

    /** A backend on the given device index (ignored by the CPU). */
    Backend create(int device);
}
