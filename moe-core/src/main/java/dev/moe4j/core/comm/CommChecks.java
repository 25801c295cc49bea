package dev.moe4j.core.comm;

import dev.moe4j.core.tensor.Tensor;

import java.util.Arrays;

/** Argument checks shared by communicators, so every implementation rejects bad input with the same message. */
public final class CommChecks {
    private CommChecks() {}

    public static void tensor(String op, String name, Communicator c, Tensor t) {
        if (t == null) throw new IllegalArgumentException(op + ": " + name + " is null");
        if (t.isClosed()) throw new IllegalStateException(op + ": " + name + " was closed");
        if (t.backend() != c.backend()) {
            throw new IllegalArgumentException(op + ": " + name + " lives on backend " + t.backend().name()
                    + ", but the communicator moves tensors of " + c.backend().name());
        }
    }

    public static void sameDtype(String op, Tensor a, Tensor b) {
        if (a.dtype() != b.dtype()) {
            throw new IllegalArgumentException(op + ": send is " + a.dtype() + " but recv is " + b.dtype() + " (dtypes must match)");
        }
    }

    public static void peer(String op, String name, Communicator c, int peer) {
        if (peer < 0 || peer >= c.size()) {
            throw new IllegalArgumentException(op + ": " + name + " must be in [0, " + c.size() + "), got " + peer);
        }
    }

    /** Equal all-to-all: send and recv [size*n, C]. Returns n, the rows per peer. */
    public static int allToAll(Communicator c, Tensor send, Tensor recv) {
        String op = "allToAll";
        tensor(op, "send", c, send);
        tensor(op, "recv", c, recv);
        sameDtype(op, send, recv);
        if (send.cols() != recv.cols() || send.rows() != recv.rows()) {
            throw new IllegalArgumentException(op + ": send " + send.shape() + " and recv " + recv.shape()
                    + " must have the same [rows, cols] (equal splits)");
        }
        if (send.rows() % c.size() != 0) {
            throw new IllegalArgumentException(op + ": send has " + send.rows() + " rows, not divisible by the group size "
                    + c.size() + " (use allToAllV for uneven splits)");
        }
        return send.rows() / c.size();
    }

    /** Variable all-to-all: splits of length size, non-negative, summing to the tensors' rows. */
    public static void allToAllV(Communicator c, Tensor send, int[] sendRows, Tensor recv, int[] recvRows) {
        String op = "allToAllV";
        tensor(op, "send", c, send);
        tensor(op, "recv", c, recv);
        sameDtype(op, send, recv);
        if (send.cols() != recv.cols()) {
            throw new IllegalArgumentException(op + ": send " + send.shape() + " and recv " + recv.shape() + " must have the same last dimension");
        }
        splits(op, "sendRows", c.size(), sendRows, send);
        splits(op, "recvRows", c.size(), recvRows, recv);
    }

    /**
     * Block exchange ({@link Communicator#exchangeRows}): dtypes and columns match, every block names a rank of the
     * group and fits in its tensor, the received blocks do not overlap, and the blocks to and from this rank itself
     * pair up. (Pairing with other ranks is the peers' business: only a communicator that sees both sides can check it.)
     */
    public static void exchangeRows(String op, Communicator c, Tensor send, RowBlocks sendBlocks, Tensor recv, RowBlocks recvBlocks) {
        tensor(op, "send", c, send);
        tensor(op, "recv", c, recv);
        sameDtype(op, send, recv);
        if (send.cols() != recv.cols()) {
            throw new IllegalArgumentException(op + ": send " + send.shape() + " and recv " + recv.shape() + " must have the same last dimension");
        }
        blocks(op, "sendBlocks", c, sendBlocks, "send", send);
        blocks(op, "recvBlocks", c, recvBlocks, "recv", recv);
        long[] spans = new long[recvBlocks.count()];   // (start << 32 | block) of the non-empty received blocks, sorted
        int n = 0;
        for (int i = 0; i < recvBlocks.count(); i++) if (recvBlocks.rows(i) > 0) spans[n++] = ((long) recvBlocks.start(i) << 32) | i;
        Arrays.sort(spans, 0, n);
        for (int k = 1; k < n; k++) {
            int a = (int) spans[k - 1], b = (int) spans[k];
            if (recvBlocks.start(a) + recvBlocks.rows(a) > recvBlocks.start(b)) {
                throw new IllegalArgumentException(op + ": recvBlocks " + a + " (rows " + span(recvBlocks, a) + ") and " + b + " (rows "
                        + span(recvBlocks, b) + ") overlap");
            }
        }
        pairing(op, c.rank(), c.rank(), sendBlocks.rowsWith(c.rank()), recvBlocks.rowsWith(c.rank()));
    }

    private static void blocks(String op, String name, Communicator c, RowBlocks blocks, String tensorName, Tensor t) {
        if (blocks == null) throw new IllegalArgumentException(op + ": " + name + " is null (use RowBlocks.NONE for no blocks)");
        for (int i = 0; i < blocks.count(); i++) {
            int p = blocks.peer(i), s = blocks.start(i), r = blocks.rows(i);
            if (p < 0 || p >= c.size()) throw new IllegalArgumentException(op + ": " + name + " block " + i + " names peer " + p + ", not in [0, " + c.size() + ")");
            if (r < 0) throw new IllegalArgumentException(op + ": " + name + " block " + i + " has " + r + " rows (must be >= 0)");
            if (s < 0 || (long) s + r > t.rows()) {
                throw new IllegalArgumentException(op + ": " + name + " block " + i + " (rows " + span(blocks, i) + ") does not fit in "
                        + tensorName + "'s " + t.rows() + " rows " + t.shape());
            }
        }
    }

    private static String span(RowBlocks b, int i) { return "[" + b.start(i) + ", " + ((long) b.start(i) + b.rows(i)) + ")"; }

    /**
     * The pairing rule of {@link Communicator#exchangeRows}: the non-empty blocks rank {@code from} sends to rank
     * {@code to} ({@code sent}, row counts in its list order) and those {@code to} lists as received from {@code from}
     * pair one to one with equal rows.
     */
    public static void pairing(String op, int from, int to, int[] sent, int[] received) {
        if (Arrays.equals(sent, received)) return;
        throw new IllegalArgumentException(op + ": rank " + from + " sends rank " + to + " blocks of " + Arrays.toString(sent)
                + " rows, but rank " + to + " lists blocks of " + Arrays.toString(received) + " rows as received from rank " + from
                + " (the non-empty blocks pair one to one in list order, with equal row counts)");
    }

    static void splits(String op, String name, int size, int[] rows, Tensor t) {
        if (rows == null) throw new IllegalArgumentException(op + ": " + name + " is null");
        if (rows.length != size) {
            throw new IllegalArgumentException(op + ": " + name + " has " + rows.length + " entries, expected one per rank (" + size + ")");
        }
        long sum = 0;
        for (int p = 0; p < size; p++) {
            if (rows[p] < 0) throw new IllegalArgumentException(op + ": " + name + "[" + p + "] = " + rows[p] + " must be >= 0");
            sum += rows[p];
        }
        if (sum != t.rows()) {
            throw new IllegalArgumentException(op + ": " + name + " " + Arrays.toString(rows) + " sums to " + sum
                    + " but the tensor has " + t.rows() + " rows " + t.shape());
        }
    }

    public static void allGather(Communicator c, Tensor send, Tensor recv) {
        String op = "allGather";
        tensor(op, "send", c, send);
        tensor(op, "recv", c, recv);
        sameDtype(op, send, recv);
        if (recv.numel() != send.numel() * c.size()) {
            throw new IllegalArgumentException(op + ": recv has " + recv.numel() + " elements " + recv.shape() + ", expected size * send = "
                    + c.size() + " * " + send.numel());
        }
    }

    public static void reduceScatter(Communicator c, Tensor send, Tensor recv, ReduceOp rop) {
        String op = "reduceScatter";
        tensor(op, "send", c, send);
        tensor(op, "recv", c, recv);
        sameDtype(op, send, recv);
        if (rop == null) throw new IllegalArgumentException(op + ": op is null");
        if (send.numel() != recv.numel() * c.size()) {
            throw new IllegalArgumentException(op + ": send has " + send.numel() + " elements " + send.shape() + ", expected size * recv = "
                    + c.size() + " * " + recv.numel());
        }
    }

    public static void allReduce(Communicator c, Tensor t, ReduceOp rop) {
        tensor("allReduce", "t", c, t);
        if (rop == null) throw new IllegalArgumentException("allReduce: op is null");
    }

    public static void broadcast(Communicator c, Tensor t, int root) {
        tensor("broadcast", "t", c, t);
        peer("broadcast", "root", c, root);
    }

    public static void pointToPoint(String op, Communicator c, Tensor t, int peer) {
        tensor(op, "t", c, t);
        peer(op, "peer", c, peer);
        if (peer == c.rank()) throw new IllegalArgumentException(op + ": peer must differ from this rank (" + peer + ")");
    }

    /** Prefix sums: offsets[p] = sum of rows[0..p), offsets[size] = total. */
    public static int[] offsets(int[] rows) {
        int[] o = new int[rows.length + 1];
        for (int p = 0; p < rows.length; p++) o[p + 1] = o[p] + rows[p];
        return o;
    }
}
