package dev.moe4j.cuda;

import org.bytedeco.cuda.global.cudart;
import org.bytedeco.javacpp.Pointer;

import java.util.ArrayDeque;
import java.util.HashMap;
import java.util.Map;

/**
 * A caching device allocator: freed blocks go to a free list keyed by their rounded size and are handed out
 * again, so a training step allocates with cudaMalloc only while warming up. All work is on the backend's one
 * stream, so a block freed by the host can be reused by later ops at once (stream order keeps it safe).
 * Sizes round up to 512 B below 1 MiB and to 2 MiB above, so a step's repeated shapes hit the same bucket.
 */
final class CudaAllocator {
    private static final long SMALL = 1L << 20, SMALL_ALIGN = 512, LARGE_ALIGN = 2L << 20;

    private final Map<Long, ArrayDeque<Long>> free = new HashMap<>();
    private final Runnable synchronize;
    private long held;      // bytes obtained from cudaMalloc and not returned (in use + cached)
    private long inUse;
    private long mallocCalls;

    CudaAllocator(Runnable synchronize) { this.synchronize = synchronize; }

    static long roundUp(long bytes) {
        long b = Math.max(bytes, 1);
        long a = b < SMALL ? SMALL_ALIGN : LARGE_ALIGN;
        return (b + a - 1) / a * a;
    }

    /** A block of at least {@code bytes} (its rounded size is {@link #roundUp}). */
    synchronized long alloc(long bytes) {
        long size = roundUp(bytes);
        ArrayDeque<Long> list = free.get(size);
        if (list != null && !list.isEmpty()) {
            inUse += size;
            return list.pop();
        }
        Pointer p = new Pointer();
        int rc = cudart.cudaMalloc(p, size);
        if (rc != 0) {
            cudart.cudaGetLastError();  // clear the sticky-free out-of-memory error before retrying
            synchronize.run();
            emptyCache();
            p = new Pointer();
            Cuda.check(cudart.cudaMalloc(p, size), "cudaMalloc(" + size + " bytes; " + held + " bytes held by moe4j)");
        }
        mallocCalls++;
        held += size;
        inUse += size;
        return p.address();
    }

    synchronized void free(long address, long bytes) {
        long size = roundUp(bytes);
        inUse -= size;
        free.computeIfAbsent(size, s -> new ArrayDeque<>()).push(address);
    }

    /** Returns every cached (free) block to the driver. */
    synchronized void emptyCache() {
        for (var e : free.entrySet()) {
            for (long a : e.getValue()) {
                Cuda.check(cudart.cudaFree(Cuda.ptr(a)), "cudaFree");
                held -= e.getKey();
            }
        }
        free.clear();
    }

    synchronized long heldBytes() { return held; }

    synchronized long inUseBytes() { return inUse; }

    synchronized long mallocCalls() { return mallocCalls; }
}
