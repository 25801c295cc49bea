package dev.moe4j.core.backend;

import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;

/** Argument checks shared by backends, so every backend rejects bad input with the same message. */
public final class Checks {
    private Checks() {}

    public static void numel(String op, String name, Tensor t, long expected) {
        if (t.numel() != expected) {
            throw new IllegalArgumentException(op + ": " + name + " has " + t.numel() + " elements " + t.shape() + ", expected " + expected);
        }
    }

    /** t seen as a matrix must be [rows, cols]. */
    public static void matrix(String op, String name, Tensor t, long rows, long cols) {
        if (t.cols() != cols || t.rows() != rows) {
            throw new IllegalArgumentException(op + ": " + name + " is " + t.shape() + ", expected [" + rows + ", " + cols + "] (leading dims flattened)");
        }
    }

    public static void cols(String op, String name, Tensor t, int cols) {
        if (t.cols() != cols) {
            throw new IllegalArgumentException(op + ": " + name + " is " + t.shape() + ", expected last dimension " + cols);
        }
    }

    public static void dtype(String op, String name, Tensor t, DType expected) {
        if (t.dtype() != expected) throw new IllegalArgumentException(op + ": " + name + " must be " + expected + ", got " + t.dtype());
    }

    public static void floating(String op, String name, Tensor t) {
        if (!t.dtype().isFloating()) throw new IllegalArgumentException(op + ": " + name + " must be a floating tensor, got " + t.dtype());
    }

    public static void rank(String op, String name, Tensor t, int rank) {
        if (t.rank() != rank) throw new IllegalArgumentException(op + ": " + name + " must have rank " + rank + ", got " + t.shape());
    }

    public static void open(String op, String name, Tensor t) {
        if (t == null) throw new IllegalArgumentException(op + ": " + name + " is null");
        if (t.isClosed()) throw new IllegalStateException(op + ": " + name + " was closed");
    }

    /** {@link Backend#scatterRowsTo}'s arguments: dest I32 [src.rows, 2], every destination of src's dtype and width. */
    public static void scatterRowsTo(Tensor src, Tensor dest, Tensor[] dsts) {
        open("scatterRowsTo", "src", src);
        rowDestinations("scatterRowsTo", src.rows(), src.cols(), src.dtype(), dest, dsts);
    }

    /**
     * The destinations of rows rows of cols dtype elements scattered over dsts (scatterRowsTo's form): dest I32
     * [rows, 2], each of dsts open, of that width and dtype.
     */
    public static void rowDestinations(String op, long rows, int cols, DType dtype, Tensor dest, Tensor[] dsts) {
        dtype(op, "dest", dest, DType.I32);
        matrix(op, "dest", dest, rows, 2);
        if (dsts == null || dsts.length == 0) throw new IllegalArgumentException(op + ": no destinations");
        for (int q = 0; q < dsts.length; q++) {
            String name = "dsts[" + q + "]";
            open(op, name, dsts[q]);
            cols(op, name, dsts[q], cols);
            dtype(op, name, dsts[q], dtype);
        }
    }

    public static void positive(String op, String name, long v) {
        if (v <= 0) throw new IllegalArgumentException(op + ": " + name + " must be > 0, got " + v);
    }

    /**
     * Expert segment offsets of a grouped product (read to the host): offsets[0] = 0, non-decreasing, ending at
     * most at {@code rows}. Returns {@code offs}.
     */
    public static int[] groupOffsets(String op, int[] offs, int rows) {
        if (offs[0] != 0) throw new IllegalArgumentException(op + ": offsets[0] must be 0, got " + offs[0]);
        for (int i = 1; i < offs.length; i++) {
            if (offs[i] < offs[i - 1]) throw new IllegalArgumentException(op + ": offsets must be non-decreasing, offsets[" + i + "] = " + offs[i] + " < " + offs[i - 1]);
        }
        if (offs[offs.length - 1] > rows) throw new IllegalArgumentException(op + ": offsets end at " + offs[offs.length - 1] + " but a has " + rows + " rows");
        return offs;
    }

    /**
     * Shapes of {@link Backend#matmul}: A, B, C all rank 2 or all rank 3 with one batch size, op(A) [m,k],
     * op(B) [k,n], C [m,n]. Returns {batch, m, n, k}.
     */
    public static int[] matmul(Tensor a, boolean transA, Tensor b, boolean transB, Tensor c) {
        String op = "matmul";
        if (a.rank() != b.rank() || a.rank() != c.rank() || (a.rank() != 2 && a.rank() != 3)) {
            throw new IllegalArgumentException(op + ": A, B and C must all be rank 2 or all rank 3, got " + a.shape() + ", " + b.shape() + ", " + c.shape());
        }
        int batch = a.rank() == 3 ? a.dim(0) : 1;
        if (a.rank() == 3 && (b.dim(0) != batch || c.dim(0) != batch)) {
            throw new IllegalArgumentException(op + ": batch sizes differ: " + a.shape() + ", " + b.shape() + ", " + c.shape());
        }
        int ar = a.dim(-2), ac = a.dim(-1), br = b.dim(-2), bc = b.dim(-1);
        int m = transA ? ac : ar, k = transA ? ar : ac;
        int kb = transB ? bc : br, n = transB ? br : bc;
        if (k != kb) throw new IllegalArgumentException(op + ": inner dimensions differ: op(A) is [" + m + ", " + k + "], op(B) is [" + kb + ", " + n + "]");
        if (c.dim(-2) != m || c.dim(-1) != n) throw new IllegalArgumentException(op + ": C is " + c.shape() + ", expected [" + m + ", " + n + "]");
        return new int[] {batch, m, n, k};
    }

    /**
     * The shapes of {@link Backend#groupedMatmul}: W [E,K,N] (or [E,N,K] with transW), A [T,K], C [T,N], offsets
     * I32 [E+1]. Returns {E, K, N, T}.
     */
    public static int[] groupedMatmul(String op, Tensor a, Tensor w, boolean transW, Tensor offsets, Tensor c) {
        rank(op, "w", w, 3);
        dtype(op, "offsets", offsets, DType.I32);
        int e = w.dim(0), k = transW ? w.dim(2) : w.dim(1), n = transW ? w.dim(1) : w.dim(2);
        numel(op, "offsets", offsets, e + 1L);
        cols(op, "a", a, k);
        cols(op, "c", c, n);
        int t = a.rows();
        if (c.rows() != t) throw new IllegalArgumentException(op + ": c has " + c.rows() + " rows, a has " + t);
        return new int[] {e, k, n, t};
    }

    /** The shapes of {@link Backend#groupedMatmulWeightGrad}: dW [E,K,N], A [T,K], dY [T,N], offsets I32 [E+1]. Returns {E, K, N, T}. */
    public static int[] groupedMatmulWeightGrad(String op, Tensor a, Tensor dy, Tensor offsets, Tensor dw) {
        rank(op, "dw", dw, 3);
        dtype(op, "offsets", offsets, DType.I32);
        int e = dw.dim(0), k = dw.dim(1), n = dw.dim(2);
        numel(op, "offsets", offsets, e + 1L);
        cols(op, "a", a, k);
        cols(op, "dy", dy, n);
        int t = a.rows();
        if (dy.rows() != t) throw new IllegalArgumentException(op + ": dy has " + dy.rows() + " rows, a has " + t);
        return new int[] {e, k, n, t};
    }

    /** The shapes of fused attention: qkv [B,T,3C], C divisible by heads, out [B*T, C], lse [B*heads*T]. Returns {B, T, C, C/heads}. */
    public static int[] attention(String op, Tensor qkv, int heads, Tensor out, Tensor lse) {
        rank(op, "qkv", qkv, 3);
        int b = qkv.dim(0), t = qkv.dim(1), c3 = qkv.dim(2);
        if (c3 % 3 != 0) throw new IllegalArgumentException(op + ": qkv last dimension " + c3 + " is not 3*C");
        int c = c3 / 3;
        positive(op, "heads", heads);
        if (c % heads != 0) throw new IllegalArgumentException(op + ": channels " + c + " not divisible by heads " + heads);
        matrix(op, "out", out, (long) b * t, c);
        numel(op, "lse", lse, (long) b * heads * t);
        return new int[] {b, t, c, c / heads};
    }

    /** The outputs of {@link Backend#moeGate} for S tokens, E experts, k choices (see {@link GateOutputs}). */
    public static void gateOutputs(String op, GateOutputs o, int s, int e, int k) {
        if (o == null) throw new IllegalArgumentException(op + ": outputs are null");
        open(op, "gates", o.gates());
        floating(op, "gates", o.gates());
        matrix(op, "gates", o.gates(), s, e);
        for (var t : new Tensor[] {o.experts(), o.dest()}) open(op, "experts/dest", t);
        dtype(op, "experts", o.experts(), DType.I32);
        matrix(op, "experts", o.experts(), s, k);
        dtype(op, "dest", o.dest(), DType.I32);
        matrix(op, "dest", o.dest(), s, k);
        open(op, "weights", o.weights());
        floating(op, "weights", o.weights());
        matrix(op, "weights", o.weights(), s, k);
        open(op, "counts", o.counts());
        dtype(op, "counts", o.counts(), DType.I32);
        numel(op, "counts", o.counts(), e);
        open(op, "offsets", o.offsets());
        dtype(op, "offsets", o.offsets(), DType.I32);
        numel(op, "offsets", o.offsets(), e + 1L);
        open(op, "losses", o.losses());
        floating(op, "losses", o.losses());
        numel(op, "losses", o.losses(), 2);
    }

    /** {@link Backend#moeGatePad}'s operands: one gate call's outputs, dest I32 [S,k], offsets I32 [E+1], capacity &gt;= 1. */
    public static void gatePad(String op, GateOutputs dropless, int capacity, Tensor dest, Tensor offsets) {
        if (dropless == null) throw new IllegalArgumentException(op + ": outputs are null");
        open(op, "dest", dropless.dest());
        open(op, "counts", dropless.counts());
        int s = dropless.dest().dim(0), k = dropless.dest().dim(1), e = dropless.counts().dim(0);
        gateOutputs(op, dropless, s, e, k);
        open(op, "dest", dest);
        dtype(op, "dest", dest, DType.I32);
        matrix(op, "dest", dest, s, k);
        open(op, "offsets", offsets);
        dtype(op, "offsets", offsets, DType.I32);
        numel(op, "offsets", offsets, e + 1L);
        if (capacity < 1) throw new IllegalArgumentException(op + ": capacity must be >= 1, got " + capacity);
    }
}
