package dev.moe4j.core.nn;

import dev.moe4j.core.tensor.Tensor;

/** The FFN sub-layer of a transformer block: a dense MLP or a Mixture-of-Experts layer. x [N, C] -> [N, C]. */
public interface FeedForward {
    Tensor forward(Tensor x);

    /**
     * dy [N, C] -> dx [N, C]; parameter gradients accumulate, including those of the auxiliary loss, whose
     * gradient is multiplied by {@code lossScale} (the same factor the caller applied to dy's loss, e.g.
     * 1 / micro-batches).
     */
    Tensor backward(Tensor dy, float lossScale);

    /** This layer's auxiliary loss from the last forward (F32 [1]) already scaled by its coefficient, or null. */
    default Tensor auxLoss() { return null; }
}
