package dev.moe4j.core.train;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.data.Batch;
import dev.moe4j.core.model.Models;
import dev.moe4j.core.nn.Gpt;
import dev.moe4j.core.optim.AdamW;
import dev.moe4j.core.optim.CosineSchedule;
import dev.moe4j.core.tensor.Scope;
import dev.moe4j.core.tensor.Tensor;

import java.util.ArrayList;
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
    private List<Models.MoELayer> moeLayers = List.of();
    private GradientSync sync;
    private long rngPerMicro = -1;   // distributed: random counters one micro-batch draws (measured once)
    private int step;

    public Trainer(Gpt model, AdamW optimizer, BatchSource data, CosineSchedule schedule, int microBatches) {
        if (microBatches <= 0) throw new IllegalArgumentException("microBatches must be > 0, got " + microBatches);
        this.model = model;
        this.optimizer = optimizer;
        this.data = data;
        this.schedule = schedule;
        this.microBatches = microBatches;
    }

    /** The model's MoE layers, whose routing {@link #trainStep(boolean)} can report. */
    public void setMoELayers(List<Models.MoELayer> layers) { this.moeLayers = List.copyOf(layers); }

    /**
     * Data (+ expert) parallel training: this trainer is one rank of {@code sync}'s world, its {@link BatchSource}
     * gives this rank's share of each global batch, and every step scales the gradients by 1/W, all-reduces them
     * in their groups, clips by the global norm and reports the world's mean losses (so every rank logs the same
     * numbers, those of the single-rank run on the global batch). Micro-batch j of rank r is global micro-batch
     * j*W + r (as {@link BatchSource#rankShare} hands them out) and draws that micro-batch's random numbers; the
     * first step runs one extra forward to measure how many a micro-batch draws. Every rank must call every
     * step (and {@link #validationLoss}, whose MoE layers exchange tokens too). null: single process (the default).
     */
    public void setGradientSync(GradientSync sync) {
        if (sync != null && sync.groups().dataParallel().backend() != model.context().backend()) {
            throw new IllegalArgumentException("the gradient synchronisation's communicator and the model must share a backend");
        }
        this.sync = sync;
    }

    public GradientSync gradientSync() { return sync; }

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
    public StepMetrics trainStep() { return trainStep(false); }

    /**
     * Runs one optimizer step; with {@code routingStats} the metrics also carry each MoE layer's expert load,
     * dropped fraction and l_aux from the last micro-batch (extra host reads: ask for them only when logging).
     */
    public StepMetrics trainStep(boolean routingStats) {
        Backend b = model.context().backend();
        long t0 = System.nanoTime();
        float lr = schedule.lr(step);
        double loss, auxLoss, kdLoss, normSq;
        List<RoutingStats> routing = new ArrayList<>();
        long tokens = 0;
        int world = sync == null ? 1 : sync.dataParallelSize();
        float gradScale = 1f / ((float) microBatches * world);
        model.context().setTraining(true);
        model.context().params().zeroGrad();
        long rngBase = model.context().rngOffset();
        if (world > 1 && rngPerMicro < 0) rngPerMicro = probeRandomCount();
        try (Scope s = Scope.open()) {
            Tensor lossSum = b.zeros(model.context().params().master().dtype(), 3);
            for (int micro = 0; micro < microBatches; micro++) {
                Batch batch = checked(data.train(step, micro), "training batch of step " + step + ", micro-batch " + micro);
                // distributed: micro-batch j of rank r is global micro-batch j*W + r; it draws the random numbers
                // (noise, RTS) the single-process run draws for that micro-batch
                if (world > 1) model.context().setRngOffset(rngBase + ((long) micro * world + sync.rank()) * rngPerMicro);
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
                if (world > 1) {
                    long used = model.context().rngOffset() - (rngBase + ((long) micro * world + sync.rank()) * rngPerMicro);
                    if (used != rngPerMicro) throw new IllegalStateException("micro-batch " + micro + " drew " + used + " random counters, the first step's drew "
                            + rngPerMicro + ": data-parallel micro-batches must all have the same shape");
                }
                // the last micro-batch's backward starts each block's gradient all-reduce as soon as the block is done
                boolean overlap = sync != null && micro == microBatches - 1;
                if (overlap) model.setBlockBackwardListener(sync::blockDone);
                try {
                    model.backwardLoss(valid, world == 1 ? 1f / microBatches : gradScale);
                } finally {
                    if (overlap) model.setBlockBackwardListener(null);
                }
                tokens += (long) batch.batchSize() * batch.seqLen() * world;
            }
            if (world > 1) model.context().setRngOffset(rngBase + (long) microBatches * world * rngPerMicro);
            if (routingStats) {
                for (Models.MoELayer l : moeLayers) {
                    var out = l.moe().lastOutput();
                    routing.add(new RoutingStats(l.block(), out.counts().toInts(), l.moe().droppedFraction(), out.lAux().toDoubles()[0]));
                }
            }
            Tensor nsq;
            if (sync == null) {
                nsq = optimizer.step(lr);
            } else {
                sync.allReduceGradients();
                sync.averageOverWorld(lossSum);
                nsq = optimizer.step(lr, sync::globalNormSq);
            }
            double[] losses = lossSum.toDoubles();   // the step's host reads, after the update is queued
            loss = losses[0];
            auxLoss = losses[1];
            kdLoss = losses[2];
            normSq = nsq.toDoubles()[0];
        }
        // The device skips the update exactly when the squared gradient norm is not finite (a NaN/Inf loss makes it so).
        boolean skipped = !Double.isFinite(normSq);
        if (skipped) optimizer.undoStepCount();
        StepMetrics m = new StepMetrics(step, loss, auxLoss, kdLoss, Math.sqrt(normSq), lr, tokens, (System.nanoTime() - t0) / 1e9, skipped, routing);
        step++;
        return m;
    }

    /**
     * The random counters one training forward draws, measured by running the first micro-batch's forward once
     * (collective under expert parallelism: every rank probes in its first step). The RNG position is restored.
     */
    private long probeRandomCount() {
        Backend b = model.context().backend();
        long at = model.context().rngOffset();
        try (Scope s = Scope.open()) {
            Batch batch = checked(data.train(step, 0), "training batch of step " + step + ", micro-batch 0");
            model.forward(b.fromInts(batch.inputs(), batch.batchSize(), batch.seqLen()));
        }
        long n = model.context().rngOffset() - at;
        model.context().setRngOffset(at);
        return n;
    }

    /**
     * Mean cross-entropy over up to {@code maxBatches} held-out batches, with the model in evaluation mode. With
     * gradient synchronisation (W data-parallel ranks) the batches are shared out (rank r takes batches r, r+W, ...)
     * and the sums all-reduced, so every rank returns the single-process figure for 1/W of the work; every rank runs
     * the same number of forwards (a rank short of batches repeats one with weight 0), since MoE layers exchange
     * tokens. Collective then: every rank calls it.
     */
    public double validationLoss(int maxBatches) {
        Backend b = model.context().backend();
        List<Batch> batches = data.validation(maxBatches);
        if (batches.isEmpty()) throw new IllegalStateException("no validation data");
        int world = sync == null ? 1 : sync.dataParallelSize(), rank = sync == null ? 0 : sync.rank();
        int share = (batches.size() + world - 1) / world;
        model.context().setTraining(false);
        double sum = 0;
        long count = 0;
        try {
            for (int j = 0; j < share; j++) {
                int i = j * world + rank;
                boolean counts = i < batches.size();
                Batch batch = checked(batches.get(counts ? i : 0), "validation batch");
                try (Scope s = Scope.open()) {
                    int valid = validTargets(batch);
                    Tensor l = model.forwardLoss(b.fromInts(batch.inputs(), batch.batchSize(), batch.seqLen()),
                            b.fromInts(batch.targets(), batch.batchSize(), batch.seqLen()), valid);
                    double v = l.toDoubles()[0];
                    if (counts) {
                        sum += v * valid;
                        count += valid;
                    }
                }
            }
            if (world > 1) {
                try (Tensor t = b.fromDoubles(model.context().params().master().dtype(), new double[] {sum, count}, 2)) {
                    sync.groups().dataParallel().allReduce(t, dev.moe4j.core.comm.ReduceOp.SUM);
                    double[] v = t.toDoubles();
                    sum = v[0];
                    count = Math.round(v[1]);
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

    /**
     * Token ids must lie in the vocabulary (targets may also be negative: ignored). Checked on the host before the
     * batch is uploaded, so every backend reports a bad id with the same clear error instead of reading out of
     * bounds on a device.
     */
    private Batch checked(Batch b, String what) {
        int v = model.config().vocabSize();
        int[] in = b.inputs(), tg = b.targets();
        for (int i = 0; i < in.length; i++) {
            if (in[i] < 0 || in[i] >= v) throw new IllegalArgumentException(what + ": input token " + in[i] + " at position " + i + " is outside the vocabulary [0, " + v + ")");
            if (tg[i] >= v) throw new IllegalArgumentException(what + ": target token " + tg[i] + " at position " + i + " is outside the vocabulary [0, " + v + ")");
        }
        return b;
    }
}
