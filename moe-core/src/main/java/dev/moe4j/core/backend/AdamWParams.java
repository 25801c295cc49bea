package dev.moe4j.core.backend;

/**
 * Hyper-parameters of one AdamW update. {@code step} counts from 1 (bias correction);
 * {@code maxGradNorm} <= 0 disables clipping.
 */
public record AdamWParams(float lr, float beta1, float beta2, float eps, float weightDecay, int step, float maxGradNorm) {
    public AdamWParams {
        if (step < 1) throw new IllegalArgumentException("step must be >= 1, got " + step);
        if (!(beta1 >= 0 && beta1 < 1)) throw new IllegalArgumentException("beta1 must be in [0, 1), got " + beta1);
        if (!(beta2 >= 0 && beta2 < 1)) throw new IllegalArgumentException("beta2 must be in [0, 1), got " + beta2);
        if (!(eps > 0)) throw new IllegalArgumentException("eps must be > 0, got " + eps);
    }
}
