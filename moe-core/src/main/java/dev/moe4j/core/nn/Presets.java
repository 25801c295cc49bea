package dev.moe4j.core.nn;

import dev.moe4j.core.backend.Activation;

import java.util.LinkedHashMap;
import java.util.Map;

/**
 * Named model shapes. The paper's bases (DeepSpeed-MoE, Table 1: 350M = 24 layers x 1024, 1.3B = 24 x 2048,
 * 6.7B = 32 x 4096; GPT-2's vocabulary of 50257 padded to 50304) and tiny ones that train in minutes on a CPU.
 */
public final class Presets {
    private Presets() {}

    private static final Map<String, GptConfig> DENSE = new LinkedHashMap<>();

    static {
        // Tiny byte-level models for the CPU: vocabulary 256 (bytes).
        DENSE.put("tiny", new GptConfig(256, 128, 4, 128, 4, 512, Activation.GELU));
        DENSE.put("micro", new GptConfig(256, 64, 2, 64, 4, 256, Activation.GELU));
        // The paper's dense bases.
        DENSE.put("350M", new GptConfig(50304, 2048, 24, 1024, 16, 4096, Activation.GELU));
        DENSE.put("1.3B", new GptConfig(50304, 2048, 24, 2048, 16, 8192, Activation.GELU));
        DENSE.put("6.7B", new GptConfig(50304, 2048, 32, 4096, 32, 16384, Activation.GELU));
    }

    /** The dense shape of a preset name, or an error listing the known names. */
    public static GptConfig dense(String name) {
        GptConfig c = DENSE.get(name);
        if (c == null) throw new IllegalArgumentException("unknown preset '" + name + "'; known: " + DENSE.keySet());
        return c;
    }

    public static Iterable<String> names() { return DENSE.keySet(); }

    /** A copy of {@code c} with another vocabulary size and sequence length (e.g. for a tokenizer's vocabulary). */
    public static GptConfig withVocab(GptConfig c, int vocabSize, int maxSeqLen) {
        return new GptConfig(vocabSize, maxSeqLen, c.layers(), c.hidden(), c.heads(), c.ffnHidden(), c.activation());
    }
}
