package dev.moe4j.core.train;

/**
 * One batch of token ids, row-major [batch, seq]; targets are the next tokens (negative = ignored).
 */
public record Batch(int[] inputs, int[] targets, int batch, int seq) {
    public Batch {
        if (inputs.length != (long) batch * seq || targets.length != inputs.length) {
            throw new IllegalArgumentException("batch arrays must hold batch*seq = " + (long) batch * seq + " ids, got " + inputs.length + " and " + targets.length);
        }
    }

    /** Targets that count in the loss. */
    public int validTargets() {
        int n = 0;
        for (int t : targets) if (t >= 0) n++;
        return n;
    }
}
