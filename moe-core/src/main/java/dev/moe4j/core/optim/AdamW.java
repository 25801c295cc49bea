package dev.moe4j.core.optim;

import dev.moe4j.core.backend.AdamWParams;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.nn.Parameters;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Scope;
import dev.moe4j.core.tensor.Tensor;

/**
 * AdamW over the flat parameter buffers of {@link Parameters}: fp32 master weights and moments, global-norm
 * clipping and the NaN/Inf skip computed on the device, two fused updates (with and without weight decay).
 */
public final class AdamW implements AutoCloseable {
    private final Parameters params;
    private final Backend backend;
    private final float beta1, beta2, eps, weightDecay, maxGradNorm;
    private final Tensor m, v, normSq;
    private int step;

    /**
     * @param maxGradNorm global-norm clip threshold; <= 0 disables clipping (the norm is still computed, for
     *                    the NaN check and for logging)
     */
    public AdamW(Parameters params, float beta1, float beta2, float eps, float weightDecay, float maxGradNorm) {
        if (!params.isAllocated()) throw new IllegalStateException("allocate the model's parameters before creating the optimizer");
        if (weightDecay < 0) throw new IllegalArgumentException("weightDecay must be >= 0, got " + weightDecay);
        new AdamWParams(1f, beta1, beta2, eps, weightDecay, 1, maxGradNorm);  // validates the hyper-parameters
        this.params = params;
        this.backend = params.master().backend();
        this.beta1 = beta1;
        this.beta2 = beta2;
        this.eps = eps;
        this.weightDecay = weightDecay;
        this.maxGradNorm = maxGradNorm;
        DType t = params.master().dtype();
        int[] flat = Parameters.flatShape(params.count());
        this.m = Scope.keep(backend.zeros(t, flat));
        this.v = Scope.keep(backend.zeros(t, flat));
        this.normSq = Scope.keep(backend.zeros(t, 1));
    }

    /** GPT-style defaults: betas (0.9, 0.95), eps 1e-8, weight decay 0.1, clip at 1.0. */
    public static AdamW withDefaults(Parameters params) {
        return new AdamW(params, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f);
    }

    /**
     * Computes the squared global gradient norm into a device scalar and applies one update with learning rate
     * {@code lr} (gradients nothing wrote since {@link Parameters#zeroGrad()} count as zero). Returns the device scalar holding the squared norm (read it to log the norm; a non-finite
     * value means the update was skipped, and the caller should call {@link #undoStepCount()}).
     */
    public Tensor step(float lr) { return step(lr, null); }

    /**
     * As {@link #step(float)}, with the squared global gradient norm written into the given device scalar by
     * {@code squaredNorm} instead of summed over this process's flat gradient (null: that local sum). Data/expert
     * parallel training passes one that adds the other ranks' expert gradients, so every rank clips alike.
     */
    public Tensor step(float lr, java.util.function.Consumer<Tensor> squaredNorm) {
        step++;
        params.finishGrads();
        if (squaredNorm == null) backend.sumSquares(params.grad(), normSq, 0f);
        else squaredNorm.accept(normSq);
        long nd = params.decayCount(), n = params.count();
        if (nd > 0) update(0, nd, weightDecay, lr);
        if (n > nd) update(nd, n - nd, 0f, lr);
        return normSq;
    }

    /** One fused update over [start, start + count), in chunks that fit an int dimension. */
    private void update(long start, long count, float wd, float lr) {
        AdamWParams h = new AdamWParams(lr, beta1, beta2, eps, wd, step, maxGradNorm);
        for (long at = start; at < start + count; at += CHUNK) {
            int c = (int) Math.min(CHUNK, start + count - at);
            Tensor value = params.value() == params.master() ? null : params.value().view(at, c);
            backend.adamw(params.master().view(at, c), params.grad().view(at, c), m.view(at, c), v.view(at, c), h, normSq, value);
        }
    }

    private static final long CHUNK = 1L << 30;

    /** After a skipped (non-finite) step: the update did not happen, so the bias-correction count goes back. */
    public void undoStepCount() { step--; }

    /** Updates applied so far (the bias-correction step). */
    public int stepCount() { return step; }

    public void setStepCount(int step) { this.step = step; }

    /** First moment, flat, same layout as the parameters (for checkpoints). */
    public Tensor firstMoment() { return m; }

    /** Second moment, flat. */
    public Tensor secondMoment() { return v; }

    @Override
    public void close() {
        m.close();
        v.close();
        normSq.close();
    }
}
