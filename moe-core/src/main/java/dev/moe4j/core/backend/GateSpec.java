package dev.moe4j.core.backend;

/**
 * What the fused gate computes (DeepSpeed top-1 / top-2 gating, generalised to top-k):
 *
 * @param k              experts per token (1, 2, ... numExperts)
 * @param capacity       slots per expert; tokens past it are dropped. {@code <= 0}: no limit (dropless)
 * @param useRts         random token selection: drop by random priority instead of position
 * @param rsample        RSample policy: Gumbel noise on the logits when choosing the first expert (training)
 * @param secondSampling Gumbel noise when choosing the second and later experts (training)
 * @param seed           counter-based RNG seed for RTS and Gumbel noise
 * @param offset         RNG counter offset (advance it every call so each step draws new numbers)
 */
public record GateSpec(int k, int capacity, boolean useRts, boolean rsample, boolean secondSampling, long seed, long offset) {
    public GateSpec {
        if (k < 1) throw new IllegalArgumentException("k must be >= 1, got " + k);
    }

    public boolean dropless() { return capacity <= 0; }
}
