package dev.moe4j.core.train;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.cpu.CpuBackend;
import dev.moe4j.core.data.Batch;
import dev.moe4j.core.moe.ExpertBank;
import dev.moe4j.core.moe.MoE;
import dev.moe4j.core.nn.Gpt;
import dev.moe4j.core.nn.GptConfig;
import dev.moe4j.core.nn.Init;
import dev.moe4j.core.nn.Mlp;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.nn.Parameter;
import dev.moe4j.core.optim.AdamW;
import dev.moe4j.core.optim.CosineSchedule;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Scope;
import dev.moe4j.core.tensor.Tensor;
import org.junit.jupiter.api.Test;

import java.util.ArrayList;
import java.util.List;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * {@code Parameters.zeroGrad} marks the gradients stale instead of filling them with zeros: each gradient's first
 * write of a step overwrites (beta = 0), later writes add, and gradients nothing wrote are zeroed before the
 * optimizer reads them. A training step with gradient accumulation must give, bit for bit, what filling the
 * buffer with zeros and accumulating every write gives, whatever the buffer held before.
 */
class GradientOverwriteTest {
    static final GptConfig CFG = new GptConfig(20, 8, 2, 16, 2, 32, Activation.GELU);
    static final int MICRO = 3, EXPERTS = 16, STEPS = 3;

    /** A dense block, then a dropless MoE block with every kind of gradient write, and one parameter no layer uses. */
    record Model(ModelContext ctx, Gpt gpt, MoE moe, AdamW opt, Parameter unused) {
        static Model build() {
            ModelContext ctx = new ModelContext(new CpuBackend(), DType.F32, 11);
            MoE[] moe = new MoE[1];
            Gpt gpt = new Gpt(ctx, CFG, (c, layer, name) -> {
                if (layer == 0) return new Mlp(c, name, CFG.hidden(), CFG.ffnHidden(), CFG.activation(), 0.02, 0.02);
                // 16 experts for 8 tokens a micro-batch: grouped weight gradients with empty experts; biases scatter-add;
                // Residual-MoE and a shared expert add plain GEMM and sumRows writes
                moe[0] = MoE.builder().setContext(c).optName(name).setHiddenSize(CFG.hidden()).setFfnSize(24)
                        .optNumExperts(EXPERTS).optK(1).optDropless(true).optExpertBias(true).optUseResidual(true)
                        .optSharedExperts(1, 24).optZLossCoeff(0.01).build();
                return moe[0].asFeedForward(0.01);
            });
            Parameter unused = ctx.params().add("unused", Init.normal(1), true, 3, 4);
            ctx.allocateParameters();
            return new Model(ctx, gpt, moe[0], AdamW.withDefaults(ctx.params()), unused);
        }
    }

    private final BatchSource data = new TrainerCheckpointTest.RandomBatches(CFG.vocabSize(), 2, 4);
    private final CosineSchedule schedule = new CosineSchedule(3e-3f, 3e-4f, 1, 10);

    /**
     * A step as it ran before zeroGrad stopped filling: the whole buffer set to zero and zeroGrad never called, so
     * no gradient is ever stale and every write accumulates. Returns the mean loss; adds each micro-batch's expert
     * token counts to {@code counts}.
     */
    private double referenceStep(Model ref, int step, List<int[]> counts) {
        Backend b = ref.ctx().backend();
        ref.ctx().setTraining(true);
        b.fill(ref.ctx().params().grad(), 0);
        try (Scope s = Scope.open()) {
            Tensor lossSum = b.zeros(DType.F32, 3);
            for (int micro = 0; micro < MICRO; micro++) {
                Batch batch = data.train(step, micro);
                int valid = Trainer.validTargets(batch);
                Tensor l = ref.gpt().forwardLoss(b.fromInts(batch.inputs(), batch.batchSize(), batch.seqLen()),
                        b.fromInts(batch.targets(), batch.batchSize(), batch.seqLen()), valid);
                counts.add(ref.moe().lastOutput().counts().toInts());
                b.add(lossSum, 1, l, 1.0 / MICRO, lossSum);
                ref.gpt().backwardLoss(valid, 1f / MICRO);
            }
            ref.opt().step(schedule.lr(step));
            return lossSum.toDoubles()[0];
        }
    }

    @Test
    void accumulatedStepsEqualZeroFillingAndAccumulatingBitForBitAndUnwrittenGradientsReadZero() {
        Model m = Model.build(), ref = Model.build();
        Backend b = m.ctx().backend();
        Trainer trainer = new Trainer(m.gpt(), m.opt(), data, schedule, MICRO);
        b.fill(m.ctx().params().grad(), Float.NaN);   // as a skipped step leaves it: a read of a stale gradient shows
        ExpertBank bank = m.moe().experts();
        List<Parameter> expertParams = List.of(bank.fc1(), bank.fc2(), bank.fc1Bias(), bank.fc2Bias());
        int emptyExpertsChecked = 0;
        for (int step = 0; step < STEPS; step++) {
            b.fill(m.unused().grad(), 5);   // a stale value the step must not leave behind
            List<double[]> before = new ArrayList<>();
            for (Parameter p : expertParams) before.add(p.grad().toDoubles());

            StepMetrics got = trainer.trainStep();
            List<int[]> counts = new ArrayList<>();
            double expectedLoss = referenceStep(ref, step, counts);

            assertEquals(expectedLoss, got.loss(), 0.0, "loss of step " + step);
            assertArrayEquals(ref.ctx().params().grad().toFloats(), m.ctx().params().grad().toFloats(), "gradients after step " + step);
            assertArrayEquals(ref.ctx().params().master().toFloats(), m.ctx().params().master().toFloats(), "weights after step " + step);
            assertArrayEquals(new float[12], m.unused().grad().toFloats(), "the unused parameter's gradient after step " + step);
            for (int e = 0; e < EXPERTS; e++) {
                int tokens = 0;
                for (int[] c : counts) tokens += c[e];
                if (tokens > 0) continue;
                for (int i = 0; i < expertParams.size(); i++) {
                    Parameter p = expertParams.get(i);
                    int rows = Math.toIntExact(p.shape().numel() / EXPERTS);
                    double[] was = java.util.Arrays.copyOfRange(before.get(i), e * rows, (e + 1) * rows);
                    double[] now = java.util.Arrays.copyOfRange(p.grad().toDoubles(), e * rows, (e + 1) * rows);
                    assertArrayEquals(new double[rows], now, 0.0, p.name() + " of expert " + e + " (no tokens in step " + step + ")");
                    if (java.util.Arrays.stream(was).anyMatch(v -> v != 0)) emptyExpertsChecked++;
                }
            }
        }
        assertTrue(emptyExpertsChecked > 0, "some expert without tokens must have held a stale non-zero gradient");
    }
}
