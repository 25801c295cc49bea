package dev.moe4j.examples;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.backend.Backends;
import dev.moe4j.core.data.BatchSampler;
import dev.moe4j.core.data.ByteTokenizer;
import dev.moe4j.core.data.Corpora;
import dev.moe4j.core.data.Datasets;
import dev.moe4j.core.data.TokenSequence;
import dev.moe4j.core.model.Models;
import dev.moe4j.core.model.Presets;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.optim.AdamW;
import dev.moe4j.core.optim.CosineSchedule;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.train.BatchSource;
import dev.moe4j.core.train.StepMetrics;
import dev.moe4j.core.train.Trainer;
import org.junit.jupiter.api.Test;

import java.util.List;

import static org.junit.jupiter.api.Assertions.assertTrue;

/** The README's library example, kept compiling and running (on the CPU backend here). */
class ReadmeExampleTest {
    @Test
    void theReadmeLibraryExampleTrainsAStep() {
        TokenSequence text = Datasets.fromText(Corpora.defaultCorpus().substring(0, 20_000), ByteTokenizer.INSTANCE);
        BatchSampler sampler = new BatchSampler(text, 2, 32, 1);
        BatchSource batches = new BatchSource() {
            @Override public dev.moe4j.core.data.Batch train(int step, int micro) { return sampler.batch(step); }

            @Override public List<dev.moe4j.core.data.Batch> validation(int maxBatches) { return List.of(sampler.batch(1_000_000)); }
        };
        try (Backend backend = Backends.create("cpu")) {
            ModelContext ctx = new ModelContext(backend, DType.F32, 1234);
            Models.Built model = Models.build(ctx, Presets.get("tiny-moe"));
            ctx.allocateParameters();
            Trainer trainer = new Trainer(model.gpt(), AdamW.withDefaults(ctx.params()), batches,
                    new CosineSchedule(3e-3f, 3e-4f, 40, 1000), 1);
            StepMetrics m = trainer.trainStep();
            assertTrue(Math.abs(m.loss() - Math.log(256)) < 0.5, "first loss near ln(256): " + m.loss());
        }
    }
}
