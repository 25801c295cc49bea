package dev.moe4j.core.backend;

/**
 * Where every routed row of an expert-parallel group lives, from the group's routing alone (the host form of
 * {@link Backend#epDispatchDestinations}): P ranks, rank q owning the El = E / P experts [q*El, (q+1)*El); rank p's
 * dispatch buffer holds its rows sorted by global expert (counts[p*E + e] of them for expert e). Owner q's input holds
 * its experts in order, each expert's rows by source rank (j, p, i); q pads each expert to its largest one's rows
 * (most_q) where El * most_q &lt;= maxPadding * rows_q (rows_q all its rows), so that its experts run as equal groups.
 */
public final class ExpertLayout {
    private final int P, E, El;
    private final int[] counts;
    private final int[] most, rows;   // per owner: largest local expert, all rows routed to it
    private final boolean[] padded;

    /** counts [P * E], maxPadding &gt;= 0 (0: never pads, infinity: always). */
    public ExpertLayout(int[] counts, int P, double maxPadding) {
        if (P < 1 || counts.length % P != 0 || (counts.length / P) % P != 0) {
            throw new IllegalArgumentException("ExpertLayout: " + counts.length + " counts for " + P + " ranks (expected P * E with E a multiple of P)");
        }
        this.P = P;
        this.E = counts.length / P;
        this.El = E / P;
        this.counts = counts;
        this.most = new int[P];
        this.rows = new int[P];
        this.padded = new boolean[P];
        for (int q = 0; q < P; q++) {
            for (int j = 0; j < El; j++) {
                int c = expertRows(q * El + j);
                most[q] = Math.max(most[q], c);
                rows[q] += c;
            }
            padded[q] = pads(maxPadding, (long) El * most[q], rows[q]);
        }
    }

    /**
     * Whether {@code rows} routed rows are padded to {@code paddedRows} under maxPadding (padded rows at most that many
     * times the routed rows; 0: never, infinity: always): the one padding decision of dropless layers.
     */
    public static boolean pads(double maxPadding, long paddedRows, long rows) {
        return rows > 0 && maxPadding > 0 && paddedRows <= maxPadding * rows;
    }

    /** Rows routed to global expert e by the whole group. */
    public int expertRows(int e) {
        int c = 0;
        for (int p = 0; p < P; p++) c += counts[p * E + e];
        return c;
    }

    /** Whether owner q pads its experts. */
    public boolean padded(int q) { return padded[q]; }

    /** Owner q's largest local expert's rows. */
    public int most(int q) { return most[q]; }

    /** Owner q's input rows, padding included. */
    public int inputRows(int q) { return padded[q] ? El * most[q] : rows[q]; }

    /** The largest input of any owner, padding included (the windows X and DY must hold it). */
    public int largestInput() {
        int m = 0;
        for (int q = 0; q < P; q++) m = Math.max(m, inputRows(q));
        return m;
    }

    /** Rank p's dispatch buffer rows (all its choices). */
    public int bufRows(int p) {
        int r = 0;
        for (int e = 0; e < E; e++) r += counts[p * E + e];
        return r;
    }

    /** The largest dispatch buffer of any rank (the windows Y and DX must hold it). */
    public int largestBuf() {
        int m = 0;
        for (int p = 0; p < P; p++) m = Math.max(m, bufRows(p));
        return m;
    }

    /** Where source p's rows for global expert e start in the owner's input. */
    public int start(int e, int p) {
        int q = e / El, j = e % El, at = 0;
        if (padded[q]) at = j * most[q];
        else for (int jj = 0; jj < j; jj++) at += expertRows(q * El + jj);
        for (int pp = 0; pp < p; pp++) at += counts[pp * E + e];
        return at;
    }

    /**
     * (owner, row in the owner's input) of each row of rank me's dispatch buffer, as pairs; rows at or beyond windowRows
     * (-1, row): nowhere (the window must grow first).
     */
    public int[] dispatch(int me, long windowRows) {
        int[] d = new int[2 * bufRows(me)];
        int r = 0;
        for (int e = 0; e < E; e++) {
            int at = start(e, me), q = e / El;
            for (int i = 0; i < counts[me * E + e]; i++, r++) {
                d[2 * r] = at + i < windowRows ? q : -1;
                d[2 * r + 1] = at + i;
            }
        }
        return d;
    }

    /** (source, row in the source's dispatch buffer) of each row of owner me's input, as pairs; padding rows (-1, 0). */
    public int[] combine(int me) {
        int[] c = new int[2 * inputRows(me)];
        java.util.Arrays.fill(c, -1);
        for (int p = 0; p < P; p++) {
            int bufAt = 0;
            for (int e = 0; e < E; e++) {
                int n = counts[p * E + e];
                if (e / El == me) {
                    int at = start(e, p);
                    for (int i = 0; i < n; i++) {
                        c[2 * (at + i)] = p;
                        c[2 * (at + i) + 1] = bufAt + i;
                    }
                }
                bufAt += n;
            }
        }
        for (int i = 1; i < c.length; i += 2) if (c[i] < 0) c[i] = 0;
        return c;
    }

    /** Owner me's rows per local expert (before padding). */
    public int[] localCounts(int me) {
        int[] c = new int[El];
        for (int j = 0; j < El; j++) c[j] = expertRows(me * El + j);
        return c;
    }
}
