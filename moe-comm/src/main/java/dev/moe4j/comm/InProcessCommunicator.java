package dev.moe4j.comm;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.comm.CommChecks;
import dev.moe4j.core.comm.CommOptions;
import dev.moe4j.core.comm.CommTimeoutException;
import dev.moe4j.core.comm.CommunicationException;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.comm.PeerWindow;
import dev.moe4j.core.comm.ReduceOp;
import dev.moe4j.core.comm.RowBlocks;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Scope;
import dev.moe4j.core.tensor.Shape;
import dev.moe4j.core.tensor.Storage;
import dev.moe4j.core.tensor.Tensor;

import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Comparator;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * N ranks as N threads of one JVM, each with its own backend: the communicator of the CPU tests that prove an
 * expert-parallel run equals a single-rank run.
 *
 * <p>Every collective is a rendezvous: each rank deposits a host copy of its data (read through the Backend API,
 * exactly), waits until all ranks of the group have deposited, and then computes its own result from the
 * deposits. Reductions are computed in float64 in rank order and rounded once to the tensor's dtype, so results
 * are deterministic. The wait has the world's timeout: a rank that does not arrive makes the others fail with a
 * {@link CommTimeoutException} naming it and the collective, and a rank that fails (reported through
 * {@link #abortWorld}, which {@link InProcessWorld} does) makes the others fail at once.
 */
public final class InProcessCommunicator implements Communicator {

    /** State shared by all ranks of one in-process world (one monitor: simple, and fast enough for tests). */
    static final class World {
        final int size;
        final long timeoutMs;
        final Object lock = new Object();
        final Map<String, Round> rounds = new HashMap<>();
        final Map<String, ArrayDeque<double[]>> mail = new HashMap<>();
        String failure;          // why the world was aborted (first reason wins)

        World(int size, CommOptions opts) {
            this.size = size;
            this.timeoutMs = opts.timeoutMillis();
        }

        void fail(String reason) {
            synchronized (lock) {
                if (failure == null) failure = reason;
                lock.notifyAll();
            }
        }
    }

    /** A group: its name and the world ranks of its members in group-rank order. */
    record Group(String name, int[] worldRanks) {
        int size() { return worldRanks.length; }
    }

    /** One collective call of one group: what each member deposited. */
    static final class Round {
        final String op;
        final Object[] deposits;
        final boolean[] arrivedFrom;
        int arrived, departed;
        final Map<Integer, Group> children = new HashMap<>();   // split: color -> sub-group

        Round(String op, int n) {
            this.op = op;
            this.deposits = new Object[n];
            this.arrivedFrom = new boolean[n];
        }
    }

    private final World world;
    private final Group group;
    private final int rank;         // in the group
    private final Backend backend;
    private long seq;               // collectives called on this communicator
    private final Map<Integer, Long> sendSeq = new HashMap<>();
    private final Map<Integer, Long> recvSeq = new HashMap<>();
    private volatile boolean closed;

    private InProcessCommunicator(World world, Group group, int rank, Backend backend) {
        this.world = world;
        this.group = group;
        this.rank = rank;
        this.backend = backend;
    }

    /**
     * A world of backends.size() ranks; communicator i belongs to the thread that runs rank i (each rank must be
     * driven by its own thread, since collectives block until every rank arrives).
     */
    public static List<InProcessCommunicator> createWorld(List<Backend> backends, CommOptions opts) {
        if (backends == null || backends.isEmpty()) throw new IllegalArgumentException("createWorld: backends must hold one backend per rank (>= 1)");
        int n = backends.size();
        World w = new World(n, opts == null ? CommOptions.defaults() : opts);
        int[] ranks = new int[n];
        for (int i = 0; i < n; i++) ranks[i] = i;
        Group g = new Group("world", ranks);
        List<InProcessCommunicator> out = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            if (backends.get(i) == null) throw new IllegalArgumentException("createWorld: backend of rank " + i + " is null");
            out.add(new InProcessCommunicator(w, g, i, backends.get(i)));
        }
        return out;
    }

    /** Aborts the whole world: every pending and later collective of every rank fails with this reason. */
    public void abortWorld(String reason) { world.fail(reason); }

    @Override public int rank() { return rank; }

    @Override public int size() { return group.size(); }

    @Override public Backend backend() { return backend; }

    /** This rank in the world. */
    public int worldRank() { return group.worldRanks[rank]; }

    @Override
    public String describe() {
        return "in-process " + group.name + " (rank " + rank + " of " + size() + ", world rank " + worldRank() + ")";
    }

    private void open(String op) {
        if (closed) throw new IllegalStateException(op + ": " + describe() + " is closed");
    }

    // ------------------------------------------------------------------ rendezvous

    /** Deposits mine for the next collective of this group and waits for every member's deposit. */
    private Round exchange(String op, Object mine) {
        String label = op + " #" + seq;
        String key = group.name + "#" + seq;
        seq++;
        int n = size();
        synchronized (world.lock) {
            Round r = world.rounds.computeIfAbsent(key, k -> new Round(op, n));
            if (!r.op.equals(op)) {
                String msg = label + " in " + group.name + ": rank " + worldRank() + " called " + op + " while other ranks called "
                        + r.op + " (every rank must call the same collectives in the same order)";
                world.fail(msg);
                throw new CommunicationException(msg);
            }
            r.deposits[rank] = mine;
            r.arrivedFrom[rank] = true;
            r.arrived++;
            world.lock.notifyAll();
            awaitRanks(label, () -> missing(r));
            if (++r.departed == n) world.rounds.remove(key);
            return r;
        }
    }

    /**
     * Under the world's lock: waits until {@code missing} (the world ranks still awaited) is empty, failing at once when
     * the world is aborted and after the world's timeout naming the ranks.
     */
    private void awaitRanks(String label, java.util.function.Supplier<int[]> missing) {
        long deadline = System.nanoTime() + world.timeoutMs * 1_000_000L;
        for (int[] m = missing.get(); m.length > 0; m = missing.get()) {
            checkFailure(label, m);
            long left = (deadline - System.nanoTime()) / 1_000_000L;
            if (left <= 0) {
                String msg = label + " in " + group.name + " (" + describe() + "): timed out after " + world.timeoutMs
                        + " ms waiting for world rank(s) " + Arrays.toString(m);
                world.fail("rank " + worldRank() + " timed out in " + label + " waiting for world rank(s) " + Arrays.toString(m));
                throw new CommTimeoutException(msg, label, m);
            }
            try {
                world.lock.wait(left);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                throw new CommunicationException(label + " in " + group.name + ": interrupted while waiting for world rank(s) " + Arrays.toString(m));
            }
        }
    }

    private int[] missing(Round r) {
        List<Integer> m = new ArrayList<>();
        for (int i = 0; i < r.arrivedFrom.length; i++) if (!r.arrivedFrom[i]) m.add(group.worldRanks[i]);
        return m.stream().mapToInt(Integer::intValue).toArray();
    }

    /** missing: the world ranks still awaited, or null where nothing is awaited (a send). */
    private void checkFailure(String label, int[] missing) {
        if (world.failure == null) return;
        String msg = label + " in " + group.name + " (" + describe() + "): world aborted: " + world.failure
                + (missing == null ? "" : "; still waiting for world rank(s) " + Arrays.toString(missing));
        if (missing == null) missing = new int[0];
        if (world.failure.contains("timed out")) throw new CommTimeoutException(msg, label, missing);
        throw new CommunicationException(msg);
    }

    private record Deposit(double[] data, int[] splits, int cols, String dtype) {}

    private Deposit other(Round r, int p) { return (Deposit) r.deposits[p]; }

    private void sameLayout(String op, Round r, Deposit mine) {
        for (int p = 0; p < size(); p++) {
            Deposit d = other(r, p);
            if (d == null) continue;
            if (!d.dtype.equals(mine.dtype)) {
                throw new IllegalArgumentException(op + ": rank " + p + " passed " + d.dtype + " but rank " + rank + " passed " + mine.dtype);
            }
        }
    }

    // ------------------------------------------------------------------ collectives

    @Override
    public void allToAll(Tensor send, Tensor recv) {
        open("allToAll");
        int n = CommChecks.allToAll(this, send, recv);
        int[] splits = new int[size()];
        Arrays.fill(splits, n);
        exchangeRows("allToAll", send, splits, recv, splits);
    }

    @Override
    public void allToAllV(Tensor send, int[] sendRows, Tensor recv, int[] recvRows) {
        open("allToAllV");
        CommChecks.allToAllV(this, send, sendRows, recv, recvRows);
        exchangeRows("allToAllV", send, sendRows.clone(), recv, recvRows);
    }

    private void exchangeRows(String op, Tensor send, int[] sendRows, Tensor recv, int[] recvRows) {
        int cols = send.cols();
        Deposit mine = new Deposit(HostIO.read(send), sendRows, cols, send.dtype().name());
        Round r = exchange(op, mine);
        sameLayout(op, r, mine);
        double[] out = new double[Math.toIntExact(recv.numel())];
        int at = 0;
        for (int p = 0; p < size(); p++) {
            Deposit d = other(r, p);
            if (d.cols != cols) {
                throw new IllegalArgumentException(op + ": rank " + p + " sends rows of " + d.cols + " columns, rank " + rank + " receives " + cols);
            }
            if (d.splits[rank] != recvRows[p]) {
                throw new IllegalArgumentException(op + ": rank " + rank + " expects recvRows[" + p + "] = " + recvRows[p]
                        + " rows from rank " + p + ", which sends sendRows[" + rank + "] = " + d.splits[rank]);
            }
            int from = 0;
            for (int q = 0; q < rank; q++) from += d.splits[q];
            int len = d.splits[rank] * cols;
            System.arraycopy(d.data, from * cols, out, at, len);
            at += len;
        }
        HostIO.write(recv, out);
    }

    private record BlockDeposit(double[] data, RowBlocks send, RowBlocks recv, int cols, String dtype) {}

    /** Each rank's blocks copied straight from the peers' send tensors; every rank checks every pair's blocks. */
    @Override
    public void exchangeRows(Tensor send, RowBlocks sendBlocks, Tensor recv, RowBlocks recvBlocks) {
        String op = "exchangeRows";
        open(op);
        CommChecks.exchangeRows(op, this, send, sendBlocks, recv, recvBlocks);
        int cols = send.cols();
        Round r = exchange(op, new BlockDeposit(HostIO.read(send), sendBlocks, recvBlocks, cols, send.dtype().name()));
        int n = size();
        BlockDeposit[] d = new BlockDeposit[n];
        for (int p = 0; p < n; p++) {
            d[p] = (BlockDeposit) r.deposits[p];
            if (!d[p].dtype.equals(send.dtype().name()) || d[p].cols != cols) {
                throw new IllegalArgumentException(op + ": rank " + p + " passed " + d[p].dtype + " rows of " + d[p].cols + " columns but rank "
                        + rank + " passed " + send.dtype() + " rows of " + cols);
            }
        }
        // All pairs, in one order: a mismatch fails every rank with the same message.
        for (int from = 0; from < n; from++) {
            for (int to = 0; to < n; to++) CommChecks.pairing(op, from, to, d[from].send.rowsWith(to), d[to].recv.rowsWith(from));
        }
        double[] out = HostIO.read(recv);   // rows outside the blocks stay as they are
        for (int p = 0; p < n; p++) {
            int[] mine = recvBlocks.nonEmptyWith(p), theirs = d[p].send.nonEmptyWith(rank);
            for (int k = 0; k < mine.length; k++) {
                System.arraycopy(d[p].data, d[p].send.start(theirs[k]) * cols, out, recvBlocks.start(mine[k]) * cols, recvBlocks.rows(mine[k]) * cols);
            }
        }
        HostIO.write(recv, out);
    }

    @Override
    public void allReduce(Tensor t, ReduceOp op) {
        open("allReduce");
        CommChecks.allReduce(this, t, op);
        Deposit mine = new Deposit(HostIO.read(t), null, t.cols(), t.dtype().name());
        Round r = exchange("allReduce", mine);
        sameLayout("allReduce", r, mine);
        HostIO.write(t, reduce("allReduce", r, op, 0, mine.data.length));
    }

    /** op over ranks (in rank order, float64) of elements [from, from+len) of every deposit. */
    private double[] reduce(String opName, Round r, ReduceOp op, int from, int len) {
        double[] acc = null;
        for (int p = 0; p < size(); p++) {
            double[] d = other(r, p).data;
            if (d.length != other(r, rank).data.length) {
                throw new IllegalArgumentException(opName + ": rank " + p + " passed " + d.length + " elements, rank " + rank + " passed "
                        + other(r, rank).data.length);
            }
            if (acc == null) {
                acc = Arrays.copyOfRange(d, from, from + len);
                continue;
            }
            for (int i = 0; i < len; i++) {
                double v = d[from + i];
                acc[i] = switch (op) {
                    case SUM -> acc[i] + v;
                    case MAX -> Math.max(acc[i], v);
                    case MIN -> Math.min(acc[i], v);
                };
            }
        }
        return acc;
    }

    @Override
    public void allGather(Tensor send, Tensor recv) {
        open("allGather");
        CommChecks.allGather(this, send, recv);
        Deposit mine = new Deposit(HostIO.read(send), null, send.cols(), send.dtype().name());
        Round r = exchange("allGather", mine);
        sameLayout("allGather", r, mine);
        int len = mine.data.length;
        double[] out = new double[len * size()];
        for (int p = 0; p < size(); p++) {
            double[] d = other(r, p).data;
            if (d.length != len) throw new IllegalArgumentException("allGather: rank " + p + " sends " + d.length + " elements, rank " + rank + " sends " + len);
            System.arraycopy(d, 0, out, p * len, len);
        }
        HostIO.write(recv, out);
    }

    @Override
    public void reduceScatter(Tensor send, Tensor recv, ReduceOp op) {
        open("reduceScatter");
        CommChecks.reduceScatter(this, send, recv, op);
        Deposit mine = new Deposit(HostIO.read(send), null, send.cols(), send.dtype().name());
        Round r = exchange("reduceScatter", mine);
        sameLayout("reduceScatter", r, mine);
        int len = Math.toIntExact(recv.numel());
        HostIO.write(recv, reduce("reduceScatter", r, op, rank * len, len));
    }

    @Override
    public void broadcast(Tensor t, int root) {
        open("broadcast");
        CommChecks.broadcast(this, t, root);
        Deposit mine = new Deposit(rank == root ? HostIO.read(t) : null, new int[] {root}, t.cols(), t.dtype().name());
        Round r = exchange("broadcast", mine);
        sameLayout("broadcast", r, mine);
        Deposit d = other(r, root);
        for (int p = 0; p < size(); p++) {
            if (other(r, p).splits[0] != root) {
                throw new IllegalArgumentException("broadcast: rank " + p + " names root " + other(r, p).splits[0] + ", rank " + rank + " names " + root);
            }
        }
        if (d.data.length != t.numel()) {
            throw new IllegalArgumentException("broadcast: root " + root + " sends " + d.data.length + " elements, rank " + rank + " expects " + t.numel());
        }
        if (rank != root) HostIO.write(t, d.data);
    }

    @Override
    public void barrier() {
        open("barrier");
        exchange("barrier", null);
    }

    // ------------------------------------------------------------------ point to point

    private String mailbox(int from, int to, long n) { return group.name + ":" + from + "->" + to + "#" + n; }

    @Override
    public void send(Tensor t, int peer) {
        open("send");
        CommChecks.pointToPoint("send", this, t, peer);
        long n = sendSeq.merge(peer, 1L, Long::sum) - 1;
        double[] data = HostIO.read(t);
        synchronized (world.lock) {
            checkFailure("send #" + n + " to rank " + peer, null);
            world.mail.computeIfAbsent(mailbox(rank, peer, n), k -> new ArrayDeque<>()).add(data);
            world.lock.notifyAll();
        }
    }

    @Override
    public void recv(Tensor t, int peer) {
        open("recv");
        CommChecks.pointToPoint("recv", this, t, peer);
        long n = recvSeq.merge(peer, 1L, Long::sum) - 1;
        String label = "recv #" + n + " from rank " + peer;
        String key = mailbox(peer, rank, n);
        double[] data;
        synchronized (world.lock) {
            int[] sender = {group.worldRanks[peer]};
            awaitRanks(label, () -> {
                ArrayDeque<double[]> q = world.mail.get(key);
                return q != null && !q.isEmpty() ? new int[0] : sender;
            });
            data = world.mail.remove(key).poll();
        }
        if (data.length != t.numel()) {
            throw new IllegalArgumentException("recv: rank " + peer + " sent " + data.length + " elements, rank " + rank + " receives " + t.numel());
        }
        HostIO.write(t, data);
    }

    // ------------------------------------------------------------------ sub-groups

    @Override
    public Communicator split(int color, int key) {
        open("split");
        long mySeq = seq;
        Round r = exchange("split", new int[] {color, key});
        if (color < 0) return null;
        Group g;
        synchronized (world.lock) {
            g = r.children.computeIfAbsent(color, c -> {
                List<Integer> members = new ArrayList<>();
                for (int p = 0; p < size(); p++) if (((int[]) r.deposits[p])[0] == c) members.add(p);
                members.sort(Comparator.<Integer>comparingInt(p -> ((int[]) r.deposits[p])[1]).thenComparingInt(p -> p));
                int[] wr = members.stream().mapToInt(p -> group.worldRanks[p]).toArray();
                return new Group(group.name + "/split" + mySeq + "c" + c, wr);
            });
        }
        int me = -1;
        for (int i = 0; i < g.size(); i++) if (g.worldRanks[i] == worldRank()) me = i;
        return new InProcessCommunicator(world, g, me, backend);
    }

    // ------------------------------------------------------------------ peer windows

    private record WindowDeposit(Storage storage, int[] flags, boolean host, long bytes) {}

    /**
     * Windows in host memory, which the rank threads share: each rank's a tensor of its own backend, the others' seen
     * through {@link Tensor#borrowing}; the flags are plain ints under the world's lock. Null (on every rank) where a
     * rank's backend keeps its tensors in device memory.
     */
    @Override
    public PeerWindow openWindow(long bytes) {
        open("openWindow");
        if (bytes <= 0) throw new IllegalArgumentException("openWindow: bytes must be > 0, got " + bytes);
        Tensor mine = Scope.detach(backend.zeros(DType.BF16, Math.toIntExact((bytes + 1) / 2)));
        boolean host;
        try {
            mine.storage().deviceAddress();
            host = false;
        } catch (UnsupportedOperationException e) {
            host = true;
        }
        Round r = exchange("openWindow", new WindowDeposit(mine.storage(), new int[2 * size()], host, bytes));
        int n = size();
        WindowDeposit[] all = new WindowDeposit[n];
        long[] sizes = new long[n];
        boolean everyHost = true;
        for (int p = 0; p < n; p++) {
            all[p] = (WindowDeposit) r.deposits[p];
            everyHost &= all[p].host;
            sizes[p] = all[p].bytes;
        }
        try {
            PeerWindow.checkSameSize(sizes, describe());
        } catch (IllegalArgumentException e) {
            mine.close();
            throw e;
        }
        if (!everyHost) {
            mine.close();
            return null;
        }
        return new HostWindow(bytes, mine, all);
    }

    /** {@link PeerWindow} of in-process ranks: window p's flags[q] = arrive from rank q, flags[n + q] = free from rank q. */
    private final class HostWindow implements PeerWindow {
        private final long bytes;
        private final Tensor own;
        private final WindowDeposit[] all;
        private int epoch;
        private boolean closedWindow;

        HostWindow(long bytes, Tensor own, WindowDeposit[] all) {
            this.bytes = bytes;
            this.own = own;
            this.all = all;
        }

        @Override public long bytes() { return bytes; }

        @Override
        public Tensor tensor(int q, DType dtype, int rows, int cols) {
            if (closedWindow) throw new IllegalStateException("peer window of " + describe() + " was closed");
            if (q < 0 || q >= all.length) throw new IllegalArgumentException("peer window: rank " + q + " of " + all.length);
            PeerWindow.checkFits(bytes, dtype, rows, cols);
            return Tensor.borrowing(backend, all[q].storage, dtype, Shape.of(rows, cols));
        }

        @Override
        public void open() {
            int t = ++epoch, n = size();
            signal(n, t);            // my window is ready for exchange t (its last contents read, its own writes done)
            waitFor(n, t, "peer window open #" + t);   // every peer's too: I may store into theirs
        }

        @Override
        public void publish() { signal(0, epoch); }

        @Override
        public void await() { waitFor(0, epoch, "peer window await #" + epoch); }

        /** flags[base + rank] = v in every peer's window. */
        private void signal(int base, int v) {
            synchronized (world.lock) {
                for (int q = 0; q < all.length; q++) if (q != rank) all[q].flags[base + rank] = v;
                world.lock.notifyAll();
            }
        }

        /** Waits until my flags[base + q] &gt;= v for every peer q, within the world's timeout. */
        private void waitFor(int base, int v, String label) {
            int[] flags = all[rank].flags;
            synchronized (world.lock) {
                awaitRanks(label, () -> {
                    List<Integer> m = new ArrayList<>();
                    for (int q = 0; q < all.length; q++) if (q != rank && flags[base + q] < v) m.add(group.worldRanks[q]);
                    return m.stream().mapToInt(Integer::intValue).toArray();
                });
            }
        }

        @Override
        public void close() {
            if (closedWindow) return;
            closedWindow = true;
            own.close();
        }
    }

    @Override
    public void close() { closed = true; }

    @Override
    public String toString() { return describe(); }
}
