package dev.moe4j.cuda;

import dev.moe4j.core.tensor.Storage;

/**
 * A block of device memory from the backend's caching allocator, or (external) memory allocated elsewhere, such as a
 * peer's window mapped by CUDA IPC, which release leaves alone.
 */
final class CudaStorage implements Storage {
    final CudaBackend owner;
    private final long address;
    private final long bytes;
    private final boolean external;
    private boolean released;

    CudaStorage(CudaBackend owner, long address, long bytes) {
        this(owner, address, bytes, false);
    }

    CudaStorage(CudaBackend owner, long address, long bytes, boolean external) {
        this.owner = owner;
        this.address = address;
        this.bytes = bytes;
        this.external = external;
    }

    @Override public long byteSize() { return bytes; }

    @Override public long deviceAddress() {
        if (released) throw new IllegalStateException("device storage was released");
        return address;
    }

    @Override public void release() {
        if (released) return;
        released = true;
        if (!external) owner.allocator().free(address, bytes);
    }
}
