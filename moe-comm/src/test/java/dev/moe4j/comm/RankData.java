package dev.moe4j.comm;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;

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
}
