package dev.moe4j.core.comm;

import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;

/**
 * A receive buffer on every rank of a group that every rank of it can store into directly (CUDA: device memory shared
 * by IPC and written over NVLink by our own kernels), from {@link Communicator#openWindow}. It replaces an all-to-all
 * where the sender can compute where each row lands on its receiver: the sender's kernel stores the rows straight into
 * the receivers' windows, with no send buffer, no collective and no layout transform after it.
 *
 * <p>One exchange, called by every rank of the group in the same order (the windows count their exchanges):
 * <pre>
 *   w.open();       // this rank's window is ready (last contents read, its own writes to it queued before); waits
 *                   // until every peer's is, the first exchange included
 *   ... kernels store rows into w.tensor(q, ...) for any rank q (this rank's own included) ...
 *   w.publish();    // after those stores, tells every peer that this rank's rows have arrived
 *   ... other work that needs nothing of the exchange ...
 *   w.await();      // the backend's later work waits until every peer has published: w.tensor(rank()) holds the rows
 * </pre>
 * A window's contents stay valid until this rank's next {@link #open}. Each call is ordered on the backend's stream
 * (the host does not wait); a peer that dies or hangs fails the exchange within the communicator's timeout, naming it.
 */
public interface PeerWindow extends AutoCloseable {
    /** The bytes of each rank's window. */
    long bytes();

    /**
     * Rank q's window as a [rows, cols] tensor of dtype from its first byte (a view: closing it frees nothing). Stores
     * into another rank's window are valid between {@link #open} and {@link #publish}; reads of this rank's own after
     * {@link #await}.
     */
    Tensor tensor(int q, DType dtype, int rows, int cols);

    /** Starts an exchange (see the class comment). */
    void open();

    /** This rank's stores of the exchange are done. */
    void publish();

    /** Every rank's stores into this rank's window are done. */
    void await();

    /**
     * Frees this rank's window and unmaps the peers' (after its own queued work: the peers' stores into it ended with
     * the last {@link #await}, and none start before the next {@link #open}). Not collective. Idempotent.
     */
    @Override
    void close();

    /**
     * For {@link Communicator#openWindow}'s implementations, with every rank's size in hand (so that every rank decides
     * alike): throws, naming each rank's size, where they differ. A rank storing past a smaller peer window would write
     * into memory that is not the window's.
     */
    static void checkSameSize(long[] bytesOfRank, String group) {
        for (long b : bytesOfRank) {
            if (b != bytesOfRank[0]) {
                StringBuilder all = new StringBuilder();
                for (int q = 0; q < bytesOfRank.length; q++) all.append(q == 0 ? "" : ", ").append("rank ").append(q).append(": ").append(bytesOfRank[q]);
                throw new IllegalArgumentException("openWindow on " + group + ": every rank must ask for the same size (a collective), got "
                        + all + " bytes");
            }
        }
    }

    /** For {@link #tensor}'s implementations: throws where [rows, cols] of dtype does not fit a window of bytes. */
    static void checkFits(long bytes, DType dtype, int rows, int cols) {
        if (rows < 0 || cols < 0 || (long) rows * cols * dtype.bytes() > bytes) {
            throw new IllegalArgumentException("peer window of " + bytes + " bytes cannot hold " + dtype + "[" + rows + ", " + cols + "]");
        }
    }
}
