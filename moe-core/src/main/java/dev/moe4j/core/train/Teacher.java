package dev.moe4j.core.train;

import dev.moe4j.core.nn.Gpt;

/**
 * Mixture-of-Students distillation (DeepSpeed-MoE, section 4): a trained teacher run forward only, whose
 * soft labels at temperature T train the student with alpha * CE + beta * KL. Staged KD: from step
 * {@code stopStep} on, the KD term is switched off and the student trains on CE alone (alpha = 1).
 */
public record Teacher(Gpt model, float alpha, float beta, float temperature, int stopStep) {
    public Teacher {
        if (model == null) throw new IllegalArgumentException("teacher model must be given");
        if (alpha < 0 || beta < 0) throw new IllegalArgumentException("alpha and beta must be >= 0, got alpha=" + alpha + " beta=" + beta);
        if (!(temperature > 0)) throw new IllegalArgumentException("temperature must be > 0, got " + temperature);
        if (stopStep < 0) throw new IllegalArgumentException("stopStep must be >= 0, got " + stopStep);
    }

    /** Whether the KD term is on at optimizer step {@code step}. */
    public boolean activeAt(int step) { return step < stopStep; }
}
