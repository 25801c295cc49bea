package dev.moe4j.core.model;

import dev.moe4j.core.nn.GptConfig;

/** A model to build: the GPT shape and, for GPT-MoE, where its MoE layers are and how they route (null: dense). */
public record ModelSpec(String name, GptConfig gpt, MoESettings moe) {
    public ModelSpec {
        if (gpt == null) throw new IllegalArgumentException("model " + name + ": GPT configuration must be given");
        if (moe != null && moe.expertsPerLayer().size() != gpt.layers()) {
            throw new IllegalArgumentException("model " + name + ": MoE layout has " + moe.expertsPerLayer().size() + " entries for " + gpt.layers() + " layers");
        }
    }

    public boolean hasMoELayers() { return moe != null && moe.expertsPerLayer().stream().anyMatch(e -> e > 0); }

    /** The same model with another vocabulary and sequence length (a tokenizer's, a run's). */
    public ModelSpec withVocab(int vocabSize, int maxSeqLen) {
        return new ModelSpec(name, new GptConfig(vocabSize, maxSeqLen, gpt.layers(), gpt.hidden(), gpt.heads(), gpt.ffnHidden(), gpt.activation()), moe);
    }

    /** The same model with another MoE configuration. */
    public ModelSpec withMoE(MoESettings m) { return new ModelSpec(name, gpt, m); }
}
