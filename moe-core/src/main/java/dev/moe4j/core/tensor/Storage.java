package dev.moe4j.core.tensor;

/**
 * A backend's block of memory (a Java array on the CPU, a device allocation on a GPU).
 * Tensors are typed views into a storage; only the owning tensor releases it.
 */
public interface Storage {
    /** Capacity in bytes. */
    long byteSize();

    /**
     * The device address of the first byte (a CUDA device pointer), for communication libraries such as
     * NCCL that work on raw device memory. Host-memory storages have none.
     */
    default long deviceAddress() {
        throw new UnsupportedOperationException(getClass().getSimpleName() + " has no device address");
    }

    /** Give the memory back (to the OS, or to a caching allocator). Called at most once. */
    void release();
}
