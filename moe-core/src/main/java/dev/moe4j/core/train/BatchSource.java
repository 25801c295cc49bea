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
}
