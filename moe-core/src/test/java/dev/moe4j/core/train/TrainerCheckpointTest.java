package dev.moe4j.core.train;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.cpu.CpuBackend;
import dev.moe4j.core.data.Batch;
import dev.moe4j.core.nn.Gpt;
import dev.moe4j.core.nn.GptConfig;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.optim.AdamW;
import dev.moe4j.core.optim.CosineSchedule;
import dev.moe4j.core.tensor.DType;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.SplittableRandom;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

class TrainerCheckpointTest {
    static final GptConfig CFG = new GptConfig(20, 8, 2, 16, 2, 32, Activation.GELU);

    /** Random token batches that are a pure function of (step, micro), as the BatchSource contract asks. */
    static final class RandomBatches implements BatchSource {
        private final int vocab, batch, seq;

        RandomBatches(int vocab, int batch, int seq) { this.vocab = vocab; this.batch = batch; this.seq = seq; }

        private Batch make(long seed) {
            SplittableRandom r = new SplittableRandom(seed);
            int[] seqTokens = new int[batch * (seq + 1)];
            // A learnable pattern: each token is the previous plus one, from a random start.
            for (int b = 0; b < batch; b++) {
                int start = r.nextInt(vocab);
                for (int t = 0; t <= seq; t++) seqTokens[b * (seq + 1) + t] = (start + t) % vocab;
            }
            int[] in = new int[batch * seq], tg = new int[batch * seq];
            for (int b = 0; b < batch; b++) {
                for (int t = 0; t < seq; t++) {
                    in[b * seq + t] = seqTokens[b * (seq + 1) + t];
                    tg[b * seq + t] = seqTokens[b * (seq + 1) + t + 1];
                }
            }
            return new Batch(in, tg, batch, seq);
        }

        @Override public Batch train(int step, int micro) { return make(step * 31L + micro); }

        @Override public List<Batch> validation(int maxBatches) {
            List<Batch> l = new ArrayList<>();
            for (int i = 0; i < maxBatches; i++) l.add(make(-1 - i));
            return l;
        }
    }

    static Trainer newTrainer(long seed) {
        ModelContext ctx = new ModelContext(new CpuBackend(), DType.F32, seed);
        Gpt gpt = new Gpt(ctx, CFG);
        ctx.allocateParameters();
        return new Trainer(gpt, AdamW.withDefaults(ctx.params()), new RandomBatches(20, 4, 8), new CosineSchedule(3e-3f, 3e-4f, 3, 12), 2);
    }

    @Test
    void resumingFromACheckpointContinuesExactlyLikeAnUninterruptedRun(@TempDir Path dir) throws IOException {
        Trainer straight = newTrainer(9);
        List<Double> expected = new ArrayList<>();
        for (int i = 0; i < 8; i++) expected.add(straight.trainStep().loss());

        Trainer first = newTrainer(9);
        for (int i = 0; i < 4; i++) assertEquals(expected.get(i), first.trainStep().loss(), 0.0);
        Path file = dir.resolve("ckpt.safetensors");
        Checkpoint.save(file, first, "{\"cfg\":1}", Map.of());

        Trainer resumed = newTrainer(1234);  // different init: everything must come from the checkpoint
        Checkpoint.load(file, resumed, "{\"cfg\":1}");
        assertEquals(4, resumed.step());
        for (int i = 4; i < 8; i++) assertEquals(expected.get(i), resumed.trainStep().loss(), 0.0, "loss at step " + i);
    }

    @Test
    void aCheckpointForAnotherConfigOrACorruptOneIsRefused(@TempDir Path dir) throws IOException {
        Trainer t = newTrainer(1);
        t.trainStep();
        Path file = dir.resolve("ckpt.safetensors");
        Checkpoint.save(file, t, "{\"cfg\":1}", Map.of());
        var e = assertThrows(IllegalArgumentException.class, () -> Checkpoint.load(file, newTrainer(1), "{\"cfg\":2}"));
        assertTrue(e.getMessage().contains("another configuration"), e.getMessage());
        // Flip one byte near the end (inside the data section): the checksum must catch it.
        byte[] bytes = Files.readAllBytes(file);
        bytes[bytes.length - 3] ^= 0x40;
        Files.write(file, bytes, StandardOpenOption.TRUNCATE_EXISTING);
        var c = assertThrows(IOException.class, () -> Checkpoint.load(file, newTrainer(1), "{\"cfg\":1}"));
        assertTrue(c.getMessage().toLowerCase().contains("checksum"), c.getMessage());
        assertThrows(IOException.class, () -> Checkpoint.load(dir.resolve("missing.safetensors"), newTrainer(1), "{}"));
    }

    @Test
    void studentDistilsFromASavedTeacherAndKdStopsAtTheConfiguredStep(@TempDir Path dir) throws IOException {
        Trainer teacherRun = newTrainer(3);
        for (int i = 0; i < 12; i++) teacherRun.trainStep();
        Path file = dir.resolve("teacher.safetensors");
        Checkpoint.save(file, teacherRun, "{}", Map.of());

        ModelContext tctx = new ModelContext(teacherRun.model().context().backend(), DType.F32, 77);
        Gpt teacher = new Gpt(tctx, CFG);
        tctx.allocateParameters();
        Checkpoint.loadWeights(file, tctx.params());

        // Student: one layer fewer, on the teacher's backend.
        ModelContext sctx = new ModelContext(tctx.backend(), DType.F32, 5);
        Gpt student = new Gpt(sctx, new GptConfig(20, 8, 1, 16, 2, 32, Activation.GELU));
        sctx.allocateParameters();
        Trainer s = new Trainer(student, AdamW.withDefaults(sctx.params()), new RandomBatches(20, 4, 8), new CosineSchedule(3e-3f, 3e-4f, 2, 12), 1);
        s.setTeacher(new Teacher(teacher, 0.5f, 0.5f, 2f, 6));
        double firstKd = 0, lastKd = 0;
        for (int i = 0; i < 12; i++) {
            StepMetrics m = s.trainStep();
            if (i == 0) firstKd = m.kdLoss();
            if (i == 5) lastKd = m.kdLoss();
            if (i < 6) assertTrue(m.kdLoss() > 0, "KD term must be on before the stop step, step " + i);
            else assertEquals(0.0, m.kdLoss(), "KD term must be off from the stop step on, step " + i);
        }
        assertTrue(lastKd < firstKd, "the student must move towards the teacher: KD " + firstKd + " -> " + lastKd);
    }

    @Test
    void validatingDoesNotChangeTheTrainingRandomStream() {
        // MoE with random token selection draws random numbers in training and in evaluation.
        var spec = new dev.moe4j.core.model.ModelSpec("t", CFG, dev.moe4j.core.model.MoESettings.defaults(java.util.List.of(0, 4)));
        double[][] losses = new double[2][];
        for (int run = 0; run < 2; run++) {
            ModelContext ctx = new ModelContext(new CpuBackend(), DType.F32, 9);
            var built = dev.moe4j.core.model.Models.build(ctx, spec);
            ctx.allocateParameters();
            Trainer t = new Trainer(built.gpt(), AdamW.withDefaults(ctx.params()), new RandomBatches(20, 4, 8), new CosineSchedule(3e-3f, 3e-4f, 3, 12), 1);
            losses[run] = new double[4];
            for (int i = 0; i < 4; i++) {
                losses[run][i] = t.trainStep().loss();
                if (run == 1) t.validationLoss(2);   // the second run validates after every step
            }
        }
        org.junit.jupiter.api.Assertions.assertArrayEquals(losses[0], losses[1], 0.0);
    }

    @Test
    void aTokenOutsideTheVocabularyIsRefusedBeforeAnyDeviceWork() {
        ModelContext ctx = new ModelContext(new CpuBackend(), DType.F32, 1);
        Gpt gpt = new Gpt(ctx, CFG);
        ctx.allocateParameters();
        BatchSource bad = new BatchSource() {
            @Override public Batch train(int step, int micro) {
                int[] in = new int[8], tg = new int[8];
                in[5] = 20;   // vocabulary is 20
                return new Batch(in, tg, 1, 8);
            }

            @Override public List<Batch> validation(int maxBatches) { return List.of(); }
        };
        Trainer t = new Trainer(gpt, AdamW.withDefaults(ctx.params()), bad, new CosineSchedule(1e-3f, 1e-4f, 1, 2), 1);
        var e = assertThrows(IllegalArgumentException.class, t::trainStep);
        assertEquals("training batch of step 0, micro-batch 0: input token 20 at position 5 is outside the vocabulary [0, 20)", e.getMessage());
    }

    @Test
    void aNonFiniteStepIsReportedSkippedAndLeavesTheWeightsAndMomentsAlone() {
        Trainer t = newTrainer(4);
        t.trainStep();
        var params = t.model().context().params();
        float[] before = params.master().toFloats(), m1 = t.optimizer().firstMoment().toFloats();
        // Poison one embedding weight in the copy the forward reads: loss and gradients become NaN.
        var wte = params.get("wte").value();
        float[] w = wte.toFloats();
        w[3] = Float.NaN;
        try (var poisoned = wte.backend().fromFloats(wte.dtype(), w, wte.shape().dims())) {
            wte.backend().copy(poisoned, wte);
        }
        // F32 model: the forward reads the master weights themselves, so the poisoned element is NaN there too.
        before[Math.toIntExact(wte.offset() - params.master().offset()) + 3] = Float.NaN;
        StepMetrics m = t.trainStep();
        assertTrue(m.skipped(), "a NaN gradient must skip the update");
        assertEquals(1, t.optimizer().stepCount(), "a skipped update does not count for bias correction");
        assertEquals(2, t.step(), "the run moves on to the next batch");
        org.junit.jupiter.api.Assertions.assertArrayEquals(before, params.master().toFloats(), "master weights untouched");
        org.junit.jupiter.api.Assertions.assertArrayEquals(m1, t.optimizer().firstMoment().toFloats(), "moments untouched");
    }
}
