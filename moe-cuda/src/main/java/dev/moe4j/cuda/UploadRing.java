package dev.moe4j.cuda;

import org.bytedeco.cuda.cudart.CUevent_st;
import org.bytedeco.cuda.cudart.CUstream_st;
import org.bytedeco.cuda.global.cudart;
import org.bytedeco.javacpp.Pointer;

import java.util.ArrayDeque;
import java.util.Iterator;

/**
 * Pinned host memory through which host-to-device copies are queued on the stream without the host waiting for
 * the stream: the bytes are copied here, the device copy is queued, and a region is written again only after the
 * copy that read it has run (an event per copy). A training step's uploads (token ids, expert-parallel routing
 * indices) then no longer drain the stream, which would leave the GPU idle while the host issues the next kernels.
 * Uploads larger than the ring return false (the caller copies synchronously). One thread at a time, as the backend.
 */
final class UploadRing implements AutoCloseable {
    private final long capacity;
    private final Pointer base = new Pointer();
    private long head;
    private final ArrayDeque<Region> pending = new ArrayDeque<>();   // in the order queued
    private final ArrayDeque<CUevent_st> spare = new ArrayDeque<>();

    private record Region(long start, long end, CUevent_st done) {}

    UploadRing(long capacity) {
        this.capacity = capacity;
        Cuda.check(cudart.cudaMallocHost(base, capacity), "cudaMallocHost(" + capacity + " bytes, upload ring)");
    }

    /** Queues a copy of {@code bytes} bytes at {@code host} to device address {@code device} on {@code stream}; false if too large. */
    boolean upload(long device, Pointer host, long bytes, CUstream_st stream) {
        if (bytes > capacity) return false;
        if (head + bytes > capacity) head = 0;
        long start = head, end = head + bytes;
        // wait only for earlier copies that read this region (long done in a steady loop)
        for (Iterator<Region> it = pending.iterator(); it.hasNext(); ) {
            Region r = it.next();
            boolean overlaps = r.start < end && start < r.end;
            if (overlaps || cudart.cudaEventQuery(r.done) == 0) {
                if (overlaps) Cuda.check(cudart.cudaEventSynchronize(r.done), "cudaEventSynchronize(upload ring)");
                spare.push(r.done);
                it.remove();
            }
        }
        Pointer at = Cuda.ptr(base.address() + start);   // a raw address in the pinned block
        Pointer.memcpy(at, host, bytes);
        Cuda.check(cudart.cudaMemcpyAsync(Cuda.ptr(device), at, bytes, cudart.cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync(host to device)");
        CUevent_st done = spare.isEmpty() ? newEvent() : spare.pop();
        Cuda.check(cudart.cudaEventRecord(done, stream), "cudaEventRecord(upload ring)");
        pending.add(new Region(start, end, done));
        head = end;
        return true;
    }

    private static CUevent_st newEvent() {
        CUevent_st e = new CUevent_st();
        Cuda.check(cudart.cudaEventCreateWithFlags(e, cudart.cudaEventDisableTiming), "cudaEventCreate(upload ring)");
        return e;
    }

    /** Frees the ring after the copies queued from it have run. */
    @Override
    public void close() {
        for (Region r : pending) {
            cudart.cudaEventSynchronize(r.done);
            cudart.cudaEventDestroy(r.done);
        }
        pending.clear();
        for (CUevent_st e : spare) cudart.cudaEventDestroy(e);
        spare.clear();
        cudart.cudaFreeHost(base);
    }
}
