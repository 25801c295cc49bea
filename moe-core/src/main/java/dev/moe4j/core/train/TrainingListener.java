package dev.moe4j.core.train;

import java.nio.file.Path;

/** Progress callbacks of the {@link Trainer} (the command line turns them into a progress bar and a JSONL log). */
public interface TrainingListener {
    default void onStep(StepMetrics m) {}

    default void onValidation(int step, double loss) {}

    default void onCheckpoint(int step, Path file) {}
}
