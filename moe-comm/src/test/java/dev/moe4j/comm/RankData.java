package dev.moe4j.comm;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.comm.RowBlocks;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;

import java.util.ArrayList;
import java.util.List;
import java.util.SplittableRandom;

/** Deterministic per-rank test inputs, reproducible on the host for the serial references. */
public final class RankData {
    private RankData() {}

    /** n values for (rank, tag), rounded to dtype (integers in [-50, 50) for I32); never all zero. */
    public static double[] values(DType dt, long tag, int rank, int n) {
        SplittableRandom rnd = new SplittableRandom(tag * 1_000_003L + rank * 7919L + 17);
        double[] v = new double[n];
        for (int i = 0; i < n; i++) {
            v[i] = dt == DType.I32 ? rnd.nextInt(-50, 50) : dt.round(rnd.nextDouble(-2, 2));
        }
        return v;
    }

    public static Tensor tensor(Backend b, DType dt, double[] v, int rows, int cols) {
        if (dt == DType.I32) {
            int[] iv = new int[v.length];
            for (int i = 0; i < v.length; i++) iv[i] = (int) v[i];
            return b.fromInts(iv, rows, cols);
        }
        return b.fromDoubles(dt, v, rows, cols);
    }

    public static double[] read(Tensor t) { return HostIO.read(t); }

    /**
     * counts[s][d]: rows rank s sends to rank d, in [0, 4), with empty splits forced where (s + 2d) % 3 == 0 and
     * one rank that sends nothing at all.
     */
    public static int[][] counts(int p, long tag) {
        SplittableRandom rnd = new SplittableRandom(tag);
        int[][] c = new int[p][p];
        for (int s = 0; s < p; s++) {
            for (int d = 0; d < p; d++) c[s][d] = (s + 2 * d) % 3 == 0 || s == p - 1 ? 0 : rnd.nextInt(1, 4);
        }
        return c;
    }

    public static int sum(int[] a) {
        int s = 0;
        for (int x : a) s += x;
        return s;
    }

    public static int[] column(int[][] c, int d) {
        int[] out = new int[c.length];
        for (int s = 0; s < c.length; s++) out[s] = c[s][d];
        return out;
    }

    /** The flat all-to-all result on rank d, computed serially from every rank's input. */
    public static double[] allToAllReference(DType dt, long tag, int[][] counts, int cols, int d) {
        int p = counts.length;
        double[] out = new double[sum(column(counts, d)) * cols];
        int at = 0;
        for (int s = 0; s < p; s++) {
            double[] in = values(dt, tag, s, sum(counts[s]) * cols);
            int from = 0;
            for (int q = 0; q < d; q++) from += counts[s][q];
            System.arraycopy(in, from * cols, out, at, counts[s][d] * cols);
            at += counts[s][d] * cols;
        }
        return out;
    }

    /** A block exchange of p ranks: each rank's send and recv tensor rows and its block lists. */
    public record BlockPlan(int[] sendTensorRows, int[] recvTensorRows, RowBlocks[] send, RowBlocks[] recv) {}

    /**
     * A random {@code Communicator.exchangeRows} plan: 0-3 blocks of 0-4 rows per ordered pair of ranks (self pairs
     * at least 2, some pairs none), lists interleaving peers, blocks placed in random order with gaps (recv rows
     * outside them must stay untouched); receivers drop the senders' zero-row blocks and list zero-row blocks of
     * their own.
     */
    public static BlockPlan blockPlan(int p, long tag) {
        SplittableRandom rnd = new SplittableRandom(tag);
        int[][][] seq = new int[p][p][];   // seq[s][d]: rows of the blocks s sends d, in order
        for (int s = 0; s < p; s++) {
            for (int d = 0; d < p; d++) {
                int m = s == d ? rnd.nextInt(2, 4) : (s + 2 * d) % 3 == 0 ? 0 : rnd.nextInt(0, 4);
                seq[s][d] = new int[m];
                for (int i = 0; i < m; i++) seq[s][d][i] = rnd.nextInt(0, 5);
            }
        }
        int[] sendTensorRows = new int[p], recvTensorRows = new int[p];
        RowBlocks[] send = new RowBlocks[p], recv = new RowBlocks[p];
        for (int r = 0; r < p; r++) {
            List<int[]> out = new ArrayList<>(), in = new ArrayList<>();   // {peer, rows}, per-peer order kept
            for (int d = 0; d < p; d++) for (int x : seq[r][d]) out.add(new int[] {d, x});
            for (int s = 0; s < p; s++) {
                for (int x : seq[s][r]) {
                    if (rnd.nextInt(4) == 0) in.add(new int[] {s, 0});   // an extra empty block
                    if (x > 0) in.add(new int[] {s, x});
                }
            }
            out = interleave(out, rnd);
            in = interleave(in, rnd);
            int[][] so = place(out, rnd), ri = place(in, rnd);
            send[r] = new RowBlocks(so[0], so[1], so[2]);
            recv[r] = new RowBlocks(ri[0], ri[1], ri[2]);
            sendTensorRows[r] = so[3][0];
            recvTensorRows[r] = ri[3][0];
        }
        return new BlockPlan(sendTensorRows, recvTensorRows, send, recv);
    }

    /** A random merge of the per-peer sequences (each peer's blocks keep their order). */
    private static List<int[]> interleave(List<int[]> blocks, SplittableRandom rnd) {
        List<List<int[]>> byPeer = new ArrayList<>();
        for (int[] b : blocks) {
            while (byPeer.size() <= b[0]) byPeer.add(new ArrayList<>());
            byPeer.get(b[0]).add(b);
        }
        List<int[]> out = new ArrayList<>();
        int[] next = new int[byPeer.size()];
        while (out.size() < blocks.size()) {
            int q = rnd.nextInt(byPeer.size());
            if (next[q] < byPeer.get(q).size()) out.add(byPeer.get(q).get(next[q]++));
        }
        return out;
    }

    /** {peers, starts, rows, {tensor rows}}: the blocks laid out in a random order with gaps of 0-2 rows. */
    private static int[][] place(List<int[]> blocks, SplittableRandom rnd) {
        int n = blocks.size();
        int[] peer = new int[n], start = new int[n], rows = new int[n], order = new int[n];
        for (int i = 0; i < n; i++) {
            peer[i] = blocks.get(i)[0];
            rows[i] = blocks.get(i)[1];
            order[i] = i;
        }
        for (int i = n - 1; i > 0; i--) {
            int j = rnd.nextInt(i + 1), t = order[i];
            order[i] = order[j];
            order[j] = t;
        }
        int at = 0;
        for (int i : order) {
            at += rnd.nextInt(0, 3);
            start[i] = at;
            at += rows[i];
        }
        return new int[][] {peer, start, rows, {at + rnd.nextInt(0, 2)}};
    }

    /** Rank d's send data of a block plan (values(dt, tag, d, ...)) and its recv tensor's initial data. */
    public static double[] blockSendValues(DType dt, long tag, BlockPlan plan, int cols, int d) {
        return values(dt, tag, d, plan.sendTensorRows()[d] * cols);
    }

    public static double[] blockRecvInitial(DType dt, long tag, BlockPlan plan, int cols, int d) {
        return values(dt, tag + 7777, d, plan.recvTensorRows()[d] * cols);
    }

    /** The block exchange's result on rank d, computed serially from every rank's send data and the pairing rule. */
    public static double[] blockReference(DType dt, long tag, BlockPlan plan, int cols, int d) {
        double[] out = blockRecvInitial(dt, tag, plan, cols, d);
        RowBlocks rb = plan.recv()[d];
        for (int s = 0; s < plan.send().length; s++) {
            double[] in = blockSendValues(dt, tag, plan, cols, s);
            RowBlocks sb = plan.send()[s];
            int[] mine = rb.nonEmptyWith(s), theirs = sb.nonEmptyWith(d);
            if (mine.length != theirs.length) throw new IllegalStateException("plan does not pair " + s + " -> " + d);
            for (int k = 0; k < mine.length; k++) {
                if (rb.rows(mine[k]) != sb.rows(theirs[k])) throw new IllegalStateException("plan does not pair " + s + " -> " + d);
                System.arraycopy(in, sb.start(theirs[k]) * cols, out, rb.start(mine[k]) * cols, rb.rows(mine[k]) * cols);
            }
        }
        return out;
    }
}
