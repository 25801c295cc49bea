package dev.moe4j.comm.nccl;

import dev.moe4j.comm.rendezvous.DistributedEnv;
import dev.moe4j.comm.rendezvous.Rendezvous;
import dev.moe4j.comm.rendezvous.TcpStore;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.comm.CommChecks;
import dev.moe4j.core.comm.CommOptions;
import dev.moe4j.core.comm.CommTimeoutException;
import dev.moe4j.core.comm.CommWork;
import dev.moe4j.core.comm.CommunicationException;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.comm.PeerWindow;
import dev.moe4j.core.comm.ReduceOp;
import dev.moe4j.core.comm.RowBlocks;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import org.bytedeco.cuda.cudart.CUevent_st;
import org.bytedeco.cuda.cudart.CUstream_st;
import org.bytedeco.cuda.global.cudart;
import org.bytedeco.cuda.global.nccl;
import org.bytedeco.cuda.nccl.ncclComm;
import org.bytedeco.cuda.nccl.ncclConfig_t;
import org.bytedeco.cuda.nccl.ncclUniqueId;
import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.javacpp.PointerPointer;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.ConcurrentLinkedDeque;
import java.util.concurrent.locks.LockSupport;

/**
 * The NCCL communicator: one process per GPU, collectives queued on the backend's stream on device memory
 * ({@code Storage.deviceAddress()}), so GPU buffers never leave the device.
 *
 * <p>Creation is non-blocking (ncclCommInitRankConfig with blocking = 0, polled with ncclCommGetAsyncError) so
 * that it can time out; so are splits. Collectives go to a blocking twin split off that communicator, because a
 * non-blocking NCCL 2.28 communicator starts a thread for every call (some 60 us each). A watchdog thread records a CUDA event after every collective and polls it together with
 * ncclCommGetAsyncError: a collective still pending after the timeout, or an asynchronous NCCL error (a peer that
 * died), aborts the communicator (ncclCommAbort, which also releases the GPU kernels waiting for the peer) and
 * makes every later call throw. The ranks missing from the collective are named from the progress every rank
 * publishes to the rendezvous store (the last collective it queued).
 *
 * <p>Variable all-to-all is ncclGroupStart + ncclSend/ncclRecv per peer + ncclGroupEnd; empty splits send
 * nothing. The block exchange ({@link #exchangeRows}) is the same with one send/recv per block.
 */
public final class NcclCommunicator implements Communicator {
    private static final Logger log = LoggerFactory.getLogger(NcclCommunicator.class);
    private static int worlds;
    private static final int NATIVE_ALLTOALL = 22800;  // the first NCCL with ncclAlltoAll
    private static final int SPIN_POLLS = 20_000;   // about 2 ms of busy polling before waitReady parks       // communicators made from the environment in this process (keys the unique id)

    private final Backend backend;
    private final int device;
    private final ncclComm comm;      // blocking: every collective (no NCCL thread per call)
    private final ncclComm control;   // non-blocking: init and splits, which can then time out
    private final int rank, size;
    private final int[] worldRanks;   // world rank of each member, in member order
    private final String tag;         // store key prefix of this communicator
    private final TcpStore store;     // may be null: then missing ranks cannot be named
    private final CommOptions opts;
    private final CUstream_st stream;
    private final Watchdog watchdog;
    private volatile CommunicationException failure;
    private volatile boolean closed;
    private volatile boolean splitting;   // a split is polling the non-blocking communicator
    private long seq;
    private Tensor barrierBuf;
    private CUstream_st side;   // created by the first allReduceAsync
    private CUevent_st fork;
    private final java.util.Set<IpcWindow> windows = java.util.concurrent.ConcurrentHashMap.newKeySet();   // open peer windows

    private NcclCommunicator(Backend backend, ncclComm control, ncclComm comm, int rank, int size, int[] worldRanks, String tag, TcpStore store, CommOptions opts) {
        this.backend = backend;
        this.device = backend.deviceIndex();
        this.control = control;
        this.comm = comm;
        this.rank = rank;
        this.size = size;
        this.worldRanks = worldRanks;
        this.tag = tag;
        this.store = store;
        this.opts = opts;
        this.stream = new CUstream_st(pointer(backend.nativeStream()));
        this.watchdog = new Watchdog();
        Thread t = new Thread(watchdog, "moe4j-nccl-watchdog-" + tag + "-r" + rank);
        t.setDaemon(true);
        watchdog.thread = t;
        t.start();
    }

    // ------------------------------------------------------------------ creation

    /**
     * The world communicator of a job launched by torchrun, srun, mpirun or our launcher ({@link DistributedEnv}):
     * rank 0 makes the NCCL unique id and passes it through the rendezvous store on MASTER_ADDR. The backend
     * must already be on this process's GPU (usually device LOCAL_RANK).
     */
    public static NcclCommunicator fromEnvironment(Backend backend, CommOptions opts) {
        return create(backend, DistributedEnv.fromEnvironment(), opts);
    }

    public static NcclCommunicator create(Backend backend, DistributedEnv env, CommOptions opts) {
        NcclLibrary.load();
        CommOptions o = opts == null ? CommOptions.defaults() : opts;
        TcpStore store = Rendezvous.store(env, o.timeout());
        String tag;
        synchronized (NcclCommunicator.class) {
            tag = "moe4j/nccl/w" + worlds++;
        }
        byte[] id = sharedUniqueId(store, tag + "/uid", env.rank());
        int[] world = new int[env.worldSize()];
        for (int i = 0; i < world.length; i++) world[i] = i;
        return create(backend, env.rank(), env.worldSize(), id, world, tag, store, o);
    }

    /** An NCCL unique id made by rank 0 and passed to the other ranks through the store under key (its bytes). */
    static byte[] sharedUniqueId(TcpStore store, String key, int rank) {
        if (rank != 0) return store.get(key);
        ncclUniqueId u = new ncclUniqueId();
        check("ncclGetUniqueId", nccl.ncclGetUniqueId(u), null);
        byte[] id = new byte[nccl.NCCL_UNIQUE_ID_BYTES];
        u.internal().get(id);
        store.set(key, id);
        return id;
    }

    /**
     * A communicator from a unique id obtained elsewhere (all ranks pass the same id bytes). store may be null
     * (missing ranks are then not named on a timeout).
     */
    public static NcclCommunicator create(Backend backend, int rank, int size, byte[] uniqueId, int[] worldRanks, String tag,
                                          TcpStore store, CommOptions opts) {
        NcclLibrary.load();
        if (backend == null) throw new IllegalArgumentException("NcclCommunicator: backend is null");
        if (size < 1 || rank < 0 || rank >= size) throw new IllegalArgumentException("NcclCommunicator: rank must be in [0, " + size + "), got " + rank);
        if (uniqueId == null || uniqueId.length != nccl.NCCL_UNIQUE_ID_BYTES) {
            throw new IllegalArgumentException("NcclCommunicator: uniqueId must hold " + nccl.NCCL_UNIQUE_ID_BYTES + " bytes");
        }
        requireDeviceMemory(backend);
        CommOptions o = opts == null ? CommOptions.defaults() : opts;
        cuda("cudaSetDevice", cudart.cudaSetDevice(backend.deviceIndex()));
        if (store != null) store.set(tag + "/arrived/" + rank, new byte[] {1});
        ncclUniqueId u = new ncclUniqueId();
        u.internal().put(uniqueId);
        HandleSlot slot = new HandleSlot();
        long deadline = System.nanoTime() + o.timeout().toNanos();
        int rc = nccl.ncclCommInitRankConfig(slot.pp, size, u, rank, config());
        ncclComm c = slot.handle();   // written before the call returns; NCCL writes it again when init completes
        if (c == null) check("ncclCommInitRankConfig", rc == nccl.ncclSuccess || rc == nccl.ncclInProgress ? nccl.ncclInternalError : rc, null);
        if (!waitReady(c, "ncclCommInitRankConfig", rc, deadline)) {
            nccl.ncclCommAbort(c);
            slot.abandon();
            int[] missing = store == null ? new int[0] : notArrived(store, tag, size, worldRanks);
            throw new CommTimeoutException("NCCL communicator " + tag + " (rank " + rank + " of " + size + "): init did not complete within "
                    + o.timeoutMillis() + " ms; world rank(s) " + Arrays.toString(missing) + " never arrived at the rendezvous",
                    "init", missing);
        }
        slot.close();
        ncclComm data = blockingTwin(c, rank, "init", deadline);
        if (data == null) {
            nccl.ncclCommAbort(c);
            throw new CommTimeoutException("NCCL communicator " + tag + " (rank " + rank + " of " + size + "): its blocking twin did not complete within "
                    + o.timeoutMillis() + " ms (a rank left after init)", "init", new int[0]);
        }
        return new NcclCommunicator(backend, c, data, rank, size, worldRanks.clone(), tag, store, o);
    }

    private static int[] notArrived(TcpStore store, String tag, int size, int[] worldRanks) {
        List<Integer> m = new ArrayList<>();
        for (int r = 0; r < size; r++) if (!store.check(tag + "/arrived/" + r)) m.add(worldRanks[r]);
        return m.stream().mapToInt(Integer::intValue).toArray();
    }

    private static void requireDeviceMemory(Backend backend) {
        try (Tensor t = backend.zeros(DType.I32, 1)) {
            t.storage().deviceAddress();
        } catch (UnsupportedOperationException e) {
            throw new IllegalArgumentException("NcclCommunicator needs a GPU backend whose tensors have device addresses; backend "
                    + backend.name() + " has none (" + e.getMessage() + "). For CPU ranks use dev.moe4j.comm.InProcessWorld.");
        }
    }

    /**
     * The blocking communicator for collectives, split off the non-blocking one c (same members, same ranks).
     * Why two: in non-blocking mode NCCL 2.28 starts a thread for every group end, some 60 us of host time per
     * collective; blocking calls launch in the caller's thread. The split itself runs as a non-blocking job of c,
     * so it can time out. Null on timeout (the caller aborts c).
     */
    private static ncclComm blockingTwin(ncclComm c, int rank, String what, long deadline) {
        HandleSlot slot = new HandleSlot();
        int rc = nccl.ncclCommSplit(c, 0, rank, slot.pp, config(true));
        if (!waitReady(c, "ncclCommSplit (blocking twin, " + what + ")", rc, deadline)) {
            slot.abandon();
            return null;
        }
        ncclComm d = slot.handle();
        slot.close();
        if (d == null) throw new CommunicationException("ncclCommSplit (blocking twin, " + what + ") completed without a communicator");
        return d;
    }

    private static ncclConfig_t config() {
        return config(false);
    }

    /** A config, non-blocking unless asked: every other field "undefined" (NCCL's defaults), as NCCL_CONFIG_INITIALIZER does. */
    private static ncclConfig_t config(boolean blocking) {
        return config(blocking, Integer.MIN_VALUE);
    }

    /** As {@link #config(boolean)} with a CTA policy ({@code nccl.NCCL_CTA_POLICY_*}; Integer.MIN_VALUE: NCCL's default). */
    static ncclConfig_t config(boolean blocking, int ctaPolicy) {
        int undef = Integer.MIN_VALUE;   // NCCL_CONFIG_UNDEF_INT
        int[] v = new int[1];
        nccl.ncclGetVersion(v);
        ncclConfig_t c = new ncclConfig_t();
        c.size(Pointer.sizeof(ncclConfig_t.class)).magic(0xcafebeef).version(Math.min(v[0], nccl.NCCL_VERSION_CODE));
        c.blocking(blocking ? 1 : 0).cgaClusterSize(undef).minCTAs(undef).maxCTAs(undef).netName((BytePointer) null).splitShare(undef)
                .trafficClass(undef).commName((BytePointer) null).collnetEnable(undef).CTAPolicy(ctaPolicy).shrinkShare(undef)
                .nvlsCTAs(undef).nChannelsPerNetPeer(undef).nvlinkCentricSched(undef).graphUsageMode(undef).numRmaCtx(undef);
        return c;
    }

    /**
     * Completes a non-blocking call: rc ncclInProgress means poll ncclCommGetAsyncError until it is not. Returns
     * false on timeout (the caller aborts), throws on an NCCL error.
     */
    private static boolean waitReady(ncclComm c, String call, int rc, long deadline) {
        // Poll even after ncclSuccess: a split of a non-blocking parent has been seen to return ncclSuccess with
        // its job still running (the parent stayed "in progress" and the child's handle was not yet written).
        if (rc != nccl.ncclSuccess && rc != nccl.ncclInProgress) check(call, rc, c);
        int[] st = new int[1];
        int spins = 0;
        while (true) {
            int q = nccl.ncclCommGetAsyncError(c, st);
            if (q != nccl.ncclSuccess) check("ncclCommGetAsyncError after " + call, q, c);
            if (st[0] == nccl.ncclSuccess) return true;
            if (st[0] != nccl.ncclInProgress) check(call, st[0], c);
            long now = System.nanoTime();
            if (now > deadline) return false;
            // A non-blocking group end often completes within microseconds on NCCL's thread: spin first, since a
            // park costs some 60 us of latency on every collective (it showed as a 2x slower small all-to-all).
            if (spins++ < SPIN_POLLS) Thread.onSpinWait();
            else LockSupport.parkNanos(20_000);
        }
    }

    /**
     * Where NCCL puts a new communicator's handle. A non-blocking init or split writes {@code *newcomm} from
     * NCCL's own thread when it completes, so the slot must be native memory that outlives the call: JavaCPP's
     * by-pointer-pointer argument is a temporary on the JNI call's stack, and the late write would land in a dead
     * frame (for a split, the handle would also never be seen).
     */
    static final class HandleSlot implements AutoCloseable {
        final PointerPointer<ncclComm> pp = new PointerPointer<>(1L);

        HandleSlot() {
            pp.put(0L, (Pointer) null);
        }

        /** The handle NCCL wrote, or null. */
        ncclComm handle() {
            long a = pp.get(0L) == null ? 0L : pp.get(0L).address();
            return a == 0L ? null : new ncclComm(pointer(a));
        }

        @Override
        public void close() {
            pp.close();
        }

        /**
         * After a timeout: NCCL's job may still write the handle when it finally ends (or is aborted), so the native
         * slot is kept for the life of the process (8 bytes per failed init or split) instead of being freed.
         */
        void abandon() {
            synchronized (ABANDONED) {
                ABANDONED.add(this);
            }
        }
    }

    private static final List<HandleSlot> ABANDONED = new ArrayList<>();

    static void check(String call, int rc, ncclComm c) {
        if (rc == nccl.ncclSuccess) return;
        String last = "";
        try {
            BytePointer p = nccl.ncclGetLastError(c);
            if (p != null && !p.isNull()) last = p.getString();
        } catch (RuntimeException ignored) { }
        throw new CommunicationException(call + " failed: " + nccl.ncclGetErrorString(rc).getString() + " (code " + rc + ")"
                + (last.isBlank() ? "" : ": " + last));
    }

    static void cuda(String call, int rc) {
        if (rc != cudart.cudaSuccess) throw new CommunicationException(call + " failed: " + cudart.cudaGetErrorString(rc).getString() + " (code " + rc + ")");
    }

    /** A JavaCPP pointer to a raw (device) address. */
    static Pointer pointer(long address) {
        return new RawPointer(address);
    }

    /**
     * A named subclass on purpose: in an anonymous {@code new Pointer() {{ address = x; }}} the inherited field
     * {@code address} shadows a captured variable of the same name, which silently made every pointer NULL.
     */
    private static final class RawPointer extends Pointer {
        RawPointer(long at) { this.address = at; }
    }

    // ------------------------------------------------------------------ accessors

    @Override public int rank() { return rank; }

    @Override public int size() { return size; }

    @Override public Backend backend() { return backend; }

    @Override
    public String describe() { return "nccl " + tag + " (rank " + rank + " of " + size + ", world rank " + worldRanks[rank] + ", cuda:" + device + ")"; }

    private void usable(String op) {
        if (closed) throw new IllegalStateException(op + ": " + describe() + " is closed");
        CommunicationException f = failure;
        if (f == null) return;
        String msg = op + ": " + describe() + " was aborted: " + f.getMessage();
        if (f instanceof CommTimeoutException te) {
            CommTimeoutException e = new CommTimeoutException(msg, te.collective(), te.missingRanks());
            e.initCause(f);
            throw e;
        }
        throw new CommunicationException(msg, f);
    }

    private static long addr(Tensor t) { return t.storage().deviceAddress() + t.byteOffset(); }

    private static Pointer ptr(Tensor t) { return pointer(addr(t)); }

    private static Pointer ptr(Tensor t, long elementOffset) { return pointer(addr(t) + elementOffset * t.dtype().bytes()); }

    private static int type(Tensor t) {
        return switch (t.dtype()) {
            case F32 -> nccl.ncclFloat32;
            case BF16 -> nccl.ncclBfloat16;
            case I32 -> nccl.ncclInt32;
            case F64 -> nccl.ncclFloat64;
        };
    }

    private static int op(ReduceOp op) {
        return switch (op) {
            case SUM -> nccl.ncclSum;
            case MAX -> nccl.ncclMax;
            case MIN -> nccl.ncclMin;
        };
    }

    /** Enqueues one collective (the body returns NCCL's code) on the blocking communicator and starts watching it. */
    private long launch(String op, java.util.function.IntSupplier body) {
        return launch(op, stream, body);
    }

    /** As {@link #launch(String, java.util.function.IntSupplier)}, the collective queued on {@code on}. */
    private synchronized long launch(String op, CUstream_st on, java.util.function.IntSupplier body) {
        usable(op);
        long s = seq++;
        String label = op + " #" + s;
        cuda("cudaSetDevice", cudart.cudaSetDevice(device));
        watchdog.enqueueing(s, label);
        int rc = body.getAsInt();   // blocking communicator: the code is final (the first call to a peer may wait to connect)
        watchdog.enqueued();
        usable(op);                 // the watchdog may have aborted a call that could not connect
        check("nccl " + label, rc, comm);
        watchdog.track(s, label, on);
        return s;
    }

    /**
     * The all-reduce on this communicator's side stream, after everything queued so far on the backend's stream;
     * {@link CommWork#await()} makes the backend's stream wait for it. Gradient all-reduces run this way beside the
     * rest of the backward.
     */
    @Override
    public synchronized CommWork allReduceAsync(Tensor t, ReduceOp op) {
        CommChecks.allReduce(this, t, op);
        return onSide("allReduce (async)", on -> launch("allReduce (async)", on,
                () -> nccl.ncclAllReduce(ptr(t), ptr(t), t.numel(), type(t), op(op), comm, on)));
    }

    /** {@link #allToAllV} on the side stream, as {@link #allReduceAsync}. */
    @Override
    public synchronized CommWork allToAllVAsync(Tensor send, int[] sendRows, Tensor recv, int[] recvRows) {
        CommChecks.allToAllV(this, send, sendRows, recv, recvRows);
        int[] sr = sendRows.clone(), rr = recvRows.clone();
        return onSide("allToAllV (async)", on -> sendRecvAll("allToAllV (async)", send, sr, recv, rr, on));
    }

    /**
     * Queues {@code body} on the side stream after everything queued so far on the backend's stream; the returned
     * work makes the backend's stream wait for it.
     */
    private CommWork onSide(String op, java.util.function.Consumer<CUstream_st> body) {
        usable(op);
        cuda("cudaSetDevice", cudart.cudaSetDevice(device));
        if (side == null) {
            side = new CUstream_st();
            cuda("cudaStreamCreate(side)", cudart.cudaStreamCreateWithFlags(side, cudart.cudaStreamNonBlocking));
            fork = new CUevent_st();
            cuda("cudaEventCreate(fork)", cudart.cudaEventCreateWithFlags(fork, cudart.cudaEventDisableTiming));
        }
        cuda("cudaEventRecord(fork)", cudart.cudaEventRecord(fork, stream));
        cuda("cudaStreamWaitEvent(side)", cudart.cudaStreamWaitEvent(side, fork, 0));
        body.accept(side);
        CUevent_st done = new CUevent_st();
        cuda("cudaEventCreate(done)", cudart.cudaEventCreateWithFlags(done, cudart.cudaEventDisableTiming));
        cuda("cudaEventRecord(done)", cudart.cudaEventRecord(done, side));
        return () -> {
            synchronized (NcclCommunicator.this) {
                cuda("cudaSetDevice", cudart.cudaSetDevice(device));
                cuda("cudaStreamWaitEvent(join)", cudart.cudaStreamWaitEvent(stream, done, 0));
                cudart.cudaEventDestroy(done);   // released once recorded work completes; the wait is already queued
            }
        };
    }

    // ------------------------------------------------------------------ collectives

    @Override
    public void allToAll(Tensor send, Tensor recv) {
        int n = CommChecks.allToAll(this, send, recv);
        if (NcclLibrary.load() >= NATIVE_ALLTOALL) {
            // NCCL's own all-to-all (2.28+), as torch.distributed uses for equal splits.
            long count = (long) n * send.cols();
            launch("allToAll", () -> nccl.ncclAlltoAll(ptr(send), ptr(recv), count, type(send), comm, stream));
            return;
        }
        int[] splits = new int[size];
        Arrays.fill(splits, n);
        sendRecvAll("allToAll", send, splits, recv, splits);
    }

    @Override
    public void allToAllV(Tensor send, int[] sendRows, Tensor recv, int[] recvRows) {
        CommChecks.allToAllV(this, send, sendRows, recv, recvRows);
        sendRecvAll("allToAllV", send, sendRows.clone(), recv, recvRows.clone());
    }

    private void sendRecvAll(String op, Tensor send, int[] sendRows, Tensor recv, int[] recvRows) {
        sendRecvAll(op, send, sendRows, recv, recvRows, stream);
    }

    private void sendRecvAll(String op, Tensor send, int[] sendRows, Tensor recv, int[] recvRows, CUstream_st on) {
        long cols = send.cols();
        int[] so = CommChecks.offsets(sendRows), ro = CommChecks.offsets(recvRows);
        int dt = type(send);
        launch(op, on, () -> {
            int rc = nccl.ncclGroupStart();
            if (rc != nccl.ncclSuccess) return rc;
            for (int p = 0; p < size; p++) {
                if (sendRows[p] > 0) {
                    rc = nccl.ncclSend(ptr(send, so[p] * cols), sendRows[p] * cols, dt, p, comm, on);
                    if (rc != nccl.ncclSuccess && rc != nccl.ncclInProgress) { nccl.ncclGroupEnd(); return rc; }
                }
                if (recvRows[p] > 0) {
                    rc = nccl.ncclRecv(ptr(recv, ro[p] * cols), recvRows[p] * cols, dt, p, comm, on);
                    if (rc != nccl.ncclSuccess && rc != nccl.ncclInProgress) { nccl.ncclGroupEnd(); return rc; }
                }
            }
            return nccl.ncclGroupEnd();
        });
    }

    @Override
    public synchronized void exchangeRows(Tensor send, RowBlocks sendBlocks, Tensor recv, RowBlocks recvBlocks) {
        CommChecks.exchangeRows("exchangeRows", this, send, sendBlocks, recv, recvBlocks);
        sendRecvBlocks("exchangeRows", send, sendBlocks, recv, recvBlocks, stream);
    }

    /** {@link #exchangeRows} on the side stream, as {@link #allToAllVAsync}. */
    @Override
    public synchronized CommWork exchangeRowsAsync(Tensor send, RowBlocks sendBlocks, Tensor recv, RowBlocks recvBlocks) {
        String op = "exchangeRows (async)";
        CommChecks.exchangeRows(op, this, send, sendBlocks, recv, recvBlocks);
        return onSide(op, on -> sendRecvBlocks(op, send, sendBlocks, recv, recvBlocks, on));
    }

    /**
     * One group of ncclSend/ncclRecv, one per non-empty block with another rank (NCCL matches a peer's sends and
     * receives in order, which is the pairing rule), then the blocks to this rank itself as device copies on the
     * same stream (consecutive ones merged).
     */
    private void sendRecvBlocks(String op, Tensor send, RowBlocks sb, Tensor recv, RowBlocks rb, CUstream_st on) {
        long cols = send.cols();
        int dt = type(send);
        launch(op, on, () -> {
            int rc = nccl.ncclGroupStart();
            if (rc != nccl.ncclSuccess) return rc;
            for (int i = 0; i < sb.count(); i++) {
                if (sb.rows(i) == 0 || sb.peer(i) == rank) continue;
                rc = nccl.ncclSend(ptr(send, sb.start(i) * cols), sb.rows(i) * cols, dt, sb.peer(i), comm, on);
                if (rc != nccl.ncclSuccess && rc != nccl.ncclInProgress) { nccl.ncclGroupEnd(); return rc; }
            }
            for (int i = 0; i < rb.count(); i++) {
                if (rb.rows(i) == 0 || rb.peer(i) == rank) continue;
                rc = nccl.ncclRecv(ptr(recv, rb.start(i) * cols), rb.rows(i) * cols, dt, rb.peer(i), comm, on);
                if (rc != nccl.ncclSuccess && rc != nccl.ncclInProgress) { nccl.ncclGroupEnd(); return rc; }
            }
            return nccl.ncclGroupEnd();
        });
        int[] from = sb.nonEmptyWith(rank), to = rb.nonEmptyWith(rank);   // paired one to one (checked)
        long rowBytes = cols * send.dtype().bytes();
        for (int k = 0; k < from.length; ) {
            int src = sb.start(from[k]), dst = rb.start(to[k]), rows = sb.rows(from[k]);
            for (k++; k < from.length && sb.start(from[k]) == src + rows && rb.start(to[k]) == dst + rows; k++) rows += sb.rows(from[k]);
            cuda("cudaMemcpyAsync (" + op + ", self)", cudart.cudaMemcpyAsync(pointer(addr(recv) + dst * rowBytes),
                    pointer(addr(send) + src * rowBytes), rows * rowBytes, cudart.cudaMemcpyDeviceToDevice, on));
        }
    }

    @Override
    public void allReduce(Tensor t, ReduceOp op) {
        CommChecks.allReduce(this, t, op);
        launch("allReduce", () -> nccl.ncclAllReduce(ptr(t), ptr(t), t.numel(), type(t), op(op), comm, stream));
    }

    @Override
    public void allGather(Tensor send, Tensor recv) {
        CommChecks.allGather(this, send, recv);
        launch("allGather", () -> nccl.ncclAllGather(ptr(send), ptr(recv), send.numel(), type(send), comm, stream));
    }

    @Override
    public void reduceScatter(Tensor send, Tensor recv, ReduceOp op) {
        CommChecks.reduceScatter(this, send, recv, op);
        launch("reduceScatter", () -> nccl.ncclReduceScatter(ptr(send), ptr(recv), recv.numel(), type(send), op(op), comm, stream));
    }

    @Override
    public void broadcast(Tensor t, int root) {
        CommChecks.broadcast(this, t, root);
        launch("broadcast", () -> nccl.ncclBroadcast(ptr(t), ptr(t), t.numel(), type(t), root, comm, stream));
    }

    /**
     * Windows mapped by CUDA IPC ({@link IpcWindow}) where every rank of this group runs on this host and can map the
     * others' memory; null on every rank otherwise.
     */
    @Override
    public synchronized PeerWindow openWindow(long bytes) {
        usable("openWindow");
        if (bytes <= 0) throw new IllegalArgumentException("openWindow: bytes must be > 0, got " + bytes);
        IpcWindow w = IpcWindow.open(this, rank, size, device, bytes);
        if (w != null) windows.add(w);
        return w;
    }

    /** A closed window, no longer released on failure. */
    void forget(IpcWindow w) { windows.remove(w); }

    /**
     * Stream memory operations (a peer window's handshake) queued on the backend's stream and watched as a collective:
     * a wait that does not pass within the timeout fails the communicator, naming the call.
     */
    void launchStreamOps(String op, java.util.function.Consumer<CUstream_st> body) {
        RuntimeException[] err = new RuntimeException[1];
        // the backend's current stream: its main one, or inside Backend.beside its side stream
        CUstream_st on = backend.nativeStream() == stream.address() ? stream : new CUstream_st(pointer(backend.nativeStream()));
        launch(op, on, () -> {
            try {
                body.accept(on);
            } catch (RuntimeException e) {
                err[0] = e;
            }
            return nccl.ncclSuccess;
        });
        if (err[0] != null) throw err[0];
    }

    /** Every rank's bytes (the same length on all ranks), in rank order: an all-gather through the device, read back. */
    byte[][] allGatherBytes(byte[] mine) {
        int words = (mine.length + 3) / 4;
        int[] v = new int[words];
        java.nio.ByteBuffer.wrap(java.util.Arrays.copyOf(mine, words * 4)).order(java.nio.ByteOrder.LITTLE_ENDIAN).asIntBuffer().get(v);
        int[] all;
        try (Tensor s = backend.fromInts(v, words); Tensor r = backend.zeros(DType.I32, size * words)) {
            allGather(s, r);
            all = backend.toInts(r);
        }
        byte[][] out = new byte[size][];
        for (int q = 0; q < size; q++) {
            java.nio.ByteBuffer b = java.nio.ByteBuffer.allocate(words * 4).order(java.nio.ByteOrder.LITTLE_ENDIAN);
            b.asIntBuffer().put(all, q * words, words);
            out[q] = java.util.Arrays.copyOf(b.array(), mine.length);
        }
        return out;
    }

    @Override
    public void barrier() {
        usable("barrier");
        if (barrierBuf == null) barrierBuf = backend.zeros(DType.I32, 1);
        Tensor b = barrierBuf;
        long s = launch("barrier", () -> nccl.ncclAllReduce(ptr(b), ptr(b), 1, nccl.ncclInt32, nccl.ncclSum, comm, stream));
        // Wait on the host for the watchdog to see it complete (it aborts on the timeout, so this cannot hang).
        while (watchdog.completed < s) {
            usable("barrier");
            LockSupport.parkNanos(50_000);
        }
    }

    @Override
    public void send(Tensor t, int peer) {
        CommChecks.pointToPoint("send", this, t, peer);
        launch("send to " + peer, () -> nccl.ncclSend(ptr(t), t.numel(), type(t), peer, comm, stream));
    }

    @Override
    public void recv(Tensor t, int peer) {
        CommChecks.pointToPoint("recv", this, t, peer);
        launch("recv from " + peer, () -> nccl.ncclRecv(ptr(t), t.numel(), type(t), peer, comm, stream));
    }

    @Override
    public synchronized Communicator split(int color, int key) {
        usable("split");
        long s = seq++;
        cuda("cudaSetDevice", cudart.cudaSetDevice(device));
        HandleSlot slot = new HandleSlot();
        splitting = true;   // the watchdog leaves the non-blocking communicator to this thread meanwhile
        boolean ok;
        long deadline = System.nanoTime() + opts.timeout().toNanos();
        try {
            int rc = nccl.ncclCommSplit(control, color < 0 ? nccl.NCCL_SPLIT_NOCOLOR : color, key, slot.pp, config());
            // The split runs as a job of the parent: poll the parent; the child's handle appears in the slot when done.
            ok = waitReady(control, "ncclCommSplit #" + s, rc, deadline);
        } finally {
            splitting = false;
        }
        if (!ok) {
            slot.abandon();
            watchdog.fail(watchdog.timeout(s, "split #" + s, "splitting"));
            usable("split");
        }
        ncclComm nc = slot.handle();
        slot.close();
        if (color < 0) return null;
        if (nc == null) throw new CommunicationException("ncclCommSplit #" + s + " on " + this + " completed without a communicator");
        int[] v = new int[1];
        check("ncclCommCount", nccl.ncclCommCount(nc, v), nc);
        int subSize = v[0];
        check("ncclCommUserRank", nccl.ncclCommUserRank(nc, v), nc);
        int subRank = v[0];
        ncclComm data = blockingTwin(nc, subRank, "split #" + s, deadline);
        if (data == null) {
            nccl.ncclCommAbort(nc);
            watchdog.fail(watchdog.timeout(s, "split #" + s, "splitting"));
            usable("split");
        }
        NcclCommunicator sub = new NcclCommunicator(backend, nc, data, subRank, subSize, new int[subSize], tag + "/s" + s + "c" + color, store, opts);
        // Learn the members' world ranks (for messages naming missing ranks): one small all-gather.
        try (Tensor me = backend.fromInts(new int[] {worldRanks[rank]}, 1); Tensor all = backend.zeros(DType.I32, subSize)) {
            sub.allGather(me, all);
            int[] wr = backend.toInts(all);
            System.arraycopy(wr, 0, sub.worldRanks, 0, subSize);
        }
        return sub;
    }

    @Override
    public void close() {
        if (closed) return;
        watchdog.stop();     // before taking the lock: the watchdog may be waiting for it to abort
        synchronized (this) {
            closed = true;
            closeLocked();
        }
    }

    private void closeLocked() {
        for (IpcWindow w : windows) if (failure == null) w.close();
        if (barrierBuf != null) barrierBuf.close();
        if (failure == null) {
            cudart.cudaSetDevice(device);
            // the blocking one: finalize waits for its queued work (the watchdog has seen it all complete or failed)
            int rd = nccl.ncclCommFinalize(comm);
            if (rd == nccl.ncclSuccess) nccl.ncclCommDestroy(comm);
            else nccl.ncclCommAbort(comm);
            int rc = nccl.ncclCommFinalize(control);
            if (waitReady(control, "ncclCommFinalize", rc, System.nanoTime() + opts.timeout().toNanos())) {
                nccl.ncclCommDestroy(control);
            } else {
                log.warn("{}: ncclCommFinalize did not complete within the timeout; aborting", describe());
                nccl.ncclCommAbort(control);
            }
        }
        watchdog.destroyEvents();
        if (side != null) {
            cudart.cudaStreamSynchronize(side);
            cudart.cudaStreamDestroy(side);
            cudart.cudaEventDestroy(fork);
        }
    }

    @Override
    public String toString() { return describe(); }

    /** The failure that aborted this communicator, or null. */
    public CommunicationException failure() { return failure; }

    // ------------------------------------------------------------------ watchdog

    private record Pending(long seq, String label, CUevent_st event, long startNanos) {}

    private final class Watchdog implements Runnable {
        final ConcurrentLinkedDeque<Pending> pending = new ConcurrentLinkedDeque<>();
        final ConcurrentLinkedDeque<CUevent_st> spareEvents = new ConcurrentLinkedDeque<>();   // reused: no create per collective
        volatile long enqueued = -1, completed = -1;
        volatile boolean stopped;
        Thread thread;
        long published = Long.MIN_VALUE, lastPublish;
        boolean storeWarned;

        private volatile long enqueueStart;   // System.nanoTime() when the caller entered NCCL, 0 when outside
        private volatile long enqueueSeq;
        private volatile String enqueueLabel;

        void enqueueing(long s, String label) {
            enqueueSeq = s;
            enqueueLabel = label;
            enqueueStart = System.nanoTime() | 1;
        }

        void enqueued() {
            enqueueStart = 0;
        }

        void track(long s, String label, CUstream_st on) {
            CUevent_st ev = spareEvents.poll();
            if (ev == null) {
                ev = new CUevent_st();
                cuda("cudaEventCreateWithFlags", cudart.cudaEventCreateWithFlags(ev, cudart.cudaEventDisableTiming));
            }
            cuda("cudaEventRecord", cudart.cudaEventRecord(ev, on));
            pending.add(new Pending(s, label, ev, System.nanoTime()));
            enqueued = s;
        }

        @Override
        public void run() {
            cudart.cudaSetDevice(device);
            int[] st = new int[1];
            while (!stopped) {
                if (failure == null) {
                    try {
                        poll(st);
                    } catch (RuntimeException e) {
                        fail(new CommunicationException(describe() + ": watchdog error: " + e, e));
                    }
                }
                LockSupport.parkNanos(1_000_000);
            }
        }

        private void poll(int[] st) {
            // Only the blocking communicator is polled here: it never has a pending group job, so this read is safe
            // beside the caller's thread. (The non-blocking one is polled only by its owner's thread, under the
            // communicator's lock: ncclCommGetAsyncError completes and frees a pending job, and two threads at once
            // corrupted the heap.)
            if (closed || failure != null) return;
            long es = enqueueStart;
            if (es != 0 && System.nanoTime() - es > opts.timeout().toNanos()) {
                fail(timeout(enqueueSeq, enqueueLabel, "queuing"));
                return;
            }
            int q = nccl.ncclCommGetAsyncError(comm, st);
            if (q == nccl.ncclSuccess && st[0] != nccl.ncclSuccess && st[0] != nccl.ncclInProgress) {
                Pending h = pending.peek();
                fail(new CommunicationException(describe() + ": NCCL reported an asynchronous error during "
                        + (h == null ? "the last collective" : h.label) + ": " + nccl.ncclGetErrorString(st[0]).getString()
                        + " (a peer may have died; check the other ranks' logs)"));
                return;
            }
            Pending h;
            while ((h = pending.peek()) != null) {
                int e = cudart.cudaEventQuery(h.event);
                if (e == cudart.cudaSuccess) {
                    pending.poll();
                    spareEvents.add(h.event);
                    completed = h.seq;
                    continue;
                }
                if (e != cudart.cudaErrorNotReady) {
                    fail(new CommunicationException(describe() + ": CUDA error while " + h.label + " was pending: "
                            + cudart.cudaGetErrorString(e).getString()));
                    return;
                }
                if (System.nanoTime() - h.startNanos > opts.timeout().toNanos()) {
                    fail(timeout(h.seq, h.label, "running"));
                    return;
                }
                break;
            }
            long now = System.nanoTime();
            if (store != null && enqueued != published && now - lastPublish > 200_000_000L) {
                publish();
                lastPublish = now;
            }
        }

        private void publish() {
            try {
                long e = enqueued;
                store.set(tag + "/enqueued/" + rank, ByteBuffer.allocate(8).putLong(e).array());
                published = e;
            } catch (RuntimeException ex) {
                if (!storeWarned) log.warn("{}: cannot publish progress to the rendezvous store: {}", describe(), ex.toString());
                storeWarned = true;
            }
        }

        /** The timeout exception for collective s, naming the ranks whose published progress is behind it. */
        CommTimeoutException timeout(long s, String label, String phase) {
            List<Integer> missing = new ArrayList<>();
            StringBuilder seen = new StringBuilder();
            if (store != null) {
                publish();
                try {
                    for (int r = 0; r < size; r++) {
                        if (r == rank) continue;
                        String k = tag + "/enqueued/" + r;
                        long last = store.check(k) ? ByteBuffer.wrap(store.get(k)).getLong() : -1;
                        if (last < s) {
                            missing.add(worldRanks[r]);
                            seen.append(seen.isEmpty() ? "" : ", ").append("world rank ").append(worldRanks[r])
                                    .append(last < 0 ? " queued none" : " last queued #" + last);
                        }
                    }
                } catch (RuntimeException e) {
                    seen.append("progress unknown: ").append(e.getMessage());
                }
            }
            int[] m = missing.stream().mapToInt(Integer::intValue).toArray();
            String who = store == null ? "the missing ranks are unknown (no rendezvous store)"
                    : m.length == 0 ? "every rank has queued it (a GPU or the network may be stuck)"
                    : "world rank(s) " + Arrays.toString(m) + " have not reached it (" + seen + ")";
            return new CommTimeoutException("NCCL " + label + " on " + describe() + " did not complete within " + opts.timeoutMillis()
                    + " ms (" + phase + "): " + who + "; the communicator was aborted", label, m);
        }

        /**
         * Aborts both communicators, once. Not under the communicator's lock: the caller's thread may be inside a
         * blocking NCCL call (waiting to connect to a dead peer), and the abort is what releases it.
         */
        void fail(CommunicationException e) {
            synchronized (this) {
                if (failure != null || closed) return;
                failure = e;
            }
            log.error("{}", e.getMessage());
            // first the peer windows' waits: the abort frees device memory, which waits for the whole device
            for (IpcWindow w : windows) w.release();
            nccl.ncclCommAbort(comm);      // releases kernels and host calls waiting for a peer; unusable afterwards
            // The non-blocking communicator is polled by the owner's thread during a split: not freed under it.
            if (!splitting || Thread.currentThread() != thread) nccl.ncclCommAbort(control);
        }

        void stop() {
            stopped = true;
            if (thread != null && thread != Thread.currentThread()) {
                try {
                    thread.join(5_000);
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                }
            }
        }

        void destroyEvents() {
            Pending h;
            while ((h = pending.poll()) != null) cudart.cudaEventDestroy(h.event);
            CUevent_st ev;
            while ((ev = spareEvents.poll()) != null) cudart.cudaEventDestroy(ev);
        }
    }
}
