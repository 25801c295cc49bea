package dev.moe4j.core.comm;

import java.util.Arrays;

/**
 * The block list of one side of {@link Communicator#exchangeRows}: block i is rows
 * [{@link #start}(i), start(i) + {@link #rows}(i)) of a [rows, cols] tensor, sent to (or received from) rank
 * {@link #peer}(i). Immutable (the arrays are copied), so a routing can build it once and reuse it.
 */
public final class RowBlocks {
    /** No blocks. */
    public static final RowBlocks NONE = new RowBlocks(new int[0], new int[0], new int[0]);

    private final int[] peer, start, rows;

    /** Blocks i = 0 .. n-1 of the three arrays (same length n); their values are checked by the exchange. */
    public RowBlocks(int[] peer, int[] start, int[] rows) {
        if (peer == null || start == null || rows == null) {
            throw new IllegalArgumentException("RowBlocks: peer, start and rows must not be null");
        }
        if (peer.length != start.length || peer.length != rows.length) {
            throw new IllegalArgumentException("RowBlocks: peer, start and rows must have one entry per block, got lengths "
                    + peer.length + ", " + start.length + ", " + rows.length);
        }
        this.peer = peer.clone();
        this.start = start.clone();
        this.rows = rows.clone();
    }

    /** Number of blocks (empty ones included). */
    public int count() { return peer.length; }

    public int peer(int i) { return peer[i]; }

    public int start(int i) { return start[i]; }

    public int rows(int i) { return rows[i]; }

    /** The indices of the non-empty blocks with rank q, in list order (the blocks that pair with q's). */
    public int[] nonEmptyWith(int q) {
        int n = 0;
        for (int i = 0; i < peer.length; i++) if (peer[i] == q && rows[i] > 0) n++;
        int[] out = new int[n];
        for (int i = 0, k = 0; i < peer.length; i++) if (peer[i] == q && rows[i] > 0) out[k++] = i;
        return out;
    }

    /** The row counts of {@link #nonEmptyWith}(q), in list order. */
    public int[] rowsWith(int q) {
        int[] idx = nonEmptyWith(q);
        int[] out = new int[idx.length];
        for (int k = 0; k < idx.length; k++) out[k] = rows[idx[k]];
        return out;
    }

    /** Total rows per rank, for a group of {@code size} ranks (peers out of range are not counted). */
    public int[] rowsPerPeer(int size) {
        int[] out = new int[size];
        for (int i = 0; i < peer.length; i++) if (peer[i] >= 0 && peer[i] < size) out[peer[i]] += rows[i];
        return out;
    }

    @Override
    public String toString() {
        return "RowBlocks(peer " + Arrays.toString(peer) + ", start " + Arrays.toString(start) + ", rows " + Arrays.toString(rows) + ")";
    }
}
