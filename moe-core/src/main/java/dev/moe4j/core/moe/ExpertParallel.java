package dev.moe4j.core.moe;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.backend.GateOutputs;
import dev.moe4j.core.comm.CommWork;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;

/**
 * The expert-parallel middle of an {@link MoE} layer (DeepSpeed's {@code _AllToAll} around the experts): P ranks
 * of an expert-parallel group, rank q holding the El = E/P experts [q*El, (q+1)*El).
 *
 * <p>The dispatch buffer buf [R, M] is sorted by global expert (capacity: slot e*C + c, R = E*C; dropless: the
 * gate's expert-sorted S*k rows), so the rows for rank q are one contiguous block. Forward:
 * <pre>
 *   buf [R, M] --all-to-all (splits by owner)--&gt; recv [Rq, M] ordered (source p, local expert j, row)
 *       --gather (layout transform)--&gt; xin [Rq, M] ordered (j, p, row): one segment per local expert
 *       --grouped expert FFN--&gt; yl [Rq, M]
 *       --gather (inverse transform)--&gt; (p, j, row) --reverse all-to-all--&gt; y [R, M] in buf's layout
 * </pre>
 * The backward runs the same four moves on the gradients: all-to-all, transform, expert backward, inverse
 * transform, reverse all-to-all. Capacity mode moves equal splits (El*C rows per peer) and needs no count;
 * dropless mode all-gathers the per-expert counts of the group once per layer (one small collective and one host
 * read, which the variable splits need), and never pads.
 */
final class ExpertParallel {
    private ExpertParallel() {}

    /** The routing of one forward, kept for its backward. */
    static final class Route implements AutoCloseable {
        final int[] sendRows, recvRows;  // rows to / from each rank of the group
        final boolean equal;             // capacity mode: every split is El*C
        final int localRows;             // Rq: rows this rank's experts process
        final int[] localCounts;         // rows per local expert
        final int capacity;              // capacity mode's C (0: dropless)
        int[] hostOffsets;               // the offsets below, on the host (the grouped GEMMs need no device read)
        Tensor packed;                   // one upload holding the four index tensors below (views of it)
        Tensor toExpert, toSource, offsets, rowExpert, xin;

        Route(int[] sendRows, int[] recvRows, boolean equal, int localRows, int[] localCounts, int capacity) {
            this.sendRows = sendRows;
            this.recvRows = recvRows;
            this.equal = equal;
            this.localRows = localRows;
            this.localCounts = localCounts;
            this.capacity = capacity;
        }

        /**
         * Whether this routing serves another forward of the same layer: capacity mode's routing depends only on
         * the capacity (and the group), so it is built and uploaded once; dropless routing follows the counts.
         */
        boolean reusableFor(int capacity) {
            return equal && capacity > 0 && capacity == this.capacity;
        }

        /** Frees what one forward saved for its backward (the expert input). */
        void releaseActivations() {
            if (xin != null) xin.close();
            xin = null;
        }

        @Override
        public void close() {
            releaseActivations();
            for (Tensor t : new Tensor[] {toExpert, toSource, offsets, rowExpert, packed}) if (t != null) t.close();
            toExpert = toSource = offsets = rowExpert = packed = null;
        }
    }

    /**
     * The splits and layout transforms for the gate's routing g over E experts; capacity &gt; 0: capacity mode,
     * else dropless (collective: every rank of the group calls it for the same layer).
     */
    static Route route(Communicator ep, GateOutputs g, int numExperts, int capacity) {
        int P = ep.size(), me = ep.rank(), El = numExperts / P;
        Backend b = ep.backend();
        int[][] n = new int[P][El];   // n[p][j]: rows source rank p sends to my local expert j
        int[] sendRows = new int[P], recvRows = new int[P];
        boolean equal = capacity > 0;
        if (equal) {
            for (int p = 0; p < P; p++) {
                java.util.Arrays.fill(n[p], capacity);
                sendRows[p] = El * capacity;
                recvRows[p] = El * capacity;
            }
        } else {
            // all[p*E + e]: rank p's count for expert e (all kept: dropless), one host read for the layer
            int[] all;
            try (Tensor gathered = b.empty(DType.I32, P * numExperts)) {
                ep.allGather(g.counts(), gathered);
                all = gathered.toInts();
            }
            for (int p = 0; p < P; p++) {
                for (int j = 0; j < El; j++) {
                    n[p][j] = all[p * numExperts + me * El + j];
                    recvRows[p] += n[p][j];
                    sendRows[p] += all[me * numExperts + p * El + j];
                }
            }
        }
        int[] localCounts = new int[El];
        int rq = 0;
        for (int j = 0; j < El; j++) {
            for (int p = 0; p < P; p++) localCounts[j] += n[p][j];
            rq += localCounts[j];
        }
        Route r = new Route(sendRows, recvRows, equal, rq, localCounts, equal ? capacity : 0);
        if (rq == 0) return r;
        // positions: source order (p, j, i) and expert order (j, p, i)
        int[] srcStart = new int[P * El], expStart = new int[P * El];
        int at = 0;
        for (int p = 0; p < P; p++) for (int j = 0; j < El; j++) { srcStart[p * El + j] = at; at += n[p][j]; }
        at = 0;
        int[] offsets = new int[El + 1];
        for (int j = 0; j < El; j++) {
            offsets[j] = at;
            for (int p = 0; p < P; p++) { expStart[p * El + j] = at; at += n[p][j]; }
        }
        offsets[El] = at;
        int[] toExpert = new int[rq], toSource = new int[rq], rowExpert = new int[rq];
        for (int p = 0; p < P; p++) {
            for (int j = 0; j < El; j++) {
                for (int i = 0; i < n[p][j]; i++) {
                    int src = srcStart[p * El + j] + i, dst = expStart[p * El + j] + i;
                    toExpert[dst] = src;
                    toSource[src] = dst;
                    rowExpert[dst] = j;
                }
            }
        }
        // one host-to-device copy for all four (each upload waits for the stream)
        int[] all = new int[3 * rq + El + 1];
        System.arraycopy(toExpert, 0, all, 0, rq);
        System.arraycopy(toSource, 0, all, rq, rq);
        System.arraycopy(rowExpert, 0, all, 2 * rq, rq);
        System.arraycopy(offsets, 0, all, 3 * rq, El + 1);
        r.packed = dev.moe4j.core.tensor.Scope.detach(b.fromInts(all, all.length));   // the MoE layer closes it (it may keep it across steps)
        r.toExpert = r.packed.view(0, rq);
        r.toSource = r.packed.view(rq, rq);
        r.rowExpert = r.packed.view(2L * rq, rq);
        r.offsets = r.packed.view(3L * rq, El + 1);
        r.hostOffsets = offsets;
        return r;
    }

    /** buf [R, M] -&gt; y [R, M]: each row through its expert on the rank that owns it (returned, caller owns). */
    static Tensor forward(Communicator ep, Route r, ExpertBank bank, Tensor buf) {
        Backend b = ep.backend();
        int M = buf.cols();
        DType dt = buf.dtype();
        Tensor ysrc;
        try (Tensor recv = b.empty(dt, r.localRows, M)) {
            exchange(ep, r, buf, recv, false);
            if (r.localRows == 0) {
                ysrc = b.zeros(dt, 0, M);
            } else {
                r.releaseActivations();
                r.xin = b.empty(dt, r.localRows, M);
                b.gatherRows(recv, r.toExpert, r.xin);
                try (Tensor yl = bank.forward(r.xin, r.offsets, r.hostOffsets, bank.hasBias() ? r.rowExpert : null)) {
                    ysrc = b.empty(dt, r.localRows, M);
                    b.gatherRows(yl, r.toSource, ysrc);
                }
            }
        }
        try (ysrc) {
            Tensor y = b.empty(dt, buf.rows(), M);
            exchange(ep, r, ysrc, y, true);
            return y;
        }
    }

    /**
     * dy [R, M] -&gt; dbuf [R, M] (returned); accumulates the local experts' gradients. The input gradients go back
     * by the reverse all-to-all while the experts' weight gradients are computed ({@link Communicator#allToAllVAsync}).
     */
    static Tensor backward(Communicator ep, Route r, ExpertBank bank, Tensor dy) {
        Backend b = ep.backend();
        int M = dy.cols();
        DType dt = dy.dtype();
        Tensor dbuf = b.empty(dt, dy.rows(), M);
        try (Tensor drecv = b.empty(dt, r.localRows, M)) {
            exchange(ep, r, dy, drecv, false);
            if (r.localRows == 0) {
                try (Tensor dsrc = b.zeros(dt, 0, M)) {
                    exchange(ep, r, dsrc, dbuf, true);
                }
                return dbuf;
            }
            try (Tensor dyl = b.empty(dt, r.localRows, M); Tensor dsrc = b.empty(dt, r.localRows, M)) {
                b.gatherRows(drecv, r.toExpert, dyl);
                try (Tensor dxin = bank.backwardData(bank.mainPass(), dyl)) {
                    b.gatherRows(dxin, r.toSource, dsrc);
                }
                CommWork back = r.equal ? exchangeAsyncEqual(ep, dsrc, dbuf) : ep.allToAllVAsync(dsrc, r.recvRows, dbuf, r.sendRows);
                bank.backwardWeights(bank.mainPass());   // beside the all-to-all
                back.await();             // before dsrc and dyl are freed and dbuf is read
            }
        }
        return dbuf;
    }

    /** Capacity mode's reverse exchange (equal splits) as an asynchronous variable one with equal counts. */
    private static CommWork exchangeAsyncEqual(Communicator ep, Tensor send, Tensor recv) {
        int[] rows = new int[ep.size()];
        java.util.Arrays.fill(rows, send.rows() / ep.size());
        return ep.allToAllVAsync(send, rows, recv, rows);
    }

    /** The dispatch all-to-all (reverse = false: to the experts' owners) or the combine one (reverse = true). */
    private static void exchange(Communicator ep, Route r, Tensor send, Tensor recv, boolean reverse) {
        if (r.equal) ep.allToAll(send, recv);
        else if (reverse) ep.allToAllV(send, r.recvRows, recv, r.sendRows);
        else ep.allToAllV(send, r.sendRows, recv, r.recvRows);
    }
}
