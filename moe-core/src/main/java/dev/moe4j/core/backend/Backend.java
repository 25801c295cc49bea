package dev.moe4j.core.backend;

import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;

/**
 * Every operation a GPT-MoE training step needs, on one device.
 *
 * <p>Conventions (all ops):
 * <ul>
 *   <li>Tensors are contiguous row-major. "[N, C]" means the tensor seen as a matrix of N rows and C columns:
 *       any leading dimensions are flattened into N, so [B, T, C] activations pass as [B*T, C].</li>
 *   <li>Outputs are passed in (llm.c style) and may be views; the op checks shapes and throws
 *       {@link IllegalArgumentException} naming the argument before doing any work.</li>
 *   <li>Floating tensors may mix F32 and BF16 (and F64 on the CPU): arithmetic is at least fp32, results are
 *       rounded to the output's dtype. Index tensors are I32.</li>
 *   <li>Unless an op says "accumulates", it assigns its outputs. Parameter gradients accumulate (+=);
 *       activation gradients are assigned (=).</li>
 *   <li>Ops are queued in order on the backend's stream; only the host transfers ({@code to*}) and
 *       {@link #synchronize()} wait. A training step calls no host transfer.</li>
 *   <li>Randomness is counter based: element i of a random op draws from (seed, offset + i), so every
 *       backend produces the same numbers (see {@code dev.moe4j.core.backend.Philox}).</li>
 * </ul>
 */
public interface Backend extends AutoCloseable {

    /** Short name, e.g. "cpu" or "cuda:0". */
    String name();

    /** Device ordinal (0 for the CPU). */
    default int deviceIndex() { return 0; }

    /**
     * The native stream (a {@code cudaStream_t} as a long) every op of this backend is queued on, so that a
     * communicator can order its collectives with them; 0 for backends without streams.
     */
    default long nativeStream() { return 0; }

    /** Work queued by {@link #beside}; {@link #join} makes the work queued after it wait for it. */
    interface SideWork {
        void join();
    }

    /**
     * Queues {@code work}'s operations on a second stream that starts after everything queued so far, so that they run
     * beside what is queued after this call until {@link SideWork#join}. Work may launch kernels, copies and stream
     * operations (a communicator's peer-window handshakes), not GEMMs; memory freed before the join is not reused
     * until it. This default runs work at once, in order.
     */
    default SideWork beside(Runnable work) {
        work.run();
        return () -> {};
    }

    /** True when this backend supports the dtype (F64 is CPU-only). */
    boolean supports(DType dtype);

    // ---------------------------------------------------------------- memory and host transfer

    /** A new tensor, zero-filled. */
    Tensor zeros(DType dtype, int... shape);

    /** A new tensor whose contents are unspecified (may be garbage on a GPU). */
    default Tensor empty(DType dtype, int... shape) { return zeros(dtype, shape); }

    /** A new tensor holding {@code data} (rounded to {@code dtype}). */
    Tensor fromFloats(DType dtype, float[] data, int... shape);

    Tensor fromDoubles(DType dtype, double[] data, int... shape);

    Tensor fromInts(int[] data, int... shape);

    float[] toFloats(Tensor t);

    double[] toDoubles(Tensor t);

    int[] toInts(Tensor t);

    /**
     * Starts reading t (I32) to the host behind the work queued so far and returns its values when asked: the supplier
     * waits only for that work, not for what is queued after this call (so the device keeps working on it while the host
     * waits). One read at a time: a later call finishes an earlier one first. This default reads at once.
     */
    default java.util.function.Supplier<int[]> readIntsLater(Tensor t) {
        int[] v = toInts(t);
        return () -> v;
    }

    /** dst = src (same element count; converts dtype). */
    void copy(Tensor src, Tensor dst);

    /** Every element of t = value. */
    void fill(Tensor t, double value);

    /**
     * Milliseconds of device time of everything {@code body} queues on this backend, waiting for it to finish (for
     * benchmarks). A backend with a stream times it between two events there; one that runs ops as they are called
     * (the default) by the wall clock around {@code body} and a {@link #synchronize()}.
     */
    default double timeMs(Runnable body) {
        synchronize();
        long t0 = System.nanoTime();
        body.run();
        synchronize();
        return (System.nanoTime() - t0) / 1e6;
    }

    /**
     * Milliseconds of device time of each of {@code reps} runs of {@code body}, queued back to back without waiting
     * in between (for benchmarks: while the host issues faster than the device runs, the device never waits for it,
     * as in a training loop). A backend with a stream records an event between consecutive runs and waits once at the
     * end; the default times each run by {@link #timeMs}.
     */
    default double[] timeEachMs(int reps, Runnable body) {
        double[] ms = new double[reps];
        for (int i = 0; i < reps; i++) ms[i] = timeMs(body);
        return ms;
    }

    /** Waits until all queued work is done. */
    void synchronize();

    /** Bytes of device memory currently allocated by this backend (including cached free blocks). */
    long allocatedBytes();

    // ---------------------------------------------------------------- random numbers

    /** out[i] = uniform in [lo, hi) drawn from counter (seed, offset + i). */
    void randomUniform(Tensor out, double lo, double hi, long seed, long offset);

    /** out[i] = normal(mean, std) drawn from counter (seed, offset + i). */
    void randomNormal(Tensor out, double mean, double std, long seed, long offset);

    // ---------------------------------------------------------------- matrix products

    /**
     * C = alpha * op(A) * op(B) + beta * C, op = transpose when the flag is set. As in BLAS, an op given beta = 0
     * does not read its output (here and in every op below with a beta): stale values, NaN included, are overwritten.
     * Rank-2: A [M,K] (or [K,M] transposed), B [K,N] (or [N,K]), C [M,N].
     * Rank-3: the same per batch, A, B and C all [batch, ., .].
     */
    void matmul(Tensor a, boolean transA, Tensor b, boolean transB, Tensor c, float alpha, float beta);

    /**
     * C = op(A) * op(B) + bias (assigned), rank 2, bias [N] added to every row: a linear layer's forward. A backend
     * may fuse the bias into the product (CUDA: a cuBLASLt epilogue); the default is {@link #matmul} then
     * {@link #addBias}.
     */
    default void matmulBias(Tensor a, boolean transA, Tensor b, boolean transB, Tensor bias, Tensor c) {
        matmul(a, transA, b, transB, c, 1f, 0f);
        addBias(c, bias, c);
    }

    /**
     * Grouped product over contiguous row segments (the expert FFN): for each expert e, rows
     * offsets[e] .. offsets[e+1] of A [T,K] times W[e] give the same rows of C [T,N]:
     * C_e = A_e * op(W[e]) + beta * C_e. W is [E,K,N], or [E,N,K] with transW.
     * offsets is I32 [E+1], non-decreasing, offsets[0] = 0, offsets[E] <= T; rows past offsets[E] are untouched.
     */
    void groupedMatmul(Tensor a, Tensor w, boolean transW, Tensor offsets, Tensor c, float beta);

    /**
     * {@link #groupedMatmul} with the offsets also given on the host (hostOffsets must hold the same values as
     * offsets; null: none). A GPU backend must otherwise read them back to size its GEMMs, which waits for the
     * stream; callers that know them (capacity mode: e*C; expert parallelism: the exchanged counts) pass them.
     */
    default void groupedMatmul(Tensor a, Tensor w, boolean transW, Tensor offsets, int[] hostOffsets, Tensor c, float beta) {
        groupedMatmul(a, w, transW, offsets, c, beta);
    }

    /**
     * Whether {@link #groupedMatmul} of this dtype over about {@code rows} rows in {@code groups} groups runs faster
     * with the offsets also given on the host, i.e. whether a caller that would have to read them back from the
     * device (a wait for the stream) should. False where the backend reads them where they are.
     */
    default boolean wantsHostOffsets(DType dtype, long rows, int groups) { return false; }

    /**
     * Whether {@link #groupedMatmul} of this dtype over about {@code rows} rows in {@code groups} equal groups (offsets
     * given on the host) is so much faster than over unequal ones that dropless MoE should pad every expert's rows to
     * the largest expert's count (DeepSpeed's layout, without drops) rather than run variable-size groups. False
     * where unequal groups cost no more.
     */
    default boolean prefersEqualGroups(DType dtype, long rows, int groups) { return false; }

    /**
     * The experts' first product and its activation in one: h [T,N'] = A_e W[e] per group (W [E,K,N'], N' =
     * act.inputWidth(N); h kept for the backward) and out [T,N] = act(h). The default is {@link #groupedMatmul}
     * (beta 0) then {@link #activation}; a backend may fuse them (same results). Rows past offsets[E] of h and out
     * are unspecified afterwards.
     */
    default void groupedMatmulActivation(Tensor a, Tensor w, Tensor offsets, int[] hostOffsets, Activation act, Tensor h, Tensor out) {
        groupedMatmul(a, w, false, offsets, hostOffsets, h, 0f);
        activation(act, h, out);
    }

    /**
     * The backward of the experts' second product's data gradient through their activation in one: da = dY_e W[e]^T
     * per group (W [E,N,K], da [T,N]) and dh = d act(h) / dh applied to da (h [T, act.inputWidth(N)], dh h's shape,
     * assigned). The default is {@link #groupedMatmul} then {@link #activationBackward}; a backend may fuse them and
     * never store da (same results). Rows past offsets[E] of dh are unspecified afterwards.
     */
    default void groupedMatmulActivationBackward(Tensor dy, Tensor w, Tensor offsets, int[] hostOffsets, Activation act, Tensor h, Tensor dh) {
        try (Tensor da = empty(h.dtype(), dy.rows(), w.shape().dim(1))) {
            groupedMatmul(dy, w, true, offsets, hostOffsets, da, 0f);
            activationBackward(act, h, da, dh);
        }
    }

    /**
     * The weight gradient of {@link #groupedMatmul}: dW[e] = beta * dW[e] + A_e^T * dY_e, with A [T,K],
     * dY [T,N], dW [E,K,N]; an expert without rows gets dW[e] = beta * dW[e], zero for beta = 0. (For a transposed
     * weight, call with A and dY swapped.)
     */
    void groupedMatmulWeightGrad(Tensor a, Tensor dy, Tensor offsets, Tensor dw, float beta);

    /** {@link #groupedMatmulWeightGrad} with the offsets also on the host (see the hostOffsets form of groupedMatmul). */
    default void groupedMatmulWeightGrad(Tensor a, Tensor dy, Tensor offsets, int[] hostOffsets, Tensor dw, float beta) {
        groupedMatmulWeightGrad(a, dy, offsets, dw, beta);
    }

    // ---------------------------------------------------------------- elementwise

    /** out = alpha * a + beta * b (same element count; out may alias a or b). */
    void add(Tensor a, double alpha, Tensor b, double beta, Tensor out);

    /** out = a * b elementwise. */
    void mul(Tensor a, Tensor b, Tensor out);

    /** out = alpha * x. */
    void scale(Tensor x, double alpha, Tensor out);

    /** out[n, c] = x[n, c] + bias[c]. */
    void addBias(Tensor x, Tensor bias, Tensor out);

    /**
     * out[n, c] = x[n, c] + bias[group[n], c] (nothing added where group[n] &lt; 0): each row's bias from a table, as the
     * experts of a grouped layer add theirs. bias [G, C], group I32 [N]. The default gathers the rows, then adds.
     */
    default void addGroupBias(Tensor x, Tensor bias, Tensor group, Tensor out) {
        try (Tensor rows = empty(x.dtype(), x.rows(), x.cols())) {
            gatherRows(bias, group, rows);
            add(x, 1, rows, 1, out);
        }
    }

    /** out[c] = beta * out[c] + sum_n x[n, c]  (bias gradients; accumulates with beta = 1). */
    void sumRows(Tensor x, Tensor out, float beta);

    /** out[n] = sum_c a[n, c] * b[n, c]. */
    void rowDot(Tensor a, Tensor b, Tensor out);

    /** out = act(x); x [N, act.inputWidth(F)], out [N, F]. */
    void activation(Activation act, Tensor x, Tensor out);

    /** dx = d act(x) / dx applied to dout; dx has x's shape (assigned). */
    void activationBackward(Activation act, Tensor x, Tensor dout, Tensor dx);

    /**
     * out = act(x + bias[group[n]]) row by row (nothing added where group[n] &lt; 0): the first bias of grouped experts
     * taken into their activation, so that the biased pre-activation is never stored (the backward adds the bias
     * again). x [N, W] (W = act.inputWidth(F)), bias [G, W], group I32 [N], out [N, F]. The default adds, then applies.
     */
    default void activationGroupBias(Activation act, Tensor x, Tensor bias, Tensor group, Tensor out) {
        try (Tensor pre = empty(x.dtype(), x.rows(), x.cols())) {
            addGroupBias(x, bias, group, pre);
            activation(act, pre, out);
        }
    }

    /**
     * The backward of {@link #activationGroupBias}: dx = d act(x + bias[group[n]]) applied to dout (assigned, x's
     * shape), and dbias[g] += the sum of rows offsets[g] .. offsets[g+1] of dx (offsets I32 [G+1] as in
     * {@link #sumRowsGrouped}). The default adds, differentiates, then sums.
     */
    default void activationGroupBiasBackward(Activation act, Tensor x, Tensor bias, Tensor group, Tensor offsets, Tensor dout,
                                             Tensor dx, Tensor dbias) {
        try (Tensor pre = empty(x.dtype(), x.rows(), x.cols())) {
            addGroupBias(x, bias, group, pre);
            activationBackward(act, pre, dout, dx);
        }
        sumRowsGrouped(dx, offsets, dbias);
    }

    // ---------------------------------------------------------------- normalisation and softmax

    /**
     * LayerNorm over the last dimension: x [N,C], gamma/beta [C], out [N,C];
     * saves mean [N] and rstd [N] (F32) for the backward.
     */
    void layerNorm(Tensor x, Tensor gamma, Tensor beta, float eps, Tensor out, Tensor mean, Tensor rstd);

    /** dx assigned; dgamma and dbeta accumulate. */
    void layerNormBackward(Tensor dout, Tensor x, Tensor gamma, Tensor mean, Tensor rstd,
                           Tensor dx, Tensor dgamma, Tensor dbeta);

    /**
     * As {@link #layerNormBackward(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)}, with dx = the
     * LayerNorm's input gradient + residual [N,C] (the gradient that reaches the same input around the LayerNorm
     * through a residual connection). A backend may add it in the same pass (CUDA: before dx's one rounding); the
     * default adds it after.
     */
    default void layerNormBackward(Tensor dout, Tensor x, Tensor gamma, Tensor mean, Tensor rstd, Tensor residual,
                                   Tensor dx, Tensor dgamma, Tensor dbeta) {
        layerNormBackward(dout, x, gamma, mean, rstd, dx, dgamma, dbeta);
        add(dx, 1, residual, 1, dx);
    }

    /** Row softmax: x [N,C] -> out [N,C]. */
    void softmax(Tensor x, Tensor out);

    /** dx = y * (dy - rowsum(dy * y)), y the softmax output (assigned). */
    void softmaxBackward(Tensor y, Tensor dy, Tensor dx);

    // ---------------------------------------------------------------- attention

    /**
     * Causal multi-head self-attention. qkv [B,T,3C] holds per token q, k, v, each C = H*D wide, head h at
     * columns h*D..; out [B,T,C] (heads concatenated); lse [B,H,T] F32 saves each query row's
     * log-sum-exp of scaled scores for the backward. Scale 1/sqrt(D).
     */
    void attention(Tensor qkv, int heads, Tensor out, Tensor lse);

    /** dqkv [B,T,3C] assigned from dout [B,T,C], using the forward's qkv, out and lse. */
    void attentionBackward(Tensor dout, Tensor qkv, Tensor out, Tensor lse, int heads, Tensor dqkv);

    // ---------------------------------------------------------------- embedding and losses

    /** out[b,t] = wte[tokens[b,t]] + wpe[t] (wpe may be null). tokens I32 [B,T]; out [B,T,C]. */
    void embedding(Tensor tokens, Tensor wte, Tensor wpe, Tensor out);

    /** dwte[tokens[b,t]] += dout[b,t]; dwpe[t] += sum_b dout[b,t] (dwpe may be null). Accumulates. */
    void embeddingBackward(Tensor dout, Tensor tokens, Tensor dwte, Tensor dwpe);

    /**
     * Softmax cross-entropy per row: losses[n] = logsumexp(logits[n]) - logits[n, targets[n]];
     * rows whose target is negative are ignored (loss 0). logits [N,V], targets I32 [N], losses F32 [N].
     */
    void crossEntropy(Tensor logits, Tensor targets, Tensor losses);

    /** dlogits[n] = scale * (softmax(logits[n]) - onehot(targets[n])), zero for ignored rows (assigned). */
    void crossEntropyBackward(Tensor logits, Tensor targets, float scale, Tensor dlogits);

    /**
     * Distillation term per row: losses[n] = T^2 * KL(softmax(teacher[n]/T) || softmax(student[n]/T)).
     * student, teacher [N,V]; losses F32 [N].
     */
    void distillationLoss(Tensor student, Tensor teacher, float temperature, Tensor losses);

    /** dstudent = scale * d(sum_n losses[n]) / dstudent (assigned). */
    void distillationLossBackward(Tensor student, Tensor teacher, float temperature, float scale, Tensor dstudent);

    // ---------------------------------------------------------------- rows by index

    /** out[m] = src[idx[m]], zero where idx[m] &lt; 0. src [N,C], idx I32 [M], out [M,C]. */
    void gatherRows(Tensor src, Tensor idx, Tensor out);

    /** dst[idx[m]] += w[m] * src[m] for idx[m] &gt;= 0 (w may be null: 1). Accumulates. */
    void scatterAddRows(Tensor src, Tensor idx, Tensor w, Tensor dst);

    /**
     * Row m of src to row dest[m, 1] of dsts[dest[m, 0]], skipped where dest[m, 0] &lt; 0: src [N, C], dest I32 [N, 2],
     * each of dsts [*, C] of src's dtype, a bit-exact move. The expert-parallel exchange stores its rows with it straight
     * into the ranks' {@link dev.moe4j.core.comm.PeerWindow}s. This default reads dest to the host and scatters
     * destination by destination.
     */
    default void scatterRowsTo(Tensor src, Tensor dest, Tensor[] dsts) {
        Checks.scatterRowsTo(src, dest, dsts);
        int n = src.rows();
        int[] d = toInts(dest);
        for (int q = 0; q < dsts.length; q++) {
            int count = 0;
            for (int m = 0; m < n; m++) if (d[2 * m] == q) count++;
            if (count == 0) continue;
            int[] rows = new int[count], to = new int[count];
            for (int m = 0, i = 0; m < n; m++) if (d[2 * m] == q) { rows[i] = m; to[i++] = d[2 * m + 1]; }
            try (Tensor ri = fromInts(rows, count); Tensor ti = fromInts(to, count, 1); Tensor moved = empty(src.dtype(), count, src.cols())) {
                gatherRows(src, ri, moved);
                moePermute(moved, ti, dsts[q]);
            }
        }
    }

    /**
     * Device memory that this backend did not allocate (a peer's window mapped into this process) as a storage of its
     * tensors, which frees nothing on release; null for a backend without device memory. This default has none.
     */
    default dev.moe4j.core.tensor.Storage wrapDeviceMemory(long address, long bytes) { return null; }

    /**
     * Returns the memory this backend keeps cached for its next tensors to the device, after its queued work: for an
     * allocation made beside the backend (a peer window) that found the device full. A no-op where nothing is cached.
     */
    default void releaseCachedMemory() {}

    /**
     * out[g] += the sum of rows offsets[g] .. offsets[g+1] of x, for each group g: x [R, C], offsets I32 [G+1] (the
     * grouped GEMMs' offsets: non-decreasing, offsets[G] &lt;= R; rows past it are not read), out [G, C]. Accumulates.
     * The bias gradient of grouped experts. This default reads the offsets to the host and sums each group with
     * {@link #sumRows}; a backend with a stream does it on the device.
     */
    default void sumRowsGrouped(Tensor x, Tensor offsets, Tensor out) {
        int[] off = offsets.toInts();
        int groups = off.length - 1, c = x.cols();
        Checks.matrix("sumRowsGrouped", "out", out, groups, c);
        for (int g = 0; g < groups; g++) {
            if (off[g] < 0 || off[g] > off[g + 1] || off[g + 1] > x.rows()) {
                throw new IllegalArgumentException("sumRowsGrouped: offsets must be non-decreasing within [0, " + x.rows() + "], got " + java.util.Arrays.toString(off));
            }
            if (off[g + 1] > off[g]) sumRows(x.rowSlice(off[g], off[g + 1] - off[g]), out.view((long) g * c, c), 1f);
        }
    }

    // ---------------------------------------------------------------- reductions

    /** out[0] = sum of all elements of x (out: 1 element). */
    void sum(Tensor x, Tensor out);

    /** out[0] = beta * out[0] + sum of x[i]^2 (global gradient norms). */
    void sumSquares(Tensor x, Tensor out, float beta);

    // ---------------------------------------------------------------- MoE routing (dev.moe4j.core.moe)

    /**
     * The fused gate: from fp32 logits [S,E] computes softmax gates, top-k experts, capacity slots and the
     * l_aux / z-loss statistics, as {@link GateSpec} describes. See GateSpec for every output's meaning.
     */
    void moeGate(GateSpec spec, Tensor logits, GateOutputs out);

    /**
     * The gate's linear layer and {@link #moeGate}: logits [S,E] = x [S,M] weight^T (weight [E,M]; logits written in
     * their dtype, for the backward), then the gate on them. A backend may fuse the two.
     */
    default void moeGateLinear(GateSpec spec, Tensor x, Tensor weight, Tensor logits, GateOutputs out) {
        matmul(x, false, weight, true, logits, 1f, 0f);
        moeGate(spec, logits, out);
    }

    /**
     * Backward of {@link #moeGate}: dlogits [S,E] (assigned) of loss = f(weights) + lauxCoeff * l_aux +
     * zlossCoeff * z-loss, given dweights = df/dweights [S,k]. Flows through the softmax, the top-k
     * renormalisation over kept choices (nothing through the discrete choices, slots or l_aux's mask) and the
     * z-loss. Saved: the forward's outputs (gates, experts, dest, weights, and counts: for k = 1 the first-choice counts of l_aux).
     */
    void moeGateBackward(GateSpec spec, Tensor logits, GateOutputs saved, Tensor dweights,
                         float lauxCoeff, float zlossCoeff, Tensor dlogits);

    /**
     * A dropless {@link #moeGate}'s routing in the capacity layout with capacity C (at least its largest count, so that
     * nothing drops): dest I32 [S,k] (assigned) = e*C + the choice's place within its expert e (dropless dest -
     * offsets[e]), offsets I32 [E+1] (assigned) = e*C. It is what moeGate with capacity C gives on the same logits and
     * random draws, whose other outputs equal the dropless call's. This default computes it on the host.
     */
    default void moeGatePad(GateOutputs dropless, int capacity, Tensor dest, Tensor offsets) {
        String op = "moeGatePad";
        Checks.gatePad(op, dropless, capacity, dest, offsets);
        int s = dest.dim(0), k = dest.dim(1), e = Math.toIntExact(offsets.numel() - 1);
        int[] counts = toInts(dropless.counts()), ex = toInts(dropless.experts()), d = toInts(dropless.dest()), off = toInts(dropless.offsets());
        int most = java.util.Arrays.stream(counts).max().orElse(0);
        if (capacity < most) throw new IllegalArgumentException(op + ": capacity " + capacity + " is below the largest expert count " + most);
        int[] pd = new int[d.length], po = new int[e + 1];
        for (int i = 0; i < d.length; i++) {
            if (d[i] < 0) throw new IllegalArgumentException(op + ": the routing drops choice " + i + "; it must be a dropless one");
            pd[i] = ex[i] * capacity + d[i] - off[ex[i]];
        }
        for (int j = 0; j <= e; j++) po[j] = j * capacity;
        try (Tensor td = fromInts(pd, s, k); Tensor to = fromInts(po, e + 1)) {
            copy(td, dest);
            copy(to, offsets);
        }
    }

    /** Dispatch: buf[dest[s,j]] = x[s] for dest[s,j] &gt;= 0. x [S,M], dest I32 [S,k], buf [R,M]; other rows untouched. */
    void moePermute(Tensor x, Tensor dest, Tensor buf);

    /**
     * Dispatch into the buffer of one {@link #moeGate} call that writes <em>every</em> row of buf, so that buf needs no
     * zero fill first (its unused rows feed the expert GEMMs and must be 0): buf[dest[s,j]] = x[s] for dest[s,j] &gt;= 0,
     * every other row 0. dest and counts (I32 [E], {@link GateOutputs#counts}) are that call's outputs and capacity its
     * spec's capacity C:
     * <ul>
     *   <li>C &gt; 0: buf is [E*C, M]. The gate gives expert e's choices the slots 0 .. counts[e]-1 (counts before
     *       dropping) and keeps those below C, so the rows set to 0 are e*C + c for min(counts[e], C) &lt;= c &lt; C:
     *       the unused capacity, or the padding of a padded dropless layout (C = the largest count).</li>
     *   <li>C &lt;= 0 (dropless, sorted by expert): buf is [S*k, M] and dest addresses every row; counts is not read.</li>
     * </ul>
     * Other dest or counts break the promise (the CPU backend checks and throws; a GPU backend may not).
     */
    default void moePermute(Tensor x, Tensor dest, Tensor counts, int capacity, Tensor buf) {
        if (capacity > 0) fill(buf, 0);
        moePermute(x, dest, buf);
    }

    /**
     * Combine: out[s] = sum_j w[s,j] * buf[dest[s,j]] over dest[s,j] &gt;= 0 (w null: weight 1). Assigned.
     * With w null it is also the backward of {@link #moePermute}.
     */
    void moeUnpermute(Tensor buf, Tensor dest, Tensor w, Tensor out);

    /**
     * Backward of the weighted combine: dbuf[dest[s,j]] = w[s,j] * dout[s] (rows not addressed untouched),
     * dw[s,j] = dot(dout[s], buf[dest[s,j]]) (0 where dest &lt; 0). dw (and then buf) may be null: not computed.
     */
    void moeUnpermuteBackward(Tensor dout, Tensor buf, Tensor dest, Tensor w, Tensor dbuf, Tensor dw);

    /**
     * {@link #moeUnpermuteBackward} that writes <em>every</em> row of dbuf (0 where dest addresses none), so that dbuf
     * needs no zero fill first; dest, counts and capacity are one {@link #moeGate} call's, as in the counts form of
     * {@link #moePermute}, which says which rows are set to 0.
     */
    default void moeUnpermuteBackward(Tensor dout, Tensor buf, Tensor dest, Tensor w, Tensor counts, int capacity, Tensor dbuf, Tensor dw) {
        if (capacity > 0) fill(dbuf, 0);
        moeUnpermuteBackward(dout, buf, dest, w, dbuf, dw);
    }

    /**
     * The expert-parallel dispatch's destinations, from the group's routing on the device (no host read): counts I32
     * [P * E] (rank p's rows for expert e at p * E + e: the all-gathered gate counts), this rank me of P; out I32 [R, 2]
     * gets (owner, row in the owner's input) for each row of this rank's dispatch buffer (R = its rows), as
     * {@link ExpertLayout#dispatch} lays them out (maxPadding: when an owner pads), (-1, row) for rows at or beyond
     * windowRows. This default reads the counts and uploads ExpertLayout's result.
     */
    default void epDispatchDestinations(Tensor counts, int me, int P, double maxPadding, long windowRows, Tensor out) {
        Checks.dtype("epDispatchDestinations", "counts", counts, DType.I32);
        int[] d = new ExpertLayout(toInts(counts), P, maxPadding).dispatch(me, windowRows);
        Checks.matrix("epDispatchDestinations", "out", out, d.length / 2, 2);
        if (d.length == 0) return;
        try (Tensor t = fromInts(d, d.length / 2, 2)) {
            copy(t, out);
        }
    }

    /**
     * The expert-parallel combine's destinations on the device, {@link ExpertLayout#combine}: for each row of rank me's
     * input (its experts' rows by source, padded as {@link #epDispatchDestinations} lays them out), out I32 [rows, 2]
     * gets (source rank, row in the source's dispatch buffer), (-1, 0) for padding rows, for rows past the input (out
     * may have more rows than the input: the caller need not know its size yet) and for rows whose place in the
     * source's buffer is at or beyond bufRows (the sources' windows are smaller: they must grow first). local (may be
     * null) I32 [2 * El + 1] gets the rows of each of me's El experts, then the El + 1 offsets of its experts in the input (the
     * grouped GEMMs'; none past out's rows, so that GEMMs over as many rows as out has stay inside them when the input
     * is larger), so that nothing of the layout needs an upload. This default reads the counts and uploads
     * ExpertLayout's results.
     */
    default void epCombineDestinations(Tensor counts, int me, int P, double maxPadding, long bufRows, Tensor out, Tensor local) {
        Checks.dtype("epCombineDestinations", "counts", counts, DType.I32);
        int rows = out.rows();
        Checks.matrix("epCombineDestinations", "out", out, rows, 2);
        ExpertLayout lay = new ExpertLayout(toInts(counts), P, maxPadding);
        if (local != null) {
            int[] lc = lay.localCounts(me), l = new int[2 * lc.length + 1];
            System.arraycopy(lc, 0, l, 0, lc.length);
            for (int j = 0; j <= lc.length; j++) l[lc.length + j] = Math.min(rows, j < lc.length ? lay.start(me * lc.length + j, 0) : lay.inputRows(me));
            Checks.numel("epCombineDestinations", "local", local, l.length);
            try (Tensor t = fromInts(l, l.length)) {
                copy(t, local);
            }
        }
        if (rows == 0) return;
        int[] c = lay.combine(me), all = new int[2 * rows];
        for (int i = 0; i < rows; i++) all[2 * i] = -1;
        System.arraycopy(c, 0, all, 0, Math.min(c.length, all.length));
        for (int i = 0; i < rows; i++) {
            if (all[2 * i + 1] >= bufRows) {
                all[2 * i] = -1;
                all[2 * i + 1] = 0;
            }
        }
        try (Tensor t = fromInts(all, rows, 2)) {
            copy(t, out);
        }
    }

    /**
     * Zeroes the free slots of buf [G * C, M]: rows g*C + c for min(counts[g], C) &lt;= c &lt; C (counts I32 [G]), as the
     * counts form of {@link #moePermute} does. A padded expert input whose rows arrived otherwise (peer windows) gets its
     * padding zeroed with it.
     */
    default void zeroFreeSlots(Tensor buf, Tensor counts, int capacity) {
        int[] c = toInts(counts);
        if ((long) c.length * capacity != buf.rows()) {
            throw new IllegalArgumentException("zeroFreeSlots: buf has " + buf.rows() + " rows, expected " + c.length + " x " + capacity);
        }
        for (int g = 0; g < c.length; g++) {
            int used = Math.max(0, Math.min(c[g], capacity));
            if (used < capacity) fill(buf.rowSlice(g * capacity + used, capacity - used), 0);
        }
    }

    /**
     * The counts form of {@link #moePermute} into a buffer [R, M] whose rows live scattered over dsts: its row r is row
     * rowDest[r, 1] of dsts[rowDest[r, 0]] (nowhere where rowDest[r, 0] &lt; 0), R = rowDest's rows, as
     * {@link #scatterRowsTo} places them. The expert-parallel dispatch stores every row (the free slots' zeros too)
     * straight at its place in its owner's {@link dev.moe4j.core.comm.PeerWindow} with it, no buffer between. This
     * default dispatches into a buffer and scatters that.
     */
    default void moePermuteTo(Tensor x, Tensor dest, Tensor counts, int capacity, Tensor rowDest, Tensor[] dsts) {
        Checks.rowDestinations("moePermuteTo", rowDest.rows(), x.cols(), x.dtype(), rowDest, dsts);
        try (Tensor buf = empty(x.dtype(), rowDest.rows(), x.cols())) {
            moePermute(x, dest, counts, capacity, buf);
            scatterRowsTo(buf, rowDest, dsts);
        }
    }

    /**
     * The counts form of {@link #moeUnpermuteBackward} with dbuf's rows scattered over dsts as {@link #moePermuteTo}
     * places buf's (dbuf [R, M], R = rowDest's rows; buf, when dw is computed, an ordinary [R, M] tensor). This default
     * writes a dbuf and scatters it.
     */
    default void moeUnpermuteBackwardTo(Tensor dout, Tensor buf, Tensor dest, Tensor w, Tensor counts, int capacity, Tensor rowDest,
                                        Tensor[] dsts, Tensor dw) {
        Checks.rowDestinations("moeUnpermuteBackwardTo", rowDest.rows(), dout.cols(), dout.dtype(), rowDest, dsts);
        try (Tensor dbuf = empty(dout.dtype(), rowDest.rows(), dout.cols())) {
            moeUnpermuteBackward(dout, buf, dest, w, counts, capacity, dbuf, dw);
            scatterRowsTo(dbuf, rowDest, dsts);
        }
    }

    // ---------------------------------------------------------------- optimizer

    /**
     * One fused AdamW update over a flat parameter range (decoupled weight decay):
     * g = grad * clip, clip = min(1, maxNorm / sqrt(normSq[0])) when normSq is given (else 1);
     * m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p).
     * If normSq[0] is not finite the update is skipped entirely (a NaN step must not poison the run).
     * param, m, v F32 (master); grad F32 or BF16; modelCopy (nullable) receives the new params in its dtype.
     */
    void adamw(Tensor param, Tensor grad, Tensor m, Tensor v, AdamWParams h, Tensor normSq, Tensor modelCopy);

    /** Releases everything this backend holds. */
    @Override
    void close();
}
