package dev.moe4j.core.moe;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.backend.GateOutputs;
import dev.moe4j.core.comm.CommWork;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.comm.RowBlocks;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;

import java.util.ArrayList;
import java.util.List;

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
 * read, which the variable splits need); it sends no padding, but may pad the local experts' input to equal
 * segments after the exchange ({@link MoE.DroplessLayout}).
 *
 * <p>Where the communicator places row blocks itself ({@link Communicator#exchangesRowBlocks()}, NCCL and
 * in-process) and the self-first overlap is off, the exchanges move one block per (rank, local expert) straight
 * between buf's layout and the experts' order ({@link Communicator#exchangeRows}): no layout transforms and no
 * index tensors.
 */
final class ExpertParallel {
    private ExpertParallel() {}

    /**
     * {@code -Dmoe4j.ep.rowBlocks=true}: place every (source, expert) block directly where the communicator can
     * ({@link Communicator#exchangesRowBlocks()}) instead of all-to-all plus layout transforms. Off by default: on two
     * H200s over NVLink NCCL's per-block send/recv (0.5-8 MB blocks) was slower than one all-to-all and a gather
     * (docs/benchmarks.md, EP section).
     */
    static boolean rowBlocks() { return Boolean.getBoolean("moe4j.ep.rowBlocks"); }

    /** The routing of one forward, kept for its backward. */
    static final class Route implements AutoCloseable {
        final int[] sendRows, recvRows;  // rows to / from each rank of the group
        final boolean equal;             // capacity mode: every split is El*C
        final int localRows;             // Rq: rows this rank's experts process
        final int[] localCounts;         // rows per local expert
        final int capacity;              // capacity mode's C (0: dropless)
        int expertRows;                  // rows of the experts' input: Rq, or El * (largest local count) when padded
        boolean padded;                  // dropless, each local expert padded to the largest one's rows (zeros)
        int[] hostOffsets;               // the offsets below, on the host (the grouped GEMMs need no device read)
        Tensor packed;                   // one upload holding the index tensors below (views of it)
        Tensor toExpert, toSource, offsets, rowExpert, xin;
        // Block path: buf's (rank q, q's expert j) blocks and the experts' (source p, my expert j) blocks, paired.
        boolean blocks;
        RowBlocks bufBlocks, expertBlocks;
        // Overlap (self first): the rows this rank routes to itself run through the experts while the others travel.
        boolean overlap;
        int selfStart, selfRows, srcSelfStart, remoteRows;   // self rows: buf[selfStart, +selfRows) = recv[srcSelfStart, ...)
        int[] selfHostOffsets, remoteHostOffsets;
        Tensor selfOffsets, selfRowExpert, remoteOffsets, remoteRowExpert, toRemote, fromRemote, xinRemote;
        final ExpertBank.Pass selfPass = new ExpertBank.Pass(), remotePass = new ExpertBank.Pass();

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
            if (xinRemote != null) xinRemote.close();
            xin = xinRemote = null;
            selfPass.close();
            remotePass.close();
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
     * else dropless (collective: every rank of the group calls it for the same layer); overlap: also the index
     * tensors of the self-first pipeline ({@link #forward}). A dropless routing without overlap may pad the
     * local experts' segments to the largest one ({@link MoE.DroplessLayout}: PADDED always, AUTO where the backend
     * prefers equal groups for the model's dtype and the padding at most doubles the rows), so that they run as
     * equal groups.
     */
    static Route route(Communicator ep, GateOutputs g, int numExperts, int capacity, boolean overlap,
                       MoE.DroplessLayout layout, DType dtype) {
        int P = ep.size(), me = ep.rank(), El = numExperts / P;
        Backend b = ep.backend();
        int[][] n = new int[P][El];   // n[p][j]: rows source rank p sends to my local expert j
        int[] sendRows = new int[P], recvRows = new int[P];
        boolean equal = capacity > 0;
        int[] counts = null;   // dropless: every rank's count per expert, as all below
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
            counts = all;
        }
        int[] localCounts = new int[El];
        int rq = 0;
        for (int j = 0; j < El; j++) {
            for (int p = 0; p < P; p++) localCounts[j] += n[p][j];
            rq += localCounts[j];
        }
        Route r = new Route(sendRows, recvRows, equal, rq, localCounts, equal ? capacity : 0);
        r.expertRows = rq;
        r.blocks = rowBlocks() && ep.exchangesRowBlocks() && !(overlap && P > 1);
        if (r.blocks) {
            // buf's block for (rank q, its expert j): global expert q*El + j's rows, in expert order
            List<int[]> bb = new ArrayList<>();
            for (int e = 0, at = 0; e < numExperts; e++) {
                int rows = equal ? capacity : counts[me * numExperts + e];
                if (rows > 0) bb.add(new int[] {e / El, at, rows});
                at += rows;
            }
            r.bufBlocks = blocks(bb);
            r.expertBlocks = RowBlocks.NONE;
        }
        if (rq == 0) return r;
        int most = java.util.Arrays.stream(localCounts).max().orElse(0);
        r.padded = !equal && !(overlap && P > 1) && MoE.padsDropless(layout, b, dtype, (long) El * most, rq);
        // positions: source order (p, j, i) and expert order (j, p, i); padded: expert j starts at j * most
        int[] srcStart = new int[P * El], expStart = new int[P * El];
        int at = 0;
        for (int p = 0; p < P; p++) for (int j = 0; j < El; j++) { srcStart[p * El + j] = at; at += n[p][j]; }
        at = 0;
        int[] offsets = new int[El + 1];
        for (int j = 0; j < El; j++) {
            if (r.padded) at = j * most;
            offsets[j] = at;
            for (int p = 0; p < P; p++) { expStart[p * El + j] = at; at += n[p][j]; }
        }
        if (r.padded) {
            at = El * most;
            r.expertRows = at;
        }
        offsets[El] = at;
        r.hostOffsets = offsets;
        if (r.blocks) {
            // the experts' block for (source p, my expert j), at its place in expert order; the experts read only the offsets
            List<int[]> eb = new ArrayList<>();
            for (int p = 0; p < P; p++) for (int j = 0; j < El; j++) if (n[p][j] > 0) eb.add(new int[] {p, expStart[p * El + j], n[p][j]});
            r.expertBlocks = blocks(eb);
            return r;   // the experts' index tensors are uploaded by the first forward (expertIndices)
        }
        int[] toExpert = new int[r.expertRows], toSource = new int[rq], rowExpert = new int[r.expertRows];
        if (r.padded) for (int j = 0; j < El; j++) java.util.Arrays.fill(rowExpert, j * most, (j + 1) * most, j);
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
        // a padded route scatters by toSource and never reads toExpert: an empty part keeps the positions below
        List<int[]> parts = new ArrayList<>(List.of(r.padded ? new int[0] : toExpert, toSource, rowExpert, offsets));
        r.overlap = overlap && P > 1;
        if (r.overlap) {
            // self rows: my tokens for my experts, (j, i) ordered in buf and in recv's block of source me
            int[] sendOff = dev.moe4j.core.comm.CommChecks.offsets(sendRows);
            r.selfStart = sendOff[me];
            r.selfRows = sendRows[me];
            r.srcSelfStart = srcStart[me * El];
            r.remoteRows = rq - r.selfRows;
            int[] selfOffsets = new int[El + 1], selfRowExpert = new int[r.selfRows];
            for (int j = 0, k = 0; j < El; j++) {
                selfOffsets[j + 1] = selfOffsets[j] + n[me][j];
                for (int i = 0; i < n[me][j]; i++) selfRowExpert[k++] = j;
            }
            // remote rows in expert order (j, p != me, i); fromRemote: each recv row's place there, -1 for self rows
            int[] remoteOffsets = new int[El + 1], toRemote = new int[r.remoteRows], remoteRowExpert = new int[r.remoteRows];
            int[] fromRemote = new int[rq];
            java.util.Arrays.fill(fromRemote, -1);
            int k = 0;
            for (int j = 0; j < El; j++) {
                for (int p = 0; p < P; p++) {
                    if (p == me) continue;
                    for (int i = 0; i < n[p][j]; i++) {
                        int src = srcStart[p * El + j] + i;
                        toRemote[k] = src;
                        fromRemote[src] = k;
                        remoteRowExpert[k++] = j;
                    }
                }
                remoteOffsets[j + 1] = k;
            }
            r.selfHostOffsets = selfOffsets;
            r.remoteHostOffsets = remoteOffsets;
            parts.addAll(List.of(selfOffsets, selfRowExpert, remoteOffsets, toRemote, fromRemote, remoteRowExpert));
        }
        // one host-to-device copy for all of them (each upload waits for the stream)
        int total = 0;
        for (int[] a : parts) total += a.length;
        int[] all = new int[total];
        long[] at2 = new long[parts.size()];
        int pos = 0;
        for (int i = 0; i < parts.size(); i++) {
            at2[i] = pos;
            System.arraycopy(parts.get(i), 0, all, pos, parts.get(i).length);
            pos += parts.get(i).length;
        }
        r.packed = dev.moe4j.core.tensor.Scope.detach(b.fromInts(all, all.length));   // the MoE layer closes it (it may keep it across steps)
        r.toExpert = r.padded ? null : r.packed.view(at2[0], r.expertRows);
        r.toSource = r.packed.view(at2[1], rq);
        r.rowExpert = r.packed.view(at2[2], r.expertRows);
        r.offsets = r.packed.view(at2[3], El + 1);
        if (r.overlap) {
            r.selfOffsets = r.packed.view(at2[4], El + 1);
            r.selfRowExpert = r.packed.view(at2[5], r.selfRows);
            r.remoteOffsets = r.packed.view(at2[6], El + 1);
            r.toRemote = r.packed.view(at2[7], r.remoteRows);
            r.fromRemote = r.packed.view(at2[8], rq);
            r.remoteRowExpert = r.packed.view(at2[9], r.remoteRows);
        }
        return r;
    }

    private static RowBlocks blocks(List<int[]> list) {
        int n = list.size();
        int[] peer = new int[n], start = new int[n], rows = new int[n];
        for (int i = 0; i < n; i++) {
            peer[i] = list.get(i)[0];
            start[i] = list.get(i)[1];
            rows[i] = list.get(i)[2];
        }
        return new RowBlocks(peer, start, rows);
    }

    /**
     * The block path's only upload, once per route: the experts' offsets, and rowExpert (each input row's expert,
     * padding included) only when the bank has biases to read it.
     */
    private static void expertIndices(Backend b, Route r, boolean bias) {
        if (r.packed != null) return;
        int El = r.localCounts.length;
        int[] all = java.util.Arrays.copyOf(r.hostOffsets, El + 1 + (bias ? r.expertRows : 0));
        if (bias) for (int j = 0; j < El; j++) java.util.Arrays.fill(all, El + 1 + r.hostOffsets[j], El + 1 + r.hostOffsets[j + 1], j);
        r.packed = dev.moe4j.core.tensor.Scope.detach(b.fromInts(all, all.length));   // kept with the route (capacity: across steps)
        r.offsets = r.packed.view(0, El + 1);
        if (bias) r.rowExpert = r.packed.view(El + 1, r.expertRows);
    }

    /** buf [R, M] -&gt; y [R, M]: each row through its expert on the rank that owns it (returned, caller owns). */
    static Tensor forward(Communicator ep, Route r, ExpertBank bank, Tensor buf) {
        if (r.overlap && r.localRows > 0) return forwardSelfFirst(ep, r, bank, buf);
        if (r.blocks) return forwardBlocks(ep, r, bank, buf);
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
                r.xin = toExpertOrder(b, r, recv);
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

    /** The forward where the exchanges place the blocks: buf straight into expert order, the outputs straight back. */
    private static Tensor forwardBlocks(Communicator ep, Route r, ExpertBank bank, Tensor buf) {
        Backend b = ep.backend();
        int M = buf.cols();
        DType dt = buf.dtype();
        r.releaseActivations();
        // padded: the padding rows no block fills stay 0 (no activations, nothing added to the weight gradients)
        r.xin = r.padded ? b.zeros(dt, r.expertRows, M) : b.empty(dt, r.expertRows, M);
        ep.exchangeRows(buf, r.bufBlocks, r.xin, r.expertBlocks);
        Tensor y = b.empty(dt, buf.rows(), M);   // every row is in one block
        if (r.localRows == 0) {
            try (Tensor none = b.empty(dt, 0, M)) {
                ep.exchangeRows(none, r.expertBlocks, y, r.bufBlocks);
            }
            return y;
        }
        expertIndices(b, r, bank.hasBias());
        try (Tensor yl = bank.forward(r.xin, r.offsets, r.hostOffsets, r.rowExpert)) {
            ep.exchangeRows(yl, r.expertBlocks, y, r.bufBlocks);
        }
        return y;
    }

    /**
     * The forward with overlap: the dispatch all-to-all runs on the communicator's side stream while the local
     * experts process the rows this rank routed to itself (they never leave buf); then the rows that arrived, in
     * expert order; the two outputs meet in source order for the combine all-to-all.
     */
    private static Tensor forwardSelfFirst(Communicator ep, Route r, ExpertBank bank, Tensor buf) {
        Backend b = ep.backend();
        int M = buf.cols();
        DType dt = buf.dtype();
        boolean bias = bank.hasBias();
        try (Tensor recv = b.empty(dt, r.localRows, M); Tensor ysrc = b.empty(dt, r.localRows, M)) {
            CommWork dispatch = exchangeAsync(ep, r, buf, recv, false);
            Tensor ySelf = r.selfRows == 0 ? null
                    : bank.forward(r.selfPass, buf.rowSlice(r.selfStart, r.selfRows), r.selfOffsets, r.selfHostOffsets, bias ? r.selfRowExpert : null);
            dispatch.await();
            if (r.remoteRows > 0) {
                r.xinRemote = b.empty(dt, r.remoteRows, M);
                b.gatherRows(recv, r.toRemote, r.xinRemote);
                try (Tensor yRemote = bank.forward(r.remotePass, r.xinRemote, r.remoteOffsets, r.remoteHostOffsets, bias ? r.remoteRowExpert : null)) {
                    b.gatherRows(yRemote, r.fromRemote, ysrc);   // self rows get 0 here, their values below
                }
            }
            if (ySelf != null) {
                try (ySelf) {
                    b.copy(ySelf, ysrc.rowSlice(r.srcSelfStart, r.selfRows));
                }
            }
            Tensor y = b.empty(dt, buf.rows(), M);
            exchange(ep, r, ysrc, y, true);
            return y;
        }
    }

    /**
     * The backward with overlap: while the output gradients travel, the self rows' backward (data and weights);
     * then the arrived rows' input gradients, sent back beside their weight gradients.
     */
    private static Tensor backwardSelfFirst(Communicator ep, Route r, ExpertBank bank, Tensor dy) {
        Backend b = ep.backend();
        int M = dy.cols();
        DType dt = dy.dtype();
        Tensor dbuf = b.empty(dt, dy.rows(), M);
        try (Tensor drecv = b.empty(dt, r.localRows, M); Tensor dsrc = b.empty(dt, r.localRows, M)) {
            CommWork dispatch = exchangeAsync(ep, r, dy, drecv, false);
            Tensor dxSelf = null;
            if (r.selfRows > 0) {
                dxSelf = bank.backwardData(r.selfPass, dy.rowSlice(r.selfStart, r.selfRows));
                bank.backwardWeights(r.selfPass);
            }
            dispatch.await();
            Tensor dyRemote = null;
            try {
                if (r.remoteRows > 0) {
                    dyRemote = b.empty(dt, r.remoteRows, M);
                    b.gatherRows(drecv, r.toRemote, dyRemote);
                    try (Tensor dxRemote = bank.backwardData(r.remotePass, dyRemote)) {
                        b.gatherRows(dxRemote, r.fromRemote, dsrc);
                    }
                }
                if (dxSelf != null) b.copy(dxSelf, dsrc.rowSlice(r.srcSelfStart, r.selfRows));
                CommWork back = exchangeAsync(ep, r, dsrc, dbuf, true);
                if (r.remoteRows > 0) bank.backwardWeights(r.remotePass);   // beside the all-to-all
                back.await();
            } finally {
                if (dxSelf != null) dxSelf.close();
                if (dyRemote != null) dyRemote.close();
            }
        }
        return dbuf;
    }

    /**
     * dy [R, M] -&gt; dbuf [R, M] (returned); accumulates the local experts' gradients. {@code beside} (may be null) is
     * work that needs nothing of this exchange (the gate's backward): with variable splits or block exchanges it runs
     * while the dispatch exchange of dy travels on the communicator's side stream. The input gradients go back by the reverse all-to-all while the
     * experts' weight gradients are computed ({@link Communicator#allToAllVAsync}).
     */
    static Tensor backward(Communicator ep, Route r, ExpertBank bank, Tensor dy, Runnable beside) {
        if (r.overlap && r.localRows > 0) {
            if (beside != null) beside.run();
            return backwardSelfFirst(ep, r, bank, dy);
        }
        if (r.blocks) return backwardBlocks(ep, r, bank, dy, beside);
        Backend b = ep.backend();
        int M = dy.cols();
        DType dt = dy.dtype();
        Tensor dbuf = b.empty(dt, dy.rows(), M);
        try (Tensor drecv = b.empty(dt, r.localRows, M)) {
            if (r.equal) {
                // equal splits keep NCCL's own all-to-all (on the side stream they take the send/recv form, which
                // measured no faster overall); variable splits travel beside the gate's backward
                exchange(ep, r, dy, drecv, false);
                if (beside != null) beside.run();
            } else {
                CommWork dispatch = exchangeAsync(ep, r, dy, drecv, false);
                if (beside != null) beside.run();
                dispatch.await();
            }
            if (r.localRows == 0) {
                try (Tensor dsrc = b.zeros(dt, 0, M)) {
                    exchange(ep, r, dsrc, dbuf, true);
                }
                return dbuf;
            }
            try (Tensor dyl = toExpertOrder(b, r, drecv); Tensor dsrc = b.empty(dt, r.localRows, M)) {
                try (Tensor dxin = bank.backwardData(bank.mainPass(), dyl)) {
                    b.gatherRows(dxin, r.toSource, dsrc);
                }
                CommWork back = exchangeAsync(ep, r, dsrc, dbuf, true);
                bank.backwardWeights(bank.mainPass());   // beside the all-to-all
                back.await();             // before dsrc and dyl are freed and dbuf is read
            }
        }
        return dbuf;
    }

    /** The backward where the exchanges place the blocks: dy straight into expert order, dxin straight back to dbuf. */
    private static Tensor backwardBlocks(Communicator ep, Route r, ExpertBank bank, Tensor dy, Runnable beside) {
        Backend b = ep.backend();
        int M = dy.cols();
        DType dt = dy.dtype();
        Tensor dbuf = b.empty(dt, dy.rows(), M);
        // padded: zero gradients on the padding rows, so that they add nothing to the weight gradients
        try (Tensor dyl = r.padded ? b.zeros(dt, r.expertRows, M) : b.empty(dt, r.expertRows, M)) {
            CommWork dispatch = ep.exchangeRowsAsync(dy, r.bufBlocks, dyl, r.expertBlocks);
            if (beside != null) beside.run();   // the gate's backward while dy travels
            dispatch.await();
            if (r.localRows == 0) {
                try (Tensor none = b.empty(dt, 0, M)) {
                    ep.exchangeRows(none, r.expertBlocks, dbuf, r.bufBlocks);
                }
                return dbuf;
            }
            try (Tensor dxin = bank.backwardData(bank.mainPass(), dyl)) {
                CommWork back = ep.exchangeRowsAsync(dxin, r.expertBlocks, dbuf, r.bufBlocks);
                bank.backwardWeights(bank.mainPass());   // beside the exchange
                back.await();             // before dxin and dyl are freed and dbuf is read
            }
        }
        return dbuf;
    }

    /**
     * Received rows (source order) in the local experts' order (returned): a gather, or when padded a scatter into
     * zeros, so that the padding rows carry zero activations and gradients and add nothing to the weight gradients.
     */
    private static Tensor toExpertOrder(Backend b, Route r, Tensor recv) {
        if (!r.padded) {
            Tensor out = b.empty(recv.dtype(), r.localRows, recv.cols());
            b.gatherRows(recv, r.toExpert, out);
            return out;
        }
        Tensor out = b.zeros(recv.dtype(), r.expertRows, recv.cols());
        b.moePermute(recv, r.toSource.reshape(r.localRows, 1), out);
        return out;
    }

    /** {@link #exchange} on the communicator's side stream (awaited by the caller). */
    private static CommWork exchangeAsync(Communicator ep, Route r, Tensor send, Tensor recv, boolean reverse) {
        return reverse ? ep.allToAllVAsync(send, r.recvRows, recv, r.sendRows) : ep.allToAllVAsync(send, r.sendRows, recv, r.recvRows);
    }

    /** The dispatch all-to-all (reverse = false: to the experts' owners) or the combine one (reverse = true). */
    private static void exchange(Communicator ep, Route r, Tensor send, Tensor recv, boolean reverse) {
        if (r.equal) ep.allToAll(send, recv);
        else if (reverse) ep.allToAllV(send, r.recvRows, recv, r.sendRows);
        else ep.allToAllV(send, r.sendRows, recv, r.recvRows);
    }
}
