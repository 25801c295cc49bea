package dev.moe4j.comm;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.comm.CommChecks;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.comm.ReduceOp;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;

/**
 * The hierarchical all-to-all of DeepSpeed-MoE (Rajbhandari et al. 2022, Fig. 8), wrapped around a world
 * communicator: every other collective is delegated unchanged, so an MoE layer picks flat or hierarchical simply
 * by the communicator it is given.
 *
 * <p>Ranks are numbered r = n*G + l (node n of N = p/G, local index l of G). A flat all-to-all sends p messages
 * per rank; this one sends G-1 inside the node and N-1 across nodes:
 * <ol>
 *   <li>layout transform: reorder the send rows from destination order (n', l') to (l', n'), so that everything
 *       for local peer l' (whatever its node) is contiguous;</li>
 *   <li>intra-node all-to-all (group: the G ranks of this node): rank (n, l') now holds, for every source l of its
 *       node and every destination node n', the rows (n, l) -> (n', l');</li>
 *   <li>layout transform: reorder from (l, n') to (n', l), so that everything for destination node n' is
 *       contiguous and ordered by source local index;</li>
 *   <li>inter-node all-to-all (group: the N ranks of local index l'): rank (n', l') receives from each node n the
 *       rows (n, l) -> (n', l') for l = 0..G-1, i.e. in source rank order: exactly the flat result.</li>
 * </ol>
 * Layout transforms move whole blocks of rows (one device copy per non-empty (peer, node) block, placed from the
 * splits on the host: no index tensor to build or upload), and a transform that leaves every block in place is
 * skipped (step 1 with G = 1; steps 3-4 collapse to a copy into the result with N = 1). With variable splits, step 3 needs the splits of every rank of the node: they are
 * all-gathered (host ints, G*p numbers) inside the node once per call; equal splits need no exchange.
 *
 * <p>The temporaries are freed when the call returns, while a GPU may still be running the queued all-to-alls: this
 * relies on the backend's allocator reusing freed memory only for work queued later on the same stream (as a
 * stream-ordered caching allocator does).
 *
 * <p>The block exchange ({@link #exchangeRows}) keeps the interface's default: the blocks packed around this
 * hierarchical all-to-all, which the configuration chose.
 *
 * <p>The node size G is declared (default: LOCAL_WORLD_SIZE), so the path can be tested on one host with G
 * smaller than the number of GPUs. Creating this communicator is collective (it splits the world twice).
 */
public final class HierarchicalCommunicator implements Communicator {
    private final Communicator world;
    private final int nodeSize;      // G
    private final int nodes;         // N = p / G
    private final Communicator intra;   // the G ranks of this node, ordered by local index
    private final Communicator inter;   // the N ranks with this local index, ordered by node
    private boolean closed;

    public HierarchicalCommunicator(Communicator world, int nodeSize) {
        if (world == null) throw new IllegalArgumentException("HierarchicalCommunicator: world is null");
        int p = world.size();
        if (nodeSize < 1 || nodeSize > p || p % nodeSize != 0) {
            throw new IllegalArgumentException("HierarchicalCommunicator: nodeSize must be in [1, " + p + "] and divide the world size "
                    + p + ", got " + nodeSize);
        }
        this.world = world;
        this.nodeSize = nodeSize;
        this.nodes = p / nodeSize;
        int n = world.rank() / nodeSize, l = world.rank() % nodeSize;
        this.intra = world.split(n, l);
        this.inter = world.split(l, n);
    }

    /**
     * Node size from the launcher's environment: LOCAL_WORLD_SIZE (torchrun), OMPI_COMM_WORLD_LOCAL_SIZE or
     * Slurm's tasks per node; 1 ... the world size when none is set (one node).
     */
    public static HierarchicalCommunicator fromEnvironment(Communicator world) {
        var env = dev.moe4j.comm.rendezvous.DistributedEnv.fromEnvironment();
        int g = env.worldSize() == world.size() ? env.localWorldSize() : world.size();
        return new HierarchicalCommunicator(world, g);
    }

    /** The declared node size G. */
    public int nodeSize() { return nodeSize; }

    /** The intra-node group (G ranks). */
    public Communicator intraNode() { return intra; }

    /** The inter-node group (N ranks of the same local index). */
    public Communicator interNode() { return inter; }

    @Override public int rank() { return world.rank(); }

    @Override public int size() { return world.size(); }

    @Override public Backend backend() { return world.backend(); }

    @Override public String describe() { return "hierarchical(node size " + nodeSize + ") over " + world.describe(); }

    private void open(String op) {
        if (closed) throw new IllegalStateException(op + ": " + describe() + " is closed");
    }

    // ------------------------------------------------------------------ all-to-all

    @Override
    public void allToAll(Tensor send, Tensor recv) {
        open("allToAll");
        int n = CommChecks.allToAll(this, send, recv);
        int p = size();
        int[][] counts = new int[nodeSize][p];     // counts[l][d]: rows from local rank l of this node to world rank d
        for (int[] c : counts) Arrays.fill(c, n);
        int[] recvRows = new int[p];
        Arrays.fill(recvRows, n);
        run(send, counts, recv, recvRows);
    }

    @Override
    public void allToAllV(Tensor send, int[] sendRows, Tensor recv, int[] recvRows) {
        open("allToAllV");
        CommChecks.allToAllV(this, send, sendRows, recv, recvRows);
        int p = size();
        int[][] counts = new int[nodeSize][];
        if (nodeSize == 1) {
            counts[0] = sendRows.clone();
        } else {
            // The splits of every rank of this node (host ints): step 3 needs them to lay out what step 2 brings.
            Backend b = backend();
            try (Tensor mine = b.fromInts(sendRows, p); Tensor all = b.zeros(DType.I32, nodeSize, p)) {
                intra.allGather(mine, all);
                int[] a = b.toInts(all);
                for (int l = 0; l < nodeSize; l++) counts[l] = Arrays.copyOfRange(a, l * p, (l + 1) * p);
            }
        }
        run(send, counts, recv, recvRows);
    }

    /**
     * The four steps. counts[l][d] = rows local rank l of this node sends to world rank d (counts[myLocal] is this
     * rank's sendRows).
     */
    private void run(Tensor send, int[][] counts, Tensor recv, int[] recvRows) {
        int G = nodeSize, N = nodes, p = size();
        int myLocal = rank() % G;
        Backend b = backend();
        int cols = send.cols();
        DType dt = send.dtype();
        Tensor send2 = send.reshape(send.rows(), cols);
        Tensor recv2 = recv.reshape(recv.rows(), cols);
        int[] sendOff = CommChecks.offsets(counts[myLocal]);

        // Step 1: [dest (n', l')] -> [(l', n')], block by block; intra splits: rows for local peer l' = sum over n'.
        List<int[]> moves1 = new ArrayList<>();      // {from row, to row, rows}
        int[] intraSend = new int[G];
        int at = 0;
        for (int lp = 0; lp < G; lp++) {
            for (int np = 0; np < N; np++) {
                int d = np * G + lp;
                moves1.add(new int[] {sendOff[d], at, counts[myLocal][d]});
                at += counts[myLocal][d];
                intraSend[lp] += counts[myLocal][d];
            }
        }
        // After step 2 this rank holds, per source local l (in order), per destination node n', counts[l][n'*G + myLocal].
        int[] intraRecv = new int[G];
        for (int l = 0; l < G; l++) for (int np = 0; np < N; np++) intraRecv[l] += counts[l][np * G + myLocal];
        int midRows = Arrays.stream(intraRecv).sum();

        // Step 3: [(l, n')] -> [(n', l)], block by block; inter splits: rows for node n' = sum over l.
        int[][] blockStart = new int[G][N];
        at = 0;
        for (int l = 0; l < G; l++) {
            for (int np = 0; np < N; np++) {
                blockStart[l][np] = at;
                at += counts[l][np * G + myLocal];
            }
        }
        List<int[]> moves3 = new ArrayList<>();
        int[] interSend = new int[N];
        at = 0;
        for (int np = 0; np < N; np++) {
            for (int l = 0; l < G; l++) {
                int c = counts[l][np * G + myLocal];
                moves3.add(new int[] {blockStart[l][np], at, c});
                at += c;
                interSend[np] += c;
            }
        }
        // Step 4 receives from node n the rows of sources (n, 0..G-1): recvRows summed over the node.
        int[] interRecv = new int[N];
        for (int n = 0; n < N; n++) for (int l = 0; l < G; l++) interRecv[n] += recvRows[n * G + l];

        // A transform whose blocks all stay in place (G = 1 for step 1 and 3's source order, N = 1, ...) is skipped;
        // a single-member group's all-to-all is the identity, so its input is used as its output.
        List<Tensor> temps = new ArrayList<>();
        try {
            Tensor a = inPlace(moves1) ? send2 : keep(temps, b.empty(dt, send2.rows(), cols));
            if (a != send2) move(b, send2, a, moves1);                                                 // step 1
            Tensor m = G == 1 ? a : keep(temps, b.empty(dt, midRows, cols));
            if (G > 1) intra.allToAllV(a, intraSend, m, intraRecv);                                      // step 2
            if (N == 1) {
                move(b, m, recv2, moves3);                                                               // step 3 into the result
                return;                                                                                  // step 4: one node
            }
            Tensor c = inPlace(moves3) ? m : keep(temps, b.empty(dt, midRows, cols));
            if (c != m) move(b, m, c, moves3);                                                           // step 3
            inter.allToAllV(c, interSend, recv2, interRecv);                                             // step 4
        } finally {
            for (Tensor t : temps) t.close();
        }
    }

    private static Tensor keep(List<Tensor> temps, Tensor t) {
        temps.add(t);
        return t;
    }

    /** Whether every block of a transform stays where it is. */
    private static boolean inPlace(List<int[]> moves) {
        for (int[] mv : moves) if (mv[2] > 0 && mv[0] != mv[1]) return false;
        return true;
    }

    /** The layout transform: each non-empty block of rows copied to its place (a device copy per block, no index upload). */
    private static void move(Backend b, Tensor from, Tensor to, List<int[]> moves) {
        for (int[] mv : moves) {
            if (mv[2] == 0) continue;
            b.copy(from.rowSlice(mv[0], mv[2]), to.rowSlice(mv[1], mv[2]));
        }
    }

    // ------------------------------------------------------------------ delegated

    @Override public void allReduce(Tensor t, ReduceOp op) { open("allReduce"); world.allReduce(t, op); }

    @Override public void allGather(Tensor send, Tensor recv) { open("allGather"); world.allGather(send, recv); }

    @Override public void reduceScatter(Tensor send, Tensor recv, ReduceOp op) { open("reduceScatter"); world.reduceScatter(send, recv, op); }

    @Override public void broadcast(Tensor t, int root) { open("broadcast"); world.broadcast(t, root); }

    @Override public void barrier() { open("barrier"); world.barrier(); }

    @Override public void send(Tensor t, int peer) { open("send"); world.send(t, peer); }

    @Override public void recv(Tensor t, int peer) { open("recv"); world.recv(t, peer); }

    /** Splits the underlying world (the sub-group is flat). */
    @Override public Communicator split(int color, int key) { open("split"); return world.split(color, key); }

    /** Closes the two sub-groups; the world stays open (its owner closes it). */
    @Override
    public void close() {
        if (closed) return;
        closed = true;
        intra.close();
        inter.close();
    }
}
