package dev.moe4j.core.data;

/**
 * One batch of language-model training data: {@code inputs} and {@code targets} are row-major
 * [batchSize, seqLen] token ids, and targets[b, t] = the token after inputs[b, t] in the corpus.
 */
public record Batch(int[] inputs, int[] targets, int batchSize, int seqLen) {
    public Batch {
        if (inputs.length != (long) batchSize * seqLen || targets.length != inputs.length) {
            throw new IllegalArgumentException("batch [" + batchSize + ", " + seqLen + "] needs " + (long) batchSize * seqLen
                    + " inputs and targets, got " + inputs.length + " and " + targets.length);
        }
    }
}
