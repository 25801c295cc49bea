package dev.moe4j.core.train;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.data.Batch;
import dev.moe4j.core.nn.Gpt;
import dev.moe4j.core.optim.AdamW;
import dev.moe4j.core.optim.CosineSchedule;
import dev.moe4j.core.tensor.Scope;
import dev.moe4j.core.tensor.Tensor;

import java.util.List;

/**
 * The training loop: per step, zero the gradients, run the micro-batches (forward, loss, backward, each
 * inside a {@link Scope} so its activations are freed), then one AdamW update with clipping. The loss and
 * gradient norm are read once per step, after the update is queued: a non-finite one marks the step skipped
 * (the device already left the weights untouched).
 */
public final class Trainer {
    private final Gpt model;
    private final AdamW optimizer;
    private final BatchSource data;
    private final CosineSchedule schedule;
    private final int microBatches;
    private Teacher teacher;
    private int step;

    public Trainer(Gpt model, AdamW optimizer, BatchSource data, CosineSchedule schedule, int microBatches) {
        if (microBatches <= 0) throw new IllegalArgumentException("microBatches must be > 0, got " + microBatches);
        this.model = model;
        this.optimizer = optimizer;
        this.data = data;
        this.schedule = schedule;
        this.microBatches = microBatches;
    }

    /** Distil from {@code teacher} (null: plain language-model training). */
    public void setTeacher(Teacher teacher) {
        if (teacher != null && teacher.model().context().backend() != model.context().backend()) {
            throw new IllegalArgumentException("teacher and student must run on the same backend");
        }
        this.teacher = teacher;
    }

    /** The next step to run (from 0; restored from a checkpoint on resume). */
    public int step() { return step; }

    public void setStep(int step) {
        if (step < 0) throw new IllegalArgumentException("step must be >= 0, got " + step);
        this.step = step;
    }

    public Gpt model() { return model; }

    public AdamW optimizer() { return optimizer; }

    /** Runs one optimizer step and returns its metrics. */
    public StepMetrics trainStep() {
        Backend b = model.context().backend();
        long t0 = System.nanoTime();
        float lr = schedule.lr(step);
        double loss, auxLoss, kdLoss, normSq;
        long tokens = 0;
        model.context().setTraining(true);
        model.context().params().zeroGrad();
        try (Scope s = Scope.open()) {
            Tensor lossSum = b.zeros(model.context().params().master().dtype(), 3);
            for (int micro = 0; micro < microBatches; micro++) {
                Batch batch = data.train(step, micro);
                Tensor in = b.fromInts(batch.inputs(), batch.batchSize(), batch.seqLen());
                Tensor tg = b.fromInts(batch.targets(), batch.batchSize(), batch.seqLen());
                int valid = validTargets(batch);
                Gpt.Distill kd = null;
                if (teacher != null && teacher.activeAt(step)) {
                    teacher.model().context().setTraining(false);
                    kd = new Gpt.Distill(teacher.model().forward(in), teacher.alpha(), teacher.beta(), teacher.temperature());
                }
                Tensor l = model.forwardLoss(in, tg, valid, kd);
                b.add(lossSum, 1, l, 1.0 / microBatches, lossSum);
                model.backwardLoss(valid, 1f / microBatches);
                tokens += (long) batch.batchSize() * batch.seqLen();
            }
            Tensor nsq = optimizer.step(lr);
            double[] losses = lossSum.toDoubles();   // the step's host reads, after the update is queued
            loss = losses[0];
            auxLoss = losses[1];
            kdLoss = losses[2];
            normSq = nsq.toDoubles()[0];
        }
        // The device skips the update exactly when the squared gradient norm is not finite (a NaN/Inf loss makes it so).
        boolean skipped = !Double.isFinite(normSq);
        if (skipped) optimizer.undoStepCount();
        StepMetrics m = new StepMetrics(step, loss, auxLoss, kdLoss, Math.sqrt(normSq), lr, tokens, (System.nanoTime() - t0) / 1e9, skipped);
        step++;
        return m;
    }

    /** Mean cross-entropy over up to {@code maxBatches} held-out batches, with the model in evaluation mode. */
    public double validationLoss(int maxBatches) {
        Backend b = model.context().backend();
        List<Batch> batches = data.validation(maxBatches);
        if (batches.isEmpty()) throw new IllegalStateException("no validation data");
        model.context().setTraining(false);
        double sum = 0;
        long count = 0;
        try {
            for (Batch batch : batches) {
                try (Scope s = Scope.open()) {
                    int valid = validTargets(batch);
                    Tensor l = model.forwardLoss(b.fromInts(batch.inputs(), batch.batchSize(), batch.seqLen()),
                            b.fromInts(batch.targets(), batch.batchSize(), batch.seqLen()), valid);
                    sum += l.toDoubles()[0] * valid;
                    count += valid;
                }
            }
        } finally {
            model.context().setTraining(true);
        }
        return sum / count;
    }

    /** Targets that count in the loss (negative ones are ignored). */
    static int validTargets(Batch b) {
        int n = 0;
        for (int t : b.targets()) if (t >= 0) n++;
        return n;
    }
}
