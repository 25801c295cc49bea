package dev.moe4j.core.comm;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.Tensor;

/**
 * A group of ranks that exchange backend tensors: the collectives expert parallelism and data parallelism need.
 *
 * <p>Conventions (all methods):
 * <ul>
 *   <li>Every rank of the group calls the same collectives in the same order (as with MPI and NCCL). Point-to-
 *       point {@link #send}/{@link #recv} must be matched by the peer.</li>
 *   <li>Tensors belong to {@link #backend()}; GPU buffers never leave the device: an implementation over NCCL
 *       works on {@code Storage.deviceAddress()} and queues the collective on {@link Backend#nativeStream()},
 *       after the ops already queued there and before the ops queued later. Only {@link #barrier()} waits on
 *       the host. An in-process implementation completes each call before it returns.</li>
 *   <li>"[rows, cols]" means the tensor seen as a matrix (leading dimensions flattened, last dimension = cols),
 *       as in the Backend. Splits count ROWS: an all-to-all moves whole rows (tokens).</li>
 *   <li>Send and receive buffers must not overlap unless a method says so; send and receive dtypes must match.</li>
 *   <li>Arguments are checked before any communication; a bad argument throws {@link IllegalArgumentException}
 *       naming it. A call on a closed communicator throws {@link IllegalStateException}. A peer that fails or
 *       does not arrive within the timeout ({@link CommOptions}) makes the call throw
 *       {@link CommunicationException} / {@link CommTimeoutException} naming the collective and the missing ranks;
 *       the communicator is then unusable.</li>
 * </ul>
 */
public interface Communicator extends AutoCloseable {

    /** This process's (or thread's) rank in the group, 0 .. size-1. */
    int rank();

    /** Number of ranks in the group. */
    int size();

    /** The backend whose tensors this communicator moves (and whose stream orders its collectives). */
    Backend backend();

    /** A short description for messages, e.g. "nccl world (rank 1 of 2)". */
    String describe();

    /**
     * All-to-all with equal splits: send [size*n, C] holds n rows for each peer in peer order; recv [size*n, C]
     * receives n rows from each peer in peer order.
     */
    void allToAll(Tensor send, Tensor recv);

    /**
     * All-to-all with variable splits. send [sum(sendRows), C]: rows sendRows[0] go to rank 0, the next sendRows[1]
     * to rank 1, ...; recv [sum(recvRows), C]: recvRows[p] rows from rank p, in rank order. recvRows[p] on this rank
     * must equal sendRows[rank] on rank p (the MoE layer learns it from a count exchange). Empty splits allowed.
     */
    void allToAllV(Tensor send, int[] sendRows, Tensor recv, int[] recvRows);

    /**
     * The count exchange before a variable all-to-all (once per MoE layer): sendCounts holds k counts for each rank
     * in rank order (e.g. tokens for each of its k local experts), length size*k; returns the k counts every rank
     * sent to this one, in rank order (length size*k). Every rank passes the same k. One small all-to-all plus one
     * host transfer.
     */
    default int[] exchangeCounts(int[] sendCounts) {
        int p = size();
        if (sendCounts == null || sendCounts.length % p != 0) {
            throw new IllegalArgumentException("exchangeCounts: sendCounts must hold k counts per rank, a multiple of the group size "
                    + p + " entries, got " + (sendCounts == null ? "null" : sendCounts.length));
        }
        int rows = sendCounts.length;
        if (rows == 0) return new int[0];
        Backend b = backend();
        try (Tensor s = b.fromInts(sendCounts, rows, 1); Tensor r = b.zeros(dev.moe4j.core.tensor.DType.I32, rows, 1)) {
            allToAll(s, r);
            return b.toInts(r);
        }
    }

    /** In place: t = op over all ranks of t (same shape and dtype everywhere). */
    void allReduce(Tensor t, ReduceOp op);

    /** In place sum over all ranks. */
    default void allReduce(Tensor t) { allReduce(t, ReduceOp.SUM); }

    /**
     * {@link #allReduce(Tensor, ReduceOp)} that may run beside the backend's later work (a GPU communicator uses
     * a side stream), so that e.g. gradient all-reduces overlap the rest of the backward. Call
     * {@link CommWork#await()} before anything reads or writes t. This default runs it at once.
     */
    default CommWork allReduceAsync(Tensor t, ReduceOp op) {
        allReduce(t, op);
        return CommWork.DONE;
    }

    /**
     * {@link #allToAllV} that may run beside the backend's later work (see {@link #allReduceAsync}); send and recv
     * must stay alive and untouched until {@link CommWork#await()}. This default runs it at once.
     */
    default CommWork allToAllVAsync(Tensor send, int[] sendRows, Tensor recv, int[] recvRows) {
        allToAllV(send, sendRows, recv, recvRows);
        return CommWork.DONE;
    }

    /**
     * Block exchange: an all-to-all whose rows come from, and land in, blocks anywhere in send and recv, so that
     * e.g. the MoE layer receives rows straight in its experts' order. send and recv are [rows, C] (same C and
     * dtype). Block i of sendBlocks, rows [start, start + rows) of send, goes to rank peer(i); block i of recvBlocks,
     * rows [start, start + rows) of recv, is filled from rank peer(i).
     *
     * <p>Pairing: the non-empty blocks this rank sends to rank q, in list order, pair one to one with the non-empty
     * blocks q lists as received from this rank, in list order, with equal row counts. Zero-row blocks need no
     * counterpart (both sides skip them). Blocks to and from this rank itself pair the same way and are local copies.
     * Lists may interleave peers. Received blocks must not overlap; recv rows outside them are left untouched; send
     * blocks may overlap. A communicator that sees every rank's lists (in-process) checks the pairing; others
     * (NCCL) check only this rank's own blocks, and a mismatch with a peer garbles the rows or times out.
     *
     * <p>This default packs the blocks per peer, runs {@link #allToAllV} and unpacks (a device copy per block);
     * NCCL and the in-process communicator move the blocks without those copies.
     */
    default void exchangeRows(Tensor send, RowBlocks sendBlocks, Tensor recv, RowBlocks recvBlocks) {
        CommChecks.exchangeRows("exchangeRows", this, send, sendBlocks, recv, recvBlocks);
        RowExchange.viaAllToAllV(this, send, sendBlocks, recv, recvBlocks);
    }

    /**
     * {@link #exchangeRows} that may run beside the backend's later work, as {@link #allToAllVAsync}: send and recv
     * must stay alive and untouched until {@link CommWork#await()}. This default runs it at once.
     */
    default CommWork exchangeRowsAsync(Tensor send, RowBlocks sendBlocks, Tensor recv, RowBlocks recvBlocks) {
        exchangeRows(send, sendBlocks, recv, recvBlocks);
        return CommWork.DONE;
    }

    /**
     * A {@link PeerWindow} of {@code bytes} on every rank of this group (collective: every rank calls it with the same
     * size), or null where the ranks cannot store into each other's memory (ranks on several hosts, GPUs without peer
     * access, a backend whose memory cannot be shared): the caller then moves its rows by the collectives. This default
     * has none.
     */
    default PeerWindow openWindow(long bytes) { return null; }

    /** recv (size * send.numel() elements) = the send tensors of ranks 0..size-1, concatenated in rank order. */
    void allGather(Tensor send, Tensor recv);

    /**
     * recv = block {@link #rank()} of op over all ranks of send, where send has size * recv.numel() elements
     * seen as size consecutive blocks.
     */
    void reduceScatter(Tensor send, Tensor recv, ReduceOp op);

    /** In place: every rank's t = root's t. */
    void broadcast(Tensor t, int root);

    /** Waits on the host until every rank has called barrier and this rank's queued collectives are done. */
    void barrier();

    /** Sends t to rank peer (matched by a {@link #recv} of the same element count and dtype there). */
    void send(Tensor t, int peer);

    /** Receives into t from rank peer. */
    void recv(Tensor t, int peer);

    /**
     * Collective: splits this group into sub-groups of the ranks that passed the same color (>= 0), ordered by
     * (key, rank). Returns the sub-group, or null for a negative color (the rank joins no group). The caller
     * closes the returned communicator; it shares this one's backend.
     */
    Communicator split(int color, int key);

    /** Releases the communicator (aborting it if a collective is still pending after a failure). Idempotent. */
    @Override
    void close();
}
