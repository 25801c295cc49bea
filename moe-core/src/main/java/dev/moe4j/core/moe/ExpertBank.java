package dev.moe4j.core.moe;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.nn.ExpertShard;
import dev.moe4j.core.nn.Init;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.nn.Parameter;
import dev.moe4j.core.tensor.SavedTensors;
import dev.moe4j.core.tensor.Tensor;


/**
 * E expert FFNs {@code fc2(act(fc1(x)))} with all weights in one tensor each, so a backend runs them as
 * grouped GEMMs over the expert-sorted row segments of the dispatch buffer:
 * fc1 [E, M, F'] (F' = act.inputWidth(F): 2F for GEGLU/SwiGLU, laid out [a | b]), fc2 [E, F, M], optional
 * biases [E, F'] and [E, M].
 *
 * <p>With {@code offsets == null} the bank must hold one expert and runs it on every row with plain GEMMs:
 * the dense MLP of Residual-MoE and the always-on shared experts.
 */
public final class ExpertBank implements AutoCloseable {
    private final ModelContext ctx;
    private final Backend b;
    private final int experts, hidden, ffn, ffnIn;
    private final Activation act;
    private final Parameter fc1, fc2, b1, b2;

    private final Pass main = new Pass();   // the pass of forward/backward without an explicit one

    /**
     * What one forward keeps for its backward. A layer that runs the bank on several row sets in one step (the
     * expert-parallel stages, each over its own experts) gives each its own pass.
     */
    public static final class Pass implements AutoCloseable {
        private final SavedTensors saved = new SavedTensors();
        private int first, count;      // the experts this pass runs: [first, first + count)
        private Tensor x, h1, a, offsets, rowExpert;
        private int[] hostOffsets;     // offsets on the host when the caller knew them, else null
        private Tensor dh1, dy;        // between backwardData and backwardWeights

        /**
         * Keeps the first {@code rows} rows of what the forward saved, with the offsets now also on the host
         * (hostOffsets, same values as the forward's device offsets): a forward over more rows than its offsets reach
         * (expert parallelism sized by its window before the counts came), whose backward then runs on these.
         */
        void keepRows(int rows, int[] hostOffsets) {
            if (dh1 != null) throw new IllegalStateException("ExpertBank.Pass.keepRows between backwardData and backwardWeights");
            x = x.rowSlice(0, rows);
            h1 = h1.rowSlice(0, rows);
            a = a.rowSlice(0, rows);
            this.hostOffsets = hostOffsets;
        }

        @Override
        public void close() {
            if (dh1 != null) dh1.close();
            dh1 = null;
            dy = null;
            saved.close();
            h1 = null;
            a = null;
        }
    }

    /**
     * Declares {@code name.fc1.weight} [E,M,F'], {@code name.fc2.weight} [E,F,M] (normal(initStd) and
     * normal(outStd)) and, with {@code bias}, {@code name.fc1.bias} [E,F'] and {@code name.fc2.bias} [E,M] (zeros).
     */
    public ExpertBank(ModelContext ctx, String name, int experts, int hidden, int ffn, Activation act,
                      boolean bias, double initStd, double outStd) {
        this(ctx, name, experts, hidden, ffn, act, bias, initStd, outStd, null);
    }

    /**
     * As above; with {@code shard} non-null the bank holds experts [shard.firstRow, + experts) of an MoE layer's
     * routed experts (expert parameters, see {@link ExpertShard}); null for the dense MLP and shared experts.
     */
    public ExpertBank(ModelContext ctx, String name, int experts, int hidden, int ffn, Activation act,
                      boolean bias, double initStd, double outStd, ExpertShard shard) {
        if (experts < 1) throw new IllegalArgumentException("ExpertBank " + name + ": experts must be >= 1, got " + experts);
        if (hidden < 1) throw new IllegalArgumentException("ExpertBank " + name + ": hidden must be >= 1, got " + hidden);
        if (ffn < 1) throw new IllegalArgumentException("ExpertBank " + name + ": ffn must be >= 1, got " + ffn);
        this.ctx = ctx;
        this.b = ctx.backend();
        this.experts = experts;
        this.hidden = hidden;
        this.ffn = ffn;
        this.act = act;
        this.ffnIn = act.inputWidth(ffn);
        this.fc1 = ctx.params().add(name + ".fc1.weight", Init.normal(initStd), true, shard, experts, hidden, ffnIn);
        this.fc2 = ctx.params().add(name + ".fc2.weight", Init.normal(outStd), true, shard, experts, ffn, hidden);
        this.b1 = bias ? ctx.params().add(name + ".fc1.bias", Init.zeros(), false, shard, experts, ffnIn) : null;
        this.b2 = bias ? ctx.params().add(name + ".fc2.bias", Init.zeros(), false, shard, experts, hidden) : null;
    }

    public int experts() { return experts; }

    public boolean hasBias() { return b1 != null; }

    public Parameter fc1() { return fc1; }

    public Parameter fc2() { return fc2; }

    public Parameter fc1Bias() { return b1; }

    public Parameter fc2Bias() { return b2; }

    /**
     * x [R, M] -&gt; y [R, M]. offsets I32 [E+1]: expert e owns rows offsets[e] .. offsets[e+1] (rows past
     * offsets[E] give unspecified output); null: one expert on all rows. rowExpert I32 [R] (the expert of each
     * row, any valid expert for unused rows) is needed for the biases of a multi-expert bank, else null.
     * x must stay unchanged until {@link #backward}.
     */
    public Tensor forward(Tensor x, Tensor offsets, Tensor rowExpert) {
        return forward(x, offsets, null, rowExpert);
    }

    /**
     * {@link #forward(Tensor, Tensor, Tensor)} with the offsets also on the host when the caller knows them
     * (hostOffsets, same values; null: none): the GPU then sizes its grouped GEMMs without waiting for the stream.
     */
    public Tensor forward(Tensor x, Tensor offsets, int[] hostOffsets, Tensor rowExpert) {
        return forward(main, 0, experts, x, offsets, hostOffsets, rowExpert);
    }

    /**
     * The forward of experts [first, first + count) into pass {@code p} (its previous contents released first):
     * offsets [count + 1] and rowExpert count from {@code first}. A pass over part of the experts (an
     * expert-parallel stage) writes its weight gradients by {@link #backwardWeights(Pass, float[])}, with betas
     * claimed once for all parts.
     */
    public Tensor forward(Pass p, int first, int count, Tensor x, Tensor offsets, int[] hostOffsets, Tensor rowExpert) {
        p.close();
        int R = x.rows();
        if (first < 0 || count < 1 || first + count > experts) throw new IllegalArgumentException("ExpertBank: experts [" + first + ", " + (first + count) + ") out of [0, " + experts + ")");
        if (x.cols() != hidden) throw new IllegalArgumentException("ExpertBank: x is " + x.shape() + ", expected last dimension " + hidden);
        if (offsets == null && experts != 1) throw new IllegalArgumentException("ExpertBank: offsets are required for a bank of " + experts + " experts");
        if (offsets != null && b1 != null && rowExpert == null) throw new IllegalArgumentException("ExpertBank: rowExpert is required for the biases of a multi-expert bank");
        p.first = first;
        p.count = count;
        p.x = x;
        p.offsets = offsets;
        p.hostOffsets = hostOffsets;
        p.rowExpert = rowExpert;
        // h1 [R,F'] = x [R,M] * fc1[e] [M,F'] (+ b1[e]); a [R,F] = act(h1). Grouped experts keep h1 without its bias
        // and add it in the activation (and again in its backward): the biased h1 is never written and read back.
        p.h1 = p.saved.keep(b.empty(ctx.dtype(), R, ffnIn));
        p.a = p.saved.keep(b.empty(ctx.dtype(), R, ffn));
        if (fusedBias1(p)) {
            linear(p, x, fc1, false, null, p.h1);
            b.activationGroupBias(act, p.h1, part(p, b1.value()), rowExpert, p.a);
        } else if (p.offsets != null && b1 == null) {   // grouped without a first bias: the activation may go with the product
            b.groupedMatmulActivation(x, part(p, fc1.value()), p.offsets, p.hostOffsets, act, p.h1, p.a);
        } else {
            linear(p, x, fc1, false, b1, p.h1);
            b.activation(act, p.h1, p.a);
        }
        // y [R,M] = a [R,F] * fc2[e] [F,M] (+ b2[e])
        Tensor y = b.empty(ctx.dtype(), R, hidden);
        linear(p, p.a, fc2, false, b2, y);
        return y;
    }

    /** Whether pass p's first bias goes with the activation (grouped experts with biases) rather than with fc1's product. */
    private boolean fusedBias1(Pass p) { return b1 != null && p.offsets != null; }

    /** Experts [p.first, + p.count) of an [E, ...] expert tensor (the tensor itself when the pass runs them all). */
    private Tensor part(Pass p, Tensor t) {
        if (p.count == experts) return t;
        long per = t.numel() / experts;
        int[] dims = t.shape().dims();
        dims[0] = p.count;
        return t.view(p.first * per, dims);
    }

    /** out = in * W[e] (+ bias[e]) per row segment of pass p; W [E,K,N] (or [E,N,K] transposed). */
    private void linear(Pass p, Tensor in, Parameter w, boolean transW, Parameter bias, Tensor out) {
        if (p.offsets == null) {
            Tensor w2 = w.value().reshape(w.shape().dim(1), w.shape().dim(2));
            if (bias != null) b.matmulBias(in, false, w2, transW, bias.value().reshape(out.cols()), out);
            else b.matmul(in, false, w2, transW, out, 1f, 0f);
        } else {
            b.groupedMatmul(in, part(p, w.value()), transW, p.offsets, p.hostOffsets, out, 0f);
            if (bias != null) b.addGroupBias(out, part(p, bias.value()), p.rowExpert, out);
        }
    }

    /** dW = beta * dW + in^T * dout per segment of pass p; dbias += row sums per expert. */
    private void linearWeightGrad(Pass p, Tensor in, Tensor dout, Parameter w, float beta, Parameter bias) {
        if (p.offsets == null) {
            Tensor g = w.grad().reshape(w.shape().dim(1), w.shape().dim(2));
            b.matmul(in, true, dout, false, g, 1f, beta);
            if (bias != null) b.sumRows(dout, bias.grad().reshape(dout.cols()), bias.gradBeta());
        } else {
            // beta 0 also zeroes the gradient of an expert without rows
            b.groupedMatmulWeightGrad(in, dout, p.offsets, p.hostOffsets, part(p, w.grad()), beta);
            if (bias != null) b.sumRowsGrouped(dout, p.offsets, part(p, bias.definedGrad()));
        }
    }

    /** dy [R, M] -&gt; dx [R, M] (returned, assigned); accumulates the weight (and bias) gradients. */
    public Tensor backward(Tensor dy) {
        Tensor dx = backwardData(main, dy);
        backwardWeights(main);
        return dx;
    }

    /**
     * The input gradient only: dy [R, M] -&gt; dx [R, M] (returned). The weight gradients follow with
     * {@link #backwardWeights(Pass)}, which may run while dx travels (expert parallelism sends it back by
     * all-to-all); dy must stay unchanged until then.
     */
    public Tensor backwardData(Pass p, Tensor dy) {
        if (p.h1 == null) throw new IllegalStateException("ExpertBank.backward called before forward");
        if (p.dh1 != null) throw new IllegalStateException("ExpertBank.backwardData called twice without backwardWeights");
        int R = p.x.rows();
        // da [R,F] = dy [R,M] * fc2[e]^T ; dh1 = act'(h1) da ; dx [R,M] = dh1 [R,F'] * fc1[e]^T
        p.dh1 = b.empty(ctx.dtype(), R, ffnIn);
        if (p.offsets != null && b1 == null) {   // grouped without a first bias: da may never be stored
            b.groupedMatmulActivationBackward(dy, part(p, fc2.value()), p.offsets, p.hostOffsets, act, p.h1, p.dh1);
        } else {
            Tensor da = b.empty(ctx.dtype(), R, ffn);
            linear(p, dy, fc2, true, null, da);
            if (fusedBias1(p)) {
                b.activationGroupBiasBackward(act, p.h1, part(p, b1.value()), p.rowExpert, p.offsets, da, p.dh1, part(p, b1.definedGrad()));
            } else {
                b.activationBackward(act, p.h1, da, p.dh1);
            }
            da.close();
        }
        Tensor dx = b.empty(ctx.dtype(), R, hidden);
        linear(p, p.dh1, fc1, true, null, dx);
        p.dy = dy;
        return dx;
    }

    /** Accumulates the weight (and bias) gradients of pass p's {@link #backwardData}: dW2 += a^T dy, dW1 += x^T dh1. */
    public void backwardWeights(Pass p) {
        if (p.count != experts) throw new IllegalStateException("ExpertBank.backwardWeights: a pass over part of the experts takes the betas of claimGradBetas()");
        backwardWeights(p, claimGradBetas());
    }

    /**
     * The betas {fc1, fc2} of this backward's weight-gradient writes (0: the first since zeroGrad, see
     * {@link Parameter#gradBeta()}), claimed once for passes that each write part of the experts; marks them written.
     */
    public float[] claimGradBetas() {
        return new float[] {fc1.gradBeta(), fc2.gradBeta()};
    }

    /** {@link #backwardWeights(Pass)} with betas from {@link #claimGradBetas()}. */
    public void backwardWeights(Pass p, float[] betas) {
        if (p.dh1 == null) throw new IllegalStateException("ExpertBank.backwardWeights called before backwardData");
        linearWeightGrad(p, p.a, p.dy, fc2, betas[1], b2);
        linearWeightGrad(p, p.x, p.dh1, fc1, betas[0], fusedBias1(p) ? null : b1);   // a fused b1's gradient came with dh1
        p.dh1.close();
        p.dh1 = null;
        p.dy = null;
    }

    /** The weight gradients of experts [first, first + count), which no pass ran this backward: zeroed where betas say they are written first. */
    public void zeroWeightGrads(int first, int count, float[] betas) {
        Pass p = new Pass();
        p.first = first;
        p.count = count;
        if (betas[0] == 0f) b.fill(part(p, fc1.grad()), 0);
        if (betas[1] == 0f) b.fill(part(p, fc2.grad()), 0);
    }

    @Override
    public void close() { main.close(); }
}
