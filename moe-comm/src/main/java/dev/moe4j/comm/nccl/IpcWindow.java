package dev.moe4j.comm.nccl;

import dev.moe4j.core.comm.CommunicationException;
import dev.moe4j.core.comm.PeerWindow;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Shape;
import dev.moe4j.core.tensor.Storage;
import dev.moe4j.core.tensor.Tensor;
import org.bytedeco.cuda.cudart.CUstream_st;
import org.bytedeco.cuda.cudart.cudaIpcMemHandle_t;
import org.bytedeco.cuda.global.cudart;
import org.bytedeco.javacpp.Pointer;

import static dev.moe4j.comm.nccl.NcclCommunicator.cuda;
import static dev.moe4j.comm.nccl.NcclCommunicator.pointer;

/**
 * The {@link PeerWindow} of the ranks of one node: each rank's window is device memory of its own (cudaMalloc) that
 * the other ranks map by CUDA IPC, so that the backend's kernels store into it over NVLink. The handshake is stream
 * memory operations on 32-bit epoch flags at the head of each window (no kernel, no NCCL call): window r's arrive[p]
 * and free[p] are written by rank p. Exchange t on the backend's stream:
 * <pre>
 *   open:    free[me] = t in every peer's window (my window is ready for exchange t); wait my free[q] &gt;= t for every q
 *   publish: arrive[me] = t in every peer's window (fenced: after the stores queued before it)
 *   await:   wait my arrive[p] &gt;= t for every p
 * </pre>
 * The waits are watched as collectives are: a rank that dies or hangs makes the communicator's watchdog fail the
 * call by name, and the failure releases the waits still queued (their flags are set past any epoch).
 * Measured against NCCL's all-to-all by {@code moe-comm/src/test/native/p2p_exchange_probe.cu} (docs/benchmarks.md).
 */
final class IpcWindow implements PeerWindow {
    /** Flag area: arrive[p] at 4p, free[p] at FREE + 4p; the data from FLAG_BYTES (16-byte aligned). */
    private static final long FREE = 1024, FLAG_BYTES = 2048;
    static final int MAX_RANKS = 256;
    /** Written into a failed communicator's flags: past every epoch, so that queued waits pass. */
    private static final int RELEASED = 0x3fffffff;

    private final NcclCommunicator comm;
    private final int rank, size, device;
    private final long bytes;
    private final long mine;           // this rank's window (cudaMalloc)
    private final long[] windows;      // every rank's window as mapped here (this rank's own at [rank])
    private final Storage[] data;      // the data part of each, as the backend's storage
    private int epoch;
    private volatile boolean closed;   // read by the watchdog's release too

    private IpcWindow(NcclCommunicator comm, int rank, int size, int device, long bytes, long mine, long[] windows) {
        this.comm = comm;
        this.rank = rank;
        this.size = size;
        this.device = device;
        this.bytes = bytes;
        this.mine = mine;
        this.windows = windows;
        this.data = new Storage[size];
        for (int q = 0; q < size; q++) data[q] = comm.backend().wrapDeviceMemory(windows[q] + FLAG_BYTES, bytes);
    }

    /**
     * Collective: a window of {@code bytes} on every rank, or null on every rank where one of them cannot map the others'
     * (another host, GPUs without peer access, one GPU shared by two ranks).
     */
    static IpcWindow open(NcclCommunicator comm, int rank, int size, int device, long bytes) {
        if (size > MAX_RANKS) return null;
        cuda("cudaSetDevice", cudart.cudaSetDevice(device));
        Pointer p = new Pointer();
        // a failed allocation (or a failure in setting it up) still joins the all-gather below, so that every rank
        // refuses alike (else the others would wait there until the watchdog)
        int allocated = cudart.cudaMalloc(p, FLAG_BYTES + bytes);
        if (allocated != cudart.cudaSuccess) {   // the backend's cache may hold what the device lacks
            cudart.cudaGetLastError();
            comm.backend().releaseCachedMemory();
            cuda("cudaSetDevice", cudart.cudaSetDevice(device));
            allocated = cudart.cudaMalloc(p, FLAG_BYTES + bytes);
        }
        long mine = allocated == cudart.cudaSuccess ? p.address() : 0;
        String failed = mine != 0 ? null : "cudaMalloc: " + cudart.cudaGetErrorString(allocated).getString();   // this rank's, if any
        byte[] handle = new byte[64];
        if (mine != 0) {
            // the flags are 0 before any peer can see them; a failure here, too, joins the all-gather as "no window"
            cudaIpcMemHandle_t h = new cudaIpcMemHandle_t();
            int rc = cudart.cudaMemset(p, 0, FLAG_BYTES);
            String call = "cudaMemset(peer window flags)";
            if (rc == cudart.cudaSuccess) { rc = cudart.cudaDeviceSynchronize(); call = "cudaDeviceSynchronize"; }
            if (rc == cudart.cudaSuccess) { rc = cudart.cudaIpcGetMemHandle(h, p); call = "cudaIpcGetMemHandle"; }
            if (rc == cudart.cudaSuccess) {
                h.reserved().get(handle);
            } else {
                failed = call + ": " + cudart.cudaGetErrorString(rc).getString();
                cudart.cudaFree(p);
                mine = 0;
            }
        }
        if (mine == 0) cudart.cudaGetLastError();   // cleared (a sticky error stays: the all-gather then fails on this rank)
        byte[] host = hostId();
        // host id, IPC handle, this rank's size (every rank checks that all asked for the same), whether it has it
        byte[] both = java.nio.ByteBuffer.allocate(host.length + handle.length + 9).put(host).put(handle).putLong(bytes)
                .put((byte) (mine != 0 ? 1 : 0)).array();
        byte[][] all = comm.allGatherBytes(both);
        long[] sizes = new long[size];
        java.util.List<Integer> without = new java.util.ArrayList<>();
        for (int q = 0; q < size; q++) {
            java.nio.ByteBuffer r = java.nio.ByteBuffer.wrap(all[q], host.length + handle.length, 9);
            sizes[q] = r.getLong();
            if (r.get() == 0) without.add(q);
        }
        try {
            PeerWindow.checkSameSize(sizes, comm.describe());
            if (!without.isEmpty()) {
                throw new CommunicationException(comm.describe() + ": openWindow: rank(s) " + without + " could not set up a peer window of "
                        + bytes + " bytes (" + (failed != null ? failed : "failed there") + ")");
            }
        } catch (RuntimeException e) {
            if (mine != 0) cudart.cudaFree(pointer(mine));
            throw e;
        }
        long[] windows = new long[size];
        windows[rank] = mine;
        boolean ok = comm.backend().wrapDeviceMemory(mine + FLAG_BYTES, bytes) != null;   // the backend can use foreign memory
        for (int q = 0; q < size && ok; q++) ok = java.util.Arrays.equals(all[q], 0, host.length, host, 0, host.length);
        for (int q = 0; q < size && ok; q++) {
            if (q == rank) continue;
            cudaIpcMemHandle_t hq = new cudaIpcMemHandle_t();
            hq.reserved().put(java.util.Arrays.copyOfRange(all[q], host.length, host.length + handle.length));
            Pointer at = new Pointer();
            int rc = cudart.cudaIpcOpenMemHandle(at, hq, cudart.cudaIpcMemLazyEnablePeerAccess);
            if (rc != cudart.cudaSuccess) {
                cudart.cudaGetLastError();   // clear it: the collectives go on
                ok = false;
            } else {
                windows[q] = at.address();
            }
        }
        byte[][] oks = comm.allGatherBytes(new byte[] {(byte) (ok ? 1 : 0)});
        boolean every = true;
        for (byte[] o : oks) every &= o[0] == 1;
        if (!every) {
            for (int q = 0; q < size; q++) if (q != rank && windows[q] != 0) cudart.cudaIpcCloseMemHandle(pointer(windows[q]));
            cudart.cudaFree(pointer(mine));
            return null;
        }
        return new IpcWindow(comm, rank, size, device, bytes, mine, windows);
    }

    @Override public long bytes() { return bytes; }

    @Override
    public Tensor tensor(int q, DType dtype, int rows, int cols) {
        if (closed) throw new IllegalStateException("peer window of " + comm.describe() + " was closed");
        if (q < 0 || q >= size) throw new IllegalArgumentException("peer window: rank " + q + " of " + size);
        PeerWindow.checkFits(bytes, dtype, rows, cols);
        return Tensor.borrowing(comm.backend(), data[q], dtype, Shape.of(rows, cols));
    }

    @Override
    public void open() {
        int t = ++epoch;
        comm.launchStreamOps("peer window open", stream -> {
            for (int d = 1; d < size; d++) {
                int q = (rank + d) % size;
                check("cuStreamWriteValue32(free)", cudart.cuStreamWriteValue32(stream, windows[q] + FREE + 4L * rank, t, cudart.CU_STREAM_WRITE_VALUE_DEFAULT));
            }
            for (int d = 1; d < size; d++) {
                int q = (rank + d) % size;
                check("cuStreamWaitValue32(free)", cudart.cuStreamWaitValue32(stream, mine + FREE + 4L * q, t, cudart.CU_STREAM_WAIT_VALUE_GEQ));
            }
        });
    }

    @Override
    public void publish() {
        int t = epoch;
        comm.launchStreamOps("peer window publish", stream -> {
            for (int d = 1; d < size; d++) {
                int q = (rank + d) % size;
                check("cuStreamWriteValue32(arrive)", cudart.cuStreamWriteValue32(stream, windows[q] + 4L * rank, t, cudart.CU_STREAM_WRITE_VALUE_DEFAULT));
            }
        });
    }

    @Override
    public void await() {
        int t = epoch;
        comm.launchStreamOps("peer window await", stream -> {
            for (int d = 1; d < size; d++) {
                int p = (rank - d + size) % size;
                check("cuStreamWaitValue32(arrive)", cudart.cuStreamWaitValue32(stream, mine + 4L * p, t, cudart.CU_STREAM_WAIT_VALUE_GEQ));
            }
        });
    }

    /**
     * After a failure: sets this rank's flags past every epoch on a stream of its own, so that waits queued on them pass
     * (a close waiting for the device among them). Locked against close's freeing of the window.
     */
    synchronized void release() {
        if (closed) return;
        cudart.cudaSetDevice(device);
        CUstream_st s = new CUstream_st();
        if (cudart.cudaStreamCreateWithFlags(s, cudart.cudaStreamNonBlocking) != cudart.cudaSuccess) return;
        cudart.cuMemsetD32Async(mine, RELEASED, FLAG_BYTES / 4, s);
        cudart.cudaStreamSynchronize(s);
        cudart.cudaStreamDestroy(s);
    }

    private void check(String call, int rc) {
        if (rc != cudart.CUDA_SUCCESS) throw new CommunicationException(comm.describe() + ": " + call + " failed (CUresult " + rc + ")");
    }

    /** 16 bytes naming this host (its name's SHA-256, truncated): equal on the ranks of one node. */
    private static byte[] hostId() {
        String name;
        try {
            name = java.net.InetAddress.getLocalHost().getHostName();
        } catch (java.net.UnknownHostException e) {
            name = System.getenv().getOrDefault("HOSTNAME", "unknown");
        }
        try {
            byte[] d = java.security.MessageDigest.getInstance("SHA-256").digest(name.getBytes(java.nio.charset.StandardCharsets.UTF_8));
            return java.util.Arrays.copyOf(d, 16);
        } catch (java.security.NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    /**
     * After this rank's queued work (the peers' stores into this window ended with its last await): the whole device's,
     * since the window's exchanges ran on whichever stream was the backend's at the time (its main one, or a side
     * stream inside Backend.beside). Windows close rarely (grown, or at the end). The window stays registered with the
     * communicator while the device drains, so that a peer that never publishes (the watchdog fails the communicator)
     * has this window's queued waits released instead of hanging the sync.
     */
    @Override
    public void close() {
        if (closed) return;
        cudart.cudaSetDevice(device);
        cudart.cudaDeviceSynchronize();
        synchronized (this) {
            if (closed) return;
            closed = true;
            comm.forget(this);
            for (int q = 0; q < size; q++) if (q != rank && windows[q] != 0) cudart.cudaIpcCloseMemHandle(pointer(windows[q]));
            cudart.cudaFree(pointer(mine));
        }
    }
}
