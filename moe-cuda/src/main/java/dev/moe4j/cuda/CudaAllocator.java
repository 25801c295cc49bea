package dev.moe4j.cuda;

import org.bytedeco.cuda.global.cudart;
import org.bytedeco.javacpp.Pointer;

import java.util.ArrayDeque;
import java.util.HashMap;
import java.util.Map;
import java.util.TreeMap;

/**
 * A caching device allocator: freed blocks go to free lists keyed by their size and are handed out again, so a
 * training step allocates with cudaMalloc only while warming up. All work is on the backend's one stream, so a
 * block freed by the host can be reused by later ops at once (stream order keeps it safe).
 * Sizes round up to 512 B below 1 MiB and to 2 MiB above, so a step's repeated shapes hit the same size. A large
 * request may also take a cached block up to {@link #LARGE_SLACK} times its size: shapes that vary from step to
 * step (dropless MoE's padded capacity follows the routing) then reuse a few blocks instead of caching one per size.
 */
final class CudaAllocator {
    private static final long SMALL = 1L << 20, SMALL_ALIGN = 512, LARGE_ALIGN = 2L << 20;
    /** A large request takes a cached block of at most this many times its rounded size. */
    static final double LARGE_SLACK = 1.25;

    /** Where blocks come from: cudaMalloc / cudaFree on the GPU (a fake in the allocator's tests). */
    interface Device {
        /** A block of {@code bytes}, or 0 when the device is out of memory. */
        long malloc(long bytes);

        void free(long address);
    }

    private final Device device;
    private final TreeMap<Long, ArrayDeque<Long>> free = new TreeMap<>();   // size -> cached blocks (no empty lists)
    private final Map<Long, Long> sizeOf = new HashMap<>();                 // every block handed out -> its size
    private final Runnable synchronize;
    private long held;      // bytes obtained from the device and not returned (in use + cached)
    private long inUse;
    private long mallocCalls;

    CudaAllocator(Device device, Runnable synchronize) {
        this.device = device;
        this.synchronize = synchronize;
    }

    /** The allocator of a CUDA backend: cudaMalloc and cudaFree on the current device. */
    static CudaAllocator onCuda(Runnable synchronize) {
        return new CudaAllocator(new Device() {
            @Override
            public long malloc(long bytes) {
                Pointer p = new Pointer();
                if (cudart.cudaMalloc(p, bytes) == 0) return p.address();
                cudart.cudaGetLastError();   // clear the out-of-memory error before a retry
                return 0;
            }

            @Override
            public void free(long address) { Cuda.check(cudart.cudaFree(Cuda.ptr(address)), "cudaFree"); }
        }, synchronize);
    }

    static long roundUp(long bytes) {
        long b = Math.max(bytes, 1);
        long a = b < SMALL ? SMALL_ALIGN : LARGE_ALIGN;
        return (b + a - 1) / a * a;
    }

    /** A block of at least {@code bytes} (at least {@link #roundUp} of them). */
    synchronized long alloc(long bytes) {
        long size = roundUp(bytes);
        Long fit = free.containsKey(size) ? Long.valueOf(size) : null;
        if (fit == null && size >= SMALL) {
            Long above = free.higherKey(size);
            if (above != null && above <= size * LARGE_SLACK) fit = above;
        }
        if (fit != null) {
            ArrayDeque<Long> list = free.get(fit);
            long address = list.pop();
            if (list.isEmpty()) free.remove(fit);
            return handOut(address, fit);
        }
        long address = device.malloc(size);
        if (address == 0) {
            synchronize.run();
            emptyCache();
            address = device.malloc(size);
            if (address == 0) {
                throw new CudaException("cudaMalloc(" + size + " bytes) failed: out of device memory (" + held + " bytes held by moe4j, "
                        + inUse + " in use)");
            }
        }
        mallocCalls++;
        held += size;
        return handOut(address, size);
    }

    private long handOut(long address, long size) {
        sizeOf.put(address, size);
        inUse += size;
        return address;
    }

    synchronized void free(long address, long bytes) {
        Long size = sizeOf.remove(address);
        if (size == null) throw new IllegalStateException("free of a block this allocator did not hand out (address " + address + ", " + bytes + " bytes)");
        inUse -= size;
        if (deferring) deferred.add(new long[] {address, size});
        else cache(address, size);
    }

    private void cache(long address, long size) { free.computeIfAbsent(size, s -> new ArrayDeque<>()).push(address); }

    private boolean deferring;
    private final java.util.List<long[]> deferred = new java.util.ArrayList<>();   // {address, size}

    /**
     * From now until {@link #releaseDeferred}, freed blocks are kept from reuse: work on a second stream may still use
     * them (the cache otherwise assumes that one stream orders every use of a block before its next owner's).
     */
    synchronized void deferFrees() { deferring = true; }

    /** Makes the blocks freed since {@link #deferFrees} reusable (the streams have been joined). */
    synchronized void releaseDeferred() {
        deferring = false;
        for (long[] b : deferred) cache(b[0], b[1]);
        deferred.clear();
    }

    /** Returns every cached (free) block to the device. */
    synchronized void emptyCache() {
        for (var e : free.entrySet()) {
            for (long a : e.getValue()) {
                device.free(a);
                held -= e.getKey();
            }
        }
        free.clear();
    }

    synchronized long heldBytes() { return held; }

    synchronized long inUseBytes() { return inUse; }

    synchronized long mallocCalls() { return mallocCalls; }
}
