package dev.moe4j.core.nn;

import dev.moe4j.core.backend.Activation;

/**
 * Shape of a GPT-style decoder (dense part; the MoE layers are configured beside it).
 *
 * @param vocabSize  V
 * @param maxSeqLen  positions of the learned position embedding
 * @param layers     transformer blocks
 * @param hidden     C, the model width
 * @param heads      attention heads (C must be divisible by it)
 * @param ffnHidden  F, the FFN's hidden width (4C in GPT-2)
 * @param activation the FFN activation
 */
public record GptConfig(int vocabSize, int maxSeqLen, int layers, int hidden, int heads, int ffnHidden, Activation activation) {
    public GptConfig {
        positive("vocabSize", vocabSize);
        positive("maxSeqLen", maxSeqLen);
        positive("layers", layers);
        positive("hidden", hidden);
        positive("heads", heads);
        positive("ffnHidden", ffnHidden);
        if (hidden % heads != 0) throw new IllegalArgumentException("hidden (" + hidden + ") must be divisible by heads (" + heads + ")");
        if (activation == null) throw new IllegalArgumentException("activation must be given (RELU, GELU, GEGLU or SWIGLU)");
    }

    private static void positive(String name, int v) {
        if (v <= 0) throw new IllegalArgumentException(name + " must be > 0, got " + v);
    }

    /** Parameters of the dense model (tied head), for reports. */
    public long denseParameterCount() {
        long c = hidden, f = ffnHidden, fin = activation.inputWidth(ffnHidden);
        long block = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * fin + fin) + (f * c + c);
        return (long) vocabSize * c + (long) maxSeqLen * c + layers * block + 2 * c;
    }
}
