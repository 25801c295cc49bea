package dev.moe4j.core.train;

import dev.moe4j.core.data.Batch;

import java.util.List;

/** Where the trainer's batches come from. */
public interface BatchSource {
    /**
     * The training batch of optimizer step {@code step} and micro-batch {@code micro}: a pure function of
     * (seed, step, micro), so a run resumed at step s sees exactly what an uninterrupted run would.
     */
    Batch train(int step, int micro);

    /** The held-out batches, in a fixed order (at most {@code maxBatches}). */
    List<Batch> validation(int maxBatches);

    /**
     * Rank {@code rank}'s share of a global source for data-parallel training: its micro-batch j of a step is the
     * global micro-batch {@code j * worldSize + rank}, so W ranks of M micro-batches each see exactly the W*M
     * micro-batches one process of {@code global} sees (and a world of another size with W'*M' = W*M the same
     * ones). Validation batches are the global ones on every rank.
     */
    static BatchSource rankShare(BatchSource global, int rank, int worldSize) {
        if (global == null) throw new IllegalArgumentException("rankShare: global source is null");
        if (worldSize < 1) throw new IllegalArgumentException("worldSize must be >= 1, got " + worldSize);
        if (rank < 0 || rank >= worldSize) throw new IllegalArgumentException("rank must be in [0, " + worldSize + "), got " + rank);
        return new BatchSource() {
            @Override public Batch train(int step, int micro) { return global.train(step, micro * worldSize + rank); }

            @Override public List<Batch> validation(int maxBatches) { return global.validation(maxBatches); }
        };
    }
}
