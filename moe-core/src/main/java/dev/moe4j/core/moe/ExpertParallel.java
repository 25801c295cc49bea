package dev.moe4j.core.moe;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.backend.ExpertLayout;
import dev.moe4j.core.backend.GateOutputs;
import dev.moe4j.core.comm.CommWork;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.comm.PeerWindow;
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
 * <p>With overlap ({@link MoE.Builder#optOverlapAllToAll}) the local experts run in {@link #chunks()} groups of
 * consecutive experts, each a pipeline stage: every group's rows travel by their own block exchange
 * ({@link Communicator#exchangeRowsAsync}, one block per rank) on the communicator's side stream, so that group
 * g + 1's rows arrive while group g's experts run, and group g's outputs travel back while group g + 1's run. Each
 * group's GEMMs stay whole grouped GEMMs over its experts.
 *
 * <p>Where the communicator offers {@link PeerWindow}s (the ranks of one node with peer access, or in-process ranks)
 * and the layer does not pipeline, the rows move without all-to-all or layout transform: every rank knows the whole
 * routing (capacity: from C; dropless: from the all-gathered counts), so its dispatch stores each row straight at its
 * place in the owner's expert-ordered input (window X; no buf: {@link Backend#moePermuteTo}; the same for the combine's
 * backward into window DY), and the owner stores each expert output row at its place in the source's buf layout
 * (window Y; dxin into DX). The windows belong to the layer
 * ({@link Windows}): X keeps the experts' input and Y the layer's y until the backward, as the exchange's own buffers.
 * A dropless owner that pads ({@link ExpertLayout}) zeroes its input's padding rows once the rows have arrived. Once the
 * windows exist, a dropless layer exchanges its counts through a window as well ({@link Windows#gatherCounts}) and
 * sends its rows before the counts reach the host: the destinations come from the group's counts on the device
 * ({@link Backend#epDispatchDestinations}), and the host reads the counts (the layer's one wait) while the rows travel;
 * a routing that outgrows the window X ends that exchange, grows X and sends again. Where nothing of the forward needs
 * the counts on the host ({@link Route#expertsBeforeCounts}) the experts run on the device's offsets before that wait
 * ({@link #forwardBeforeCounts}).
 */
final class ExpertParallel {
    private ExpertParallel() {}

    /**
     * {@code -Dmoe4j.ep.chunks=N} (default 2): the pipeline stages of the overlapped layer, at most one per local
     * expert. More stages hide more of the first dispatch and the last combine, but each moves smaller blocks.
     */
    static int chunks() { return Math.max(1, Integer.getInteger("moe4j.ep.chunks", 2)); }

    /**
     * {@code -Dmoe4j.ep.countWindow=false}: dropless layers all-gather their counts even where windows are open
     * ({@link Windows#gatherCounts}); it must be the same on every rank of a group.
     */
    private static final boolean COUNT_WINDOW = !"false".equals(System.getProperty("moe4j.ep.countWindow"));

    /** The routing of one forward, kept for its backward. */
    static final class Route implements AutoCloseable {
        int[] sendRows, recvRows;        // rows to / from each rank of the group
        final boolean equal;             // capacity mode: every split is El*C
        int localRows;                   // Rq: rows this rank's experts process
        int[] localCounts;               // rows per local expert
        final int capacity;              // capacity mode's C (0: dropless)
        Tensor packed;                   // one upload holding the stages' index tensors (views of it)
        Stage[] stages;                  // all local experts in one stage, or (overlap) the pipeline's stages
        boolean pipelined;               // overlap: each stage travels by its own block exchange
        int[][] n;                       // rows from source p for local expert j, until indices() has used them
        double maxPadding;               // when a dropless owner pads its experts (ExpertLayout)
        DType dtype;
        Windows windows;                 // peer path: the layer's windows, else null
        int[] dispatchTo, combineTo;     // peer path, until indices() uploads them: (rank, row) per buf row / per input row
        Tensor dispatchDest, combineDest; // I32 [R, 2] and [expert rows, 2]: views of the upload, or (pending) the device's
        Tensor gathered;                 // pending: the group's counts [P * E] on the device, not yet read
        java.util.function.Supplier<int[]> countsLater;   // pending: their read, started behind their exchange
        Tensor deviceDest;               // pending: dispatchDest computed on the device (owned)
        boolean redispatch;              // pending: the dispatch outran X's size; X grew and the rows go again
        int inputRows;                   // peer path: this rank's experts' input rows, padding included
        boolean bias;                    // the experts have biases (which read each row's expert)
        Tensor deviceCombine;            // pending: combineDest computed on the device (owned)
        Tensor deviceLocal;              // pending: the local experts' rows and offsets computed on the device (owned)
        Tensor localCountsDevice;        // peer path: localCounts on the device (a view of packed or of deviceLocal)
        boolean expertsBeforeCounts;     // pending: the experts run on the device's offsets before the host has the counts

        Route(boolean equal, int capacity) {
            this.equal = equal;
            this.capacity = capacity;
        }

        /** Whether the host part waits for the dispatch (a dropless peer routing whose counts are not read yet). */
        boolean pending() { return gathered != null && localCounts == null; }

        /**
         * Whether this routing serves another forward of the same layer: capacity mode's routing depends only on
         * the capacity (and the group), so it is built and uploaded once; dropless routing follows the counts.
         */
        boolean reusableFor(int capacity) {
            return equal && capacity > 0 && capacity == this.capacity;
        }

        /** Frees what one forward saved for its backward (the experts' inputs and passes). */
        void releaseActivations() {
            for (Stage st : stages) st.release();
        }

        @Override
        public void close() {
            if (stages != null) releaseActivations();
            if (packed != null) packed.close();   // the stages' index tensors are views of it
            packed = null;
            for (Tensor t : new Tensor[] {gathered, deviceDest, deviceCombine, deviceLocal}) if (t != null) t.close();
            gathered = deviceDest = deviceCombine = deviceLocal = null;
        }
    }

    /**
     * The peer windows of one MoE layer on this rank: X (the experts' input, kept for their backward) and DY (their
     * output gradients) take rows in this rank's experts' order; Y (the layer's y, kept for the combine's backward) and
     * DX (the dispatch gradient) take rows in buf's layout. X and Y are the layer's own; DY and DX hold rows only within
     * one layer's backward, so the layers of one expert-parallel group share them ({@link Shared}). Opened on the first
     * forward that can use them and reopened larger when a routing needs more rows (every rank at the same forward:
     * the sizes come from the shared routing). The group's dropless layers also exchange their counts through a shared
     * window C ({@link #gatherCounts}).
     */
    static final class Windows implements AutoCloseable {
        PeerWindow x, y;
        private Shared shared;         // DY and DX of this layer's group, null before the first ensure
        private Communicator group;
        private boolean unavailable;   // the communicator offers none: the collectives from then on

        /** DY, DX and C of the layers of one group on this rank (keyed by the group's communicator), with their users. */
        private static final class Shared {
            PeerWindow dy, dx, counts;
            Tensor firstRow, toRowOfMine;   // C's stores: P times row 0 of the counts; row q to (rank q, row rank())
            int users;
        }

        private static final java.util.Map<Communicator, Shared> SHARED = new java.util.IdentityHashMap<>();

        PeerWindow dy() { return shared.dy; }

        PeerWindow dx() { return shared.dx; }

        /**
         * Whether windows of at least xRows / yRows rows of M dtype elements are open (collective: every rank with the
         * same sizes); false where the communicator has none.
         */
        boolean ensure(Communicator ep, long xRows, long yRows, int M, DType dtype) {
            if (unavailable) return false;
            long row = (long) M * dtype.bytes();
            if (x == null || x.bytes() < xRows * row) {
                PeerWindow old = x;
                x = grown(ep, old, xRows * row);
                if (x == null) {
                    unavailable = true;
                    return false;
                }
            }
            if (y == null || y.bytes() < yRows * row) y = grown(ep, y, yRows * row);
            if (shared == null) {
                synchronized (SHARED) {
                    shared = SHARED.computeIfAbsent(ep, k -> new Shared());
                    shared.users++;
                }
                group = ep;
            }
            // another layer of the group may have grown them already (all ranks run the layers in the same order)
            if (shared.dy == null || shared.dy.bytes() < xRows * row) shared.dy = grown(ep, shared.dy, xRows * row);
            if (shared.dx == null || shared.dx.bytes() < yRows * row) shared.dx = grown(ep, shared.dx, yRows * row);
            return true;
        }

        /**
         * The group's counts [P * E] (I32, rank p's at p * E) on the device, exchanged through the group's window C in
         * place of an all-gather (collective: every rank of the group, at the same layer): each rank stores its counts
         * into its row of every rank's C, then the window's flags (on two H200s a small NCCL collective takes about 20
         * us). A view of C, valid until the group's next exchange of counts (the next dropless layer's forward, which the
         * uses of this layer's are queued before). Null where it does not apply: E not a multiple of 4 or more than 8
         * ranks (the stores are one scatterRowsTo of 16-byte units, up to 8 destinations on CUDA), or
         * {@code -Dmoe4j.ep.countWindow=false} (the all-gather, kept to measure against; the same on every rank).
         */
        Tensor gatherCounts(Communicator ep, Tensor counts) {
            int P = ep.size(), E = Math.toIntExact(counts.numel());
            if (!COUNT_WINDOW || E % 4 != 0 || P > 8 || shared == null) return null;
            Backend b = ep.backend();
            long bytes = (long) P * E * DType.I32.bytes();
            if (shared.counts == null || shared.counts.bytes() < bytes) {
                shared.counts = grown(ep, shared.counts, bytes);
                if (shared.counts == null) return null;   // on every rank (a collective)
            }
            if (shared.firstRow == null) {
                int[] to = new int[2 * P];
                for (int q = 0; q < P; q++) {
                    to[2 * q] = q;
                    to[2 * q + 1] = ep.rank();
                }
                // state across steps, made during one: out of the step's scope
                shared.firstRow = dev.moe4j.core.tensor.Scope.detach(b.fromInts(new int[P], P));
                shared.toRowOfMine = dev.moe4j.core.tensor.Scope.detach(b.fromInts(to, P, 2));
            }
            PeerWindow c = shared.counts;
            c.open();
            try (Tensor mine = b.empty(DType.I32, P, E)) {
                b.gatherRows(counts.reshape(1, E), shared.firstRow, mine);
                b.scatterRowsTo(mine, shared.toRowOfMine, all(c, P, DType.I32, E));
            }
            c.publish();
            c.await();
            return c.tensor(ep.rank(), DType.I32, P, E).reshape(P * E);
        }

        /** A window of at least {@code bytes} in place of {@code old} (closed; dropless routings grow with headroom). */
        private static PeerWindow grown(Communicator ep, PeerWindow old, long bytes) {
            long b = Math.max(bytes, 1);
            if (old != null) {
                b = Math.max(b, old.bytes() + old.bytes() / 4);
                old.close();
            }
            return ep.openWindow(b);
        }

        /** The rows of M dtype elements that window w holds. */
        static long rows(PeerWindow w, int M, DType dtype) { return w.bytes() / ((long) M * dtype.bytes()); }

        /** Every rank's window w as [rows, M] tensors of dtype, in rank order (the destinations of scatterRowsTo). */
        static Tensor[] all(PeerWindow w, int P, DType dtype, int M) {
            int rows = Math.toIntExact(rows(w, M, dtype));
            Tensor[] t = new Tensor[P];
            for (int q = 0; q < P; q++) t[q] = w.tensor(q, dtype, rows, M);
            return t;
        }

        @Override
        public void close() {
            if (x != null) x.close();
            if (y != null) y.close();
            x = y = null;
            if (shared == null) return;
            synchronized (SHARED) {
                if (--shared.users == 0) {
                    if (shared.dy != null) shared.dy.close();
                    if (shared.dx != null) shared.dx.close();
                    if (shared.counts != null) shared.counts.close();
                    if (shared.firstRow != null) shared.firstRow.close();
                    if (shared.toRowOfMine != null) shared.toRowOfMine.close();
                    SHARED.remove(group);
                }
            }
            shared = null;
        }
    }

    /**
     * Local experts [first, first + count) and the rows they process: in source order (p, j, i) as they arrive and in
     * expert order (j, p, i) for the GEMMs. Without overlap one stage holds all local experts; with it, each stage
     * of the pipeline travels by its own block exchange.
     */
    static final class Stage {
        final int first, count;
        RowBlocks bufBlocks;    // pipelined: buf's rows for every rank's experts of this stage: (rank q, start in buf, rows)
        RowBlocks recvBlocks;   // pipelined: the rows from every source rank: (source p, start in the stage's input, rows)
        int rows, expertRows;   // rows received; rows of the experts' input (count * largest count when padded)
        boolean padded;         // dropless, each expert padded to the stage's largest one's rows (zeros)
        int[] hostOffsets;      // [count + 1], into the experts' input
        int part;               // the first of its index arrays in the route's upload
        Tensor toExpert, toSource, offsets, rowExpert;   // views of the route's upload (toExpert null when padded)
        Tensor xin;             // the experts' input, kept for the backward
        final ExpertBank.Pass pass = new ExpertBank.Pass();

        Stage(int first, int count) {
            this.first = first;
            this.count = count;
        }

        void release() {
            if (xin != null) xin.close();
            xin = null;
            pass.close();
        }
    }

    /**
     * The splits and layout transforms for the gate's routing g over E experts; capacity &gt; 0: capacity mode,
     * else dropless (collective: every rank of the group calls it for the same layer); overlap: as pipeline stages
     * ({@link #forward}). A dropless routing may pad the local experts' segments (of the whole rank, or of each
     * stage) to the largest one ({@link MoE.DroplessLayout}: PADDED always, AUTO where the backend prefers equal
     * groups for the model's dtype and the padding at most doubles the rows), so that they run as equal groups.
     * windows (may be null: the collectives): the layer's peer windows, used where the communicator offers them and the
     * layer does not pipeline; hidden: the rows' width.
     */
    static Route route(Communicator ep, GateOutputs g, int numExperts, int capacity, boolean overlap,
                       MoE.DroplessLayout layout, DType dtype, Windows windows, int hidden, boolean bias) {
        int P = ep.size();
        Backend b = ep.backend();
        boolean equal = capacity > 0;
        Route r = new Route(equal, equal ? capacity : 0);
        r.bias = bias;
        r.dtype = dtype;
        r.pipelined = overlap && P > 1;
        int[] all = new int[P * numExperts];   // all[p*E + e]: rank p's rows for expert e
        if (equal) {
            sameCapacity(ep, capacity);
            java.util.Arrays.fill(all, capacity);
        } else {
            // with windows already open, the counts travel through one and the dispatch goes out before they reach the
            // host (finish() after it)
            boolean peer = windows != null && !r.pipelined && windows.x != null;
            r.gathered = peer ? windows.gatherCounts(ep, g.counts()) : null;
            if (r.gathered == null) {
                r.gathered = b.empty(DType.I32, P * numExperts);
                ep.allGather(g.counts(), r.gathered);
            }
            if (peer) {
                r.windows = windows;
                r.countsLater = b.readIntsLater(r.gathered);
                // every choice here must be the same on every rank (they lay the group out alike and exchange through
                // the windows in the same order): asked with the windows' rows, which are. Y holds about the largest
                // rank's routed rows, the local experts' rows in a balanced routing.
                long xRows = Windows.rows(windows.x, hidden, dtype), yRows = Windows.rows(windows.y, hidden, dtype);
                r.maxPadding = MoE.maxPadding(layout, b, dtype, numExperts / P, yRows);
                // nothing of the forward needs the counts on the host where the experts' input is not padded (its
                // size), has no per-row expert table (biases) and the grouped GEMMs read their offsets on the device
                // (asked with the rows they run on: X's). Their activations then take X's rows until the backward:
                // not where X has grown past twice Y (after a skewed routing), which would hold that much more.
                r.expertsBeforeCounts = r.maxPadding == 0 && !bias && xRows <= 2 * yRows
                        && !b.wantsHostOffsets(dtype, xRows, numExperts / P);
                return r;
            }
            all = r.gathered.toInts();   // one host read for the layer
            r.gathered.close();
            r.gathered = null;
            long routed = 0;   // the local experts' rows in a balanced routing, the same on every rank
            for (int c : all) routed += c;
            r.maxPadding = MoE.maxPadding(layout, b, dtype, numExperts / P, routed / P);
        }
        finish(ep, r, all, windows, hidden);
        return r;
    }

    /**
     * Fails unless every rank of the group has this capacity: capacity mode exchanges equal blocks of El x C rows
     * without telling the ranks each other's sizes. Once per routing (kept while the capacity stays): a collective.
     */
    private static void sameCapacity(Communicator ep, int capacity) {
        Backend b = ep.backend();
        int[] caps;
        try (Tensor mine = b.fromInts(new int[] {capacity}, 1); Tensor all = b.empty(DType.I32, ep.size())) {
            ep.allGather(mine, all);
            caps = all.toInts();
        }
        for (int q = 0; q < caps.length; q++) {
            if (caps[q] != capacity) {
                throw new IllegalStateException("MoE expert parallelism in capacity mode: rank " + ep.rank() + " has capacity " + capacity
                        + " but rank " + q + " of its group has " + caps[q] + " (capacities " + java.util.Arrays.toString(caps)
                        + "); every rank of the group needs the same number of tokens per layer, or use dropless routing");
            }
        }
    }

    /**
     * The host part of route r from the group's routing all[p*E + e]: splits, local counts, stages, and on the peer path
     * (windows non-null: opened or grown here, collectively) the destinations of the combine (and of the dispatch where
     * the device has not computed them).
     */
    private static void finish(Communicator ep, Route r, int[] all, Windows windows, int hidden) {
        int P = ep.size(), me = ep.rank(), numExperts = all.length / P, El = numExperts / P;
        int[][] n = new int[P][El];   // n[p][j]: rows source rank p sends to my local expert j
        int[] sendRows = new int[P], recvRows = new int[P];
        for (int p = 0; p < P; p++) {
            for (int j = 0; j < El; j++) {
                n[p][j] = all[p * numExperts + me * El + j];
                recvRows[p] += n[p][j];
                sendRows[p] += all[me * numExperts + p * El + j];
            }
        }
        ExpertLayout lay = new ExpertLayout(all, P, r.maxPadding);
        int rq = 0;
        for (int p = 0; p < P; p++) rq += recvRows[p];
        r.sendRows = sendRows;
        r.recvRows = recvRows;
        r.localRows = rq;
        r.localCounts = lay.localCounts(me);
        r.n = n;
        if (windows != null && !r.pipelined) {
            if (r.gathered != null) {
                // pending: the dispatch went out into a window sized by earlier routings; rows beyond it went nowhere
                // (and, with the experts run before the counts, so did their outputs beyond Y)
                if (lay.largestInput() > Windows.rows(windows.x, hidden, r.dtype)
                        || r.expertsBeforeCounts && lay.largestBuf() > Windows.rows(windows.y, hidden, r.dtype)) {
                    windows.x.await();   // the exchange under way ends before its window is replaced
                    r.redispatch = true;
                }
            }
            if (windows.ensure(ep, lay.largestInput(), lay.largestBuf(), hidden, r.dtype)) {
                r.windows = windows;
                r.inputRows = lay.inputRows(me);
                if (r.gathered == null) {   // else both on the device
                    r.dispatchTo = lay.dispatch(me, Long.MAX_VALUE);
                    r.combineTo = lay.combine(me);
                }
            } else {
                r.windows = null;
            }
        }
        if (!r.pipelined) {
            if (r.stages == null) r.stages = new Stage[] {new Stage(0, El)};   // else the experts ran before the counts came
            r.stages[0].rows = rq;
        } else {
            int G = Math.min(chunks(), El);
            r.stages = new Stage[G];
            int[] bufStart = new int[numExperts + 1];
            for (int e = 0; e < numExperts; e++) bufStart[e + 1] = bufStart[e] + all[me * numExperts + e];
            for (int c = 0; c < G; c++) {
                int j0 = c * El / G, j1 = (c + 1) * El / G;
                Stage st = r.stages[c] = new Stage(j0, j1 - j0);
                int[] peer = new int[P], start = new int[P], rows = new int[P], recvStart = new int[P], recvRowsOf = new int[P];
                for (int q = 0; q < P; q++) {
                    peer[q] = q;
                    start[q] = bufStart[q * El + j0];
                    rows[q] = bufStart[q * El + j1] - start[q];
                    recvStart[q] = st.rows;
                    for (int j = j0; j < j1; j++) recvRowsOf[q] += n[q][j];
                    st.rows += recvRowsOf[q];
                }
                st.bufBlocks = new RowBlocks(peer, start, rows);
                st.recvBlocks = new RowBlocks(peer, recvStart, recvRowsOf);
            }
        }
    }

    /**
     * The layout transforms' index tensors of route r, built and uploaded on first use: after the dispatch exchange
     * is queued (it needs only the splits), so that the host builds them while the rows travel.
     */
    private static void indices(Backend b, Route r) {
        if (r.n == null) return;
        int[][] n = r.n;
        r.n = null;
        if (r.deviceLocal != null && !r.bias) {
            // pending: the device has every table already; the host keeps the sizes and offsets the GEMMs need
            Stage st = r.stages[0];
            layout(r, st, n);
            int El = r.localCounts.length;
            r.localCountsDevice = r.deviceLocal.view(0, El);
            st.offsets = r.deviceLocal.view(El, El + 1);
            return;
        }
        List<int[]> parts = new ArrayList<>();
        for (Stage st : r.stages) {
            st.part = parts.size();
            parts.addAll(layout(r, st, n));
        }
        int peerPart = parts.size();
        if (r.windows != null) {
            parts.add(r.localCounts);   // a padded input's padding rows follow from them (zeroFreeSlots)
            // pending routes compute both on the device
            if (r.combineTo != null) parts.add(r.combineTo);
            if (r.dispatchTo != null) parts.add(r.dispatchTo);
        }
        if (parts.isEmpty()) return;
        // one host-to-device copy for all index tensors
        int total = 0;
        for (int[] a : parts) total += a.length;
        int[] all = new int[total];
        long[] at = new long[parts.size()];
        int pos = 0;
        for (int i = 0; i < parts.size(); i++) {
            at[i] = pos;
            System.arraycopy(parts.get(i), 0, all, pos, parts.get(i).length);
            pos += parts.get(i).length;
        }
        r.packed = dev.moe4j.core.tensor.Scope.detach(b.fromInts(all, all.length));   // the MoE layer closes it (it may keep it across steps)
        for (Stage st : r.stages) {
            if (st.rows == 0) continue;
            int i = st.part;
            st.toExpert = st.padded || r.windows != null ? null : r.packed.view(at[i], st.expertRows);
            st.toSource = r.windows != null ? null : r.packed.view(at[i + 1], st.rows);
            st.rowExpert = r.bias ? r.packed.view(at[i + 2], st.expertRows) : null;
            st.offsets = r.packed.view(at[i + 3], st.count + 1);
        }
        if (r.windows != null) {
            int i = peerPart;
            r.localCountsDevice = r.packed.view(at[i++], r.localCounts.length);
            if (r.combineTo != null) r.combineDest = r.packed.view(at[i++], r.combineTo.length / 2, 2);
            if (r.dispatchTo != null) r.dispatchDest = r.packed.view(at[i], r.dispatchTo.length / 2, 2);
            r.dispatchTo = r.combineTo = null;
        }
    }

    /**
     * The layout transform of stage st's local experts [j0, j1) receiving st.rows rows in source order (p, j, i):
     * the experts' order (j, p, i), padded when dropless and the route's layout says so. Fills the stage's sizes and
     * host offsets; returns its index arrays toExpert (empty when padded: a padded layout scatters by toSource),
     * toSource (both empty on the peer path, which stores rows at their places and transforms nothing), rowExpert
     * (counted from j0) and offsets; none for a stage without rows.
     */
    private static List<int[]> layout(Route r, Stage st, int[][] n) {
        int rows = st.rows, j0 = st.first, j1 = st.first + st.count, P = n.length, count = st.count;
        if (rows == 0) return List.of();
        int most = 0;
        for (int j = j0; j < j1; j++) most = Math.max(most, r.localCounts[j]);
        boolean padded = !r.equal && ExpertLayout.pads(r.maxPadding, (long) count * most, rows);
        // positions: source order (p, j, i) and expert order (j, p, i); padded: expert j starts at (j - j0) * most
        int[][] srcStart = new int[P][j1], expStart = new int[P][j1];
        int at = 0;
        for (int p = 0; p < P; p++) for (int j = j0; j < j1; j++) { srcStart[p][j] = at; at += n[p][j]; }
        at = 0;
        int[] offsets = new int[count + 1];
        for (int j = j0; j < j1; j++) {
            if (padded) at = (j - j0) * most;
            offsets[j - j0] = at;
            for (int p = 0; p < P; p++) { expStart[p][j] = at; at += n[p][j]; }
        }
        int expertRows = padded ? count * most : rows;
        offsets[count] = expertRows;
        boolean moves = r.windows == null;   // the collectives' layout transforms
        int[] toExpert = new int[moves && !padded ? expertRows : 0], toSource = new int[moves ? rows : 0];
        int[] rowExpert = new int[r.bias ? expertRows : 0];   // only the experts' biases read it
        if (padded && r.bias) for (int j = j0; j < j1; j++) java.util.Arrays.fill(rowExpert, (j - j0) * most, (j - j0 + 1) * most, j - j0);
        if (toExpert.length + toSource.length + rowExpert.length > 0) for (int p = 0; p < P; p++) {
            for (int j = j0; j < j1; j++) {
                for (int i = 0; i < n[p][j]; i++) {
                    int src = srcStart[p][j] + i, dst = expStart[p][j] + i;
                    if (toExpert.length > 0) toExpert[dst] = src;
                    if (toSource.length > 0) toSource[src] = dst;
                    if (rowExpert.length > 0) rowExpert[dst] = j - j0;
                }
            }
        }
        st.padded = padded;
        st.expertRows = expertRows;
        st.hostOffsets = offsets;
        return List.of(toExpert, toSource, rowExpert, offsets);
    }

    /**
     * Writes the rows of a buffer [R, M] in buf's layout (the dispatch's buf, the combine backward's dy), every row: into
     * a tensor ({@code into}), or each row straight at its place in the peer windows ({@code to}: row r at row
     * rowDest[r, 1] of dsts[rowDest[r, 0]], {@link Backend#moePermuteTo}'s form).
     */
    interface Rows {
        void into(Tensor buf);

        void to(Tensor rowDest, Tensor[] dsts);
    }

    /**
     * The dispatch buffer buf [R, M] (written by {@code buf}) -&gt; y [R, M]: each row through its expert on the rank that
     * owns it (returned, caller owns; on the peer path a view of the window Y, valid until the layer's next forward).
     */
    static Tensor forward(Communicator ep, Route r, ExpertBank bank, int R, int M, DType dt, Rows dispatch) {
        if (r.windows != null) return forwardPeer(ep, r, bank, R, M, dt, dispatch);
        try (Tensor buf = ep.backend().empty(dt, R, M)) {
            dispatch.into(buf);
            return r.pipelined ? forwardPipelined(ep, r, bank, buf) : forwardCollective(ep, r, bank, buf);
        }
    }

    /** The forward through all-to-alls (no windows, no stages). */
    private static Tensor forwardCollective(Communicator ep, Route r, ExpertBank bank, Tensor buf) {
        Backend b = ep.backend();
        int M = buf.cols();
        DType dt = buf.dtype();
        Stage st = r.stages[0];
        Tensor ysrc;
        try (Tensor recv = b.empty(dt, r.localRows, M)) {
            exchange(ep, r, buf, recv, false);
            indices(b, r);
            if (r.localRows == 0) {
                ysrc = b.zeros(dt, 0, M);
            } else {
                r.releaseActivations();
                st.xin = toExpertOrder(b, recv, st);
                try (Tensor yl = expertsForward(bank, st)) {
                    ysrc = b.empty(dt, r.localRows, M);
                    b.gatherRows(yl, st.toSource, ysrc);
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
     * The forward through the peer windows: buf's rows stored into the owners' X by the dispatch itself, the experts on
     * X, their outputs stored into the sources' Y, which is returned (a view of the window). A pending (dropless) route
     * sends its rows before the counts reach the host, to destinations computed on the device, and finishes on the host
     * while they travel; a padded owner zeroes its input's padding rows once they have arrived.
     */
    private static Tensor forwardPeer(Communicator ep, Route r, ExpertBank bank, int R, int M, DType dt, Rows dispatch) {
        Backend b = ep.backend();
        int P = ep.size(), me = ep.rank();
        if (r.pending() && r.expertsBeforeCounts) return forwardBeforeCounts(ep, r, bank, R, M, dt, dispatch);
        if (r.pending()) {
            dispatchPending(ep, r, R, M, dt, dispatch);
            finishPending(ep, r, r.countsLater.get(), M);   // the layer's one wait, for the counts only
            if (r.redispatch) {   // the window X grew (every rank alike): the rows go again, all of them inside it
                r.redispatch = false;
                dispatchPending(ep, r, R, M, dt, dispatch);
            }
            settled(b, r);
        } else {
            r.releaseActivations();
            indices(b, r);
            r.windows.x.open();
            dispatch.to(r.dispatchDest, Windows.all(r.windows.x, P, dt, M));
            r.windows.x.publish();
        }
        Windows w = r.windows;
        Stage st = r.stages[0];
        w.x.await();
        if (st.padded) b.zeroFreeSlots(w.x.tensor(me, dt, st.expertRows, M), r.localCountsDevice, st.expertRows / st.count);
        w.y.open();
        if (r.localRows > 0) {
            st.xin = w.x.tensor(me, dt, st.expertRows, M);   // a view: the window keeps it until the next forward
            try (Tensor yl = expertsForward(bank, st)) {
                b.scatterRowsTo(yl, r.combineDest, Windows.all(w.y, P, dt, M));
            }
        }
        w.y.publish();
        w.y.await();
        return w.y.tensor(me, dt, R, M);
    }

    /**
     * The forward of a pending route whose experts need nothing from the host ({@link Route#expertsBeforeCounts}): the
     * dispatch, the experts over all of X's rows on the device's offsets (the rows past this rank's input: not the
     * experts', their outputs not stored) and their outputs' stores into Y are queued before the host waits for the
     * counts, so that the wait overlaps the layer instead of holding back its GEMMs. A routing that outgrew X or Y (the
     * counts say so, the same on every rank; rows beyond them went nowhere) runs again in the grown windows; the pass
     * keeps the routed rows only.
     */
    private static Tensor forwardBeforeCounts(Communicator ep, Route r, ExpertBank bank, int R, int M, DType dt, Rows dispatch) {
        Backend b = ep.backend();
        int P = ep.size(), me = ep.rank(), El = bank.experts();   // the bank holds this rank's experts
        r.stages = new Stage[] {new Stage(0, El)};   // finish() fills in its sizes
        Stage st = r.stages[0];
        int[] counts = null;
        do {
            r.redispatch = false;
            dispatchPending(ep, r, R, M, dt, dispatch);
            Windows w = r.windows;
            w.x.await();
            w.y.open();
            st.xin = w.x.tensor(me, dt, r.deviceCombine.rows(), M);   // as many rows as X holds
            try (Tensor yl = bank.forward(st.pass, 0, El, st.xin, r.deviceLocal.view(El, El + 1), null, null)) {
                b.scatterRowsTo(yl, r.deviceCombine, Windows.all(w.y, P, dt, M));   // rows past the input go nowhere
            }
            w.y.publish();
            w.y.await();
            if (counts == null) counts = r.countsLater.get();   // the layer's one wait, behind all of its forward
            finishPending(ep, r, counts, M);
        } while (r.redispatch);   // X or Y grew (every rank alike): everything again, all rows inside them
        settled(b, r);
        if (r.localRows == 0) {
            st.release();
        } else {
            st.xin = st.xin.rowSlice(0, st.expertRows);
            st.pass.keepRows(st.expertRows, st.hostOffsets);   // the backward runs on the routed rows only
        }
        return r.windows.y.tensor(me, dt, R, M);
    }

    /** A pending route once its rows are where the counts say: its index tensors, the combine's destinations of its input rows. */
    private static void settled(Backend b, Route r) {
        indices(b, r);
        r.combineDest = r.deviceCombine.rowSlice(0, r.inputRows);
    }

    /** {@link #finish} for a pending route, whose rows went out through its windows: they must stay. */
    private static void finishPending(Communicator ep, Route r, int[] counts, int M) {
        finish(ep, r, counts, r.windows, M);
        if (r.windows == null) throw new IllegalStateException("peer windows vanished between two forwards");
    }

    /** A pending route's dispatch into X: destinations from the group's counts on the device, then open, stores, publish. */
    private static void dispatchPending(Communicator ep, Route r, int R, int M, DType dt, Rows dispatch) {
        Backend b = ep.backend();
        Windows w = r.windows;
        long windowRows = Windows.rows(w.x, M, dt);
        if (r.deviceDest == null) r.deviceDest = b.empty(DType.I32, R, 2);
        b.epDispatchDestinations(r.gathered, ep.rank(), ep.size(), r.maxPadding, windowRows, r.deviceDest);
        r.dispatchDest = r.deviceDest;
        w.x.open();
        dispatch.to(r.dispatchDest, Windows.all(w.x, ep.size(), dt, M));
        w.x.publish();
        // the combine's destinations too, for as many input rows as X holds (the rows past this rank's input: padding)
        if (r.deviceCombine != null) r.deviceCombine.close();
        r.deviceCombine = b.empty(DType.I32, Math.toIntExact(windowRows), 2);
        if (r.deviceLocal == null) r.deviceLocal = b.empty(DType.I32, Math.toIntExact(2 * (r.gathered.numel() / ep.size() / ep.size()) + 1));
        // the experts' outputs go to Y before its size is checked where they run before the counts (else Y grows first)
        long bufRows = r.expertsBeforeCounts ? Windows.rows(w.y, M, dt) : Long.MAX_VALUE;
        b.epCombineDestinations(r.gathered, ep.rank(), ep.size(), r.maxPadding, bufRows, r.deviceCombine, r.deviceLocal);
    }

    /**
     * The backward through the peer windows: dy's rows stored into the owners' DY by the combine's backward itself (the
     * gate's backward runs while the peers' rows arrive), the experts' data backward, dxin stored into the sources' DX
     * on a side stream ({@link Backend#beside}) while the weight gradients run; returns DX (a view of the window, valid
     * until the layer's next backward).
     */
    private static Tensor backwardPeer(Communicator ep, Route r, ExpertBank bank, int R, int M, DType dt, Rows dy, Runnable beside) {
        Backend b = ep.backend();
        Windows w = r.windows;
        int P = ep.size(), me = ep.rank();
        Stage st = r.stages[0];
        w.dy().open();
        dy.to(r.dispatchDest, Windows.all(w.dy(), P, dt, M));
        w.dy().publish();
        if (beside != null) beside.run();
        w.dy().await();
        // the padding rows' gradients are 0 (the rows held another layer's or step's gradients)
        if (st.padded) b.zeroFreeSlots(w.dy().tensor(me, dt, st.expertRows, M), r.localCountsDevice, st.expertRows / st.count);
        w.dx().open();
        if (r.localRows > 0) {
            try (Tensor dxin = bank.backwardData(st.pass, w.dy().tensor(me, dt, st.expertRows, M))) {
                // dxin's rows travel (and are published) on a side stream while the weight gradients run
                Backend.SideWork stores = b.beside(() -> {
                    b.scatterRowsTo(dxin, r.combineDest, Windows.all(w.dx(), P, dt, M));
                    w.dx().publish();
                });
                bank.backwardWeights(st.pass);
                stores.join();
            }
        } else {
            w.dx().publish();
        }
        w.dx().await();
        return w.dx().tensor(me, dt, R, M);
    }

    /**
     * The overlapped forward: every stage's dispatch is queued on the side stream at once (each a block exchange
     * that the next stage's experts need not wait for), then stage by stage: wait for its rows, run its experts,
     * queue its outputs' way back.
     */
    private static Tensor forwardPipelined(Communicator ep, Route r, ExpertBank bank, Tensor buf) {
        Backend b = ep.backend();
        int M = buf.cols(), G = r.stages.length;
        DType dt = buf.dtype();
        r.releaseActivations();
        Tensor y = b.empty(dt, buf.rows(), M);   // every row of buf is in one stage's blocks
        Tensor[] recv = new Tensor[G], ysrc = new Tensor[G];
        CommWork[] dispatch = new CommWork[G], combine = new CommWork[G];
        try {
            for (int c = 0; c < G; c++) {
                recv[c] = b.empty(dt, r.stages[c].rows, M);
                dispatch[c] = ep.exchangeRowsAsync(buf, r.stages[c].bufBlocks, recv[c], r.stages[c].recvBlocks);
            }
            indices(b, r);
            for (int c = 0; c < G; c++) {
                Stage st = r.stages[c];
                dispatch[c].await();
                if (st.rows == 0) {
                    ysrc[c] = b.empty(dt, 0, M);
                } else {
                    st.xin = toExpertOrder(b, recv[c], st);
                    recv[c].close();
                    try (Tensor yl = expertsForward(bank, st)) {
                        ysrc[c] = b.empty(dt, st.rows, M);
                        b.gatherRows(yl, st.toSource, ysrc[c]);
                    }
                }
                combine[c] = ep.exchangeRowsAsync(ysrc[c], st.recvBlocks, y, st.bufBlocks);
            }
            for (CommWork w : combine) w.await();   // before ysrc is freed and y is read
        } finally {
            for (Tensor t : recv) if (t != null) t.close();
            for (Tensor t : ysrc) if (t != null) t.close();
        }
        return y;
    }

    /**
     * The overlapped backward, stage by stage as the forward: every stage's output gradients queued at once (the
     * gate's backward runs meanwhile), then for each stage its input gradients, queued back, beside its weight
     * gradients. The stages write disjoint experts' gradients with betas claimed once.
     */
    private static Tensor backwardPipelined(Communicator ep, Route r, ExpertBank bank, Tensor dy, Runnable beside) {
        Backend b = ep.backend();
        int M = dy.cols(), G = r.stages.length;
        DType dt = dy.dtype();
        Tensor dbuf = b.empty(dt, dy.rows(), M);
        Tensor[] drecv = new Tensor[G], dyl = new Tensor[G], dsrc = new Tensor[G];
        CommWork[] dispatch = new CommWork[G], back = new CommWork[G];
        try {
            for (int c = 0; c < G; c++) {
                drecv[c] = b.empty(dt, r.stages[c].rows, M);
                dispatch[c] = ep.exchangeRowsAsync(dy, r.stages[c].bufBlocks, drecv[c], r.stages[c].recvBlocks);
            }
            if (beside != null) beside.run();
            float[] betas = bank.claimGradBetas();
            for (int c = 0; c < G; c++) {
                Stage st = r.stages[c];
                dispatch[c].await();
                if (st.rows == 0) {
                    dsrc[c] = b.empty(dt, 0, M);
                    back[c] = ep.exchangeRowsAsync(dsrc[c], st.recvBlocks, dbuf, st.bufBlocks);
                    bank.zeroWeightGrads(st.first, st.count, betas);
                    continue;
                }
                dyl[c] = toExpertOrder(b, drecv[c], st);
                drecv[c].close();
                try (Tensor dxin = bank.backwardData(st.pass, dyl[c])) {
                    dsrc[c] = b.empty(dt, st.rows, M);
                    b.gatherRows(dxin, st.toSource, dsrc[c]);
                }
                back[c] = ep.exchangeRowsAsync(dsrc[c], st.recvBlocks, dbuf, st.bufBlocks);
                bank.backwardWeights(st.pass, betas);   // beside the exchange
            }
            for (CommWork w : back) w.await();   // before dsrc is freed and dbuf is read
        } finally {
            for (Tensor[] ts : new Tensor[][] {drecv, dyl, dsrc}) for (Tensor t : ts) if (t != null) t.close();
        }
        return dbuf;
    }

    /**
     * dy [R, M] (written by {@code dy}) -&gt; dbuf [R, M] (returned; on the peer path a view of the window DX, valid until
     * the layer's next backward); accumulates the local experts' gradients. {@code beside} (may be null) is
     * work that needs nothing of this exchange (the gate's backward): with variable splits or stages it runs while
     * the dispatch exchange of dy travels on the communicator's side stream. The input gradients go back by the
     * reverse all-to-all while the experts' weight gradients are computed ({@link Communicator#allToAllVAsync}).
     */
    static Tensor backward(Communicator ep, Route r, ExpertBank bank, int R, int M, DType dt, Rows dy, Runnable beside) {
        if (r.windows != null) return backwardPeer(ep, r, bank, R, M, dt, dy, beside);
        try (Tensor d = ep.backend().empty(dt, R, M)) {
            dy.into(d);
            return r.pipelined ? backwardPipelined(ep, r, bank, d, beside) : backwardCollective(ep, r, bank, d, beside);
        }
    }

    /** The backward through all-to-alls (no windows, no stages). */
    private static Tensor backwardCollective(Communicator ep, Route r, ExpertBank bank, Tensor dy, Runnable beside) {
        Stage st = r.stages[0];
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
            try (Tensor dyl = toExpertOrder(b, drecv, st); Tensor dsrc = b.empty(dt, r.localRows, M)) {
                try (Tensor dxin = bank.backwardData(st.pass, dyl)) {
                    b.gatherRows(dxin, st.toSource, dsrc);
                }
                CommWork back = exchangeAsync(ep, r, dsrc, dbuf, true);
                bank.backwardWeights(st.pass);   // beside the all-to-all
                back.await();             // before dsrc and dyl are freed and dbuf is read
            }
        }
        return dbuf;
    }

    /**
     * Received rows (source order) in the local experts' order (returned): a gather, or when padded a scatter into
     * zeros, so that the padding rows carry zero activations and gradients and add nothing to the weight gradients.
     */
    private static Tensor toExpertOrder(Backend b, Tensor recv, Stage st) {
        if (!st.padded) {
            Tensor out = b.empty(recv.dtype(), recv.rows(), recv.cols());
            b.gatherRows(recv, st.toExpert, out);
            return out;
        }
        Tensor out = b.zeros(recv.dtype(), st.expertRows, recv.cols());
        b.moePermute(recv, st.toSource.reshape(recv.rows(), 1), out);
        return out;
    }

    /** Stage st's experts on its input (in expert order), into its pass. */
    private static Tensor expertsForward(ExpertBank bank, Stage st) {
        return bank.forward(st.pass, st.first, st.count, st.xin, st.offsets, st.hostOffsets, bank.hasBias() ? st.rowExpert : null);
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
