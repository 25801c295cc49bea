package dev.moe4j.core.moe;

/** DeepSpeed's {@code noisy_gate_policy} (null means none). Noise is applied in training only. */
public enum NoisyGatePolicy {
    /** Multiply the gate input by uniform(1 - 1e-2, 1 + 1e-2) noise. */
    JITTER,
    /** Gumbel noise on the logits when choosing the first expert (the gate values stay noise-free). */
    RSAMPLE;

    /**
     * Parses DeepSpeed's spelling: null, "None" -&gt; null; "Jitter"; "RSample" (case-insensitive).
     *
     * @throws IllegalArgumentException naming the parameter and the allowed values
     */
    public static NoisyGatePolicy parse(String s) {
        if (s == null || s.equalsIgnoreCase("none")) return null;
        if (s.equalsIgnoreCase("jitter")) return JITTER;
        if (s.equalsIgnoreCase("rsample")) return RSAMPLE;
        throw new IllegalArgumentException("noisyGatePolicy must be null, \"None\", \"Jitter\" or \"RSample\", got \"" + s + "\"");
    }
}
