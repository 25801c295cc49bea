package dev.moe4j.core.train;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.cpu.CpuBackend;
import dev.moe4j.core.moe.MoE;
import dev.moe4j.core.nn.Gpt;
import dev.moe4j.core.nn.GptConfig;
import dev.moe4j.core.nn.Mlp;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.nn.Parameter;
import dev.moe4j.core.optim.AdamW;
import dev.moe4j.core.optim.CosineSchedule;
import dev.moe4j.core.tensor.DType;
import org.junit.jupiter.api.Test;

import java.util.ArrayList;
import java.util.List;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * A bf16 GPT-MoE with its gradients stored in bf16 ({@link ModelContext#setGradDType}) trains as with fp32
 * gradients, up to bf16 rounding: a dense block, then a dropless MoE block with every kind of gradient write
 * (grouped weight gradients, expert-bias scatter-add, Residual-MoE and shared-expert GEMMs and sumRows, the gate),
 * LayerNorms and the tied embedding, two micro-batches a step.
 *
 * <p>Tolerances. Step 0 starts from the same weights and the activation gradients do not depend on the parameter
 * gradients, so the two runs' gradients differ only by the rounding of each gradient write to bf16 (at most 2^-9 of
 * the value written): two writes per parameter a step, four for the tied embedding (head GEMM and embedding
 * scatter per micro-batch). A value written after the first micro-batch can exceed the final gradient where the
 * micro-batches cancel, so the bound is 2^-6 of each tensor's largest entry (measured: at most 5.3e-3). Losses after
 * 5 Adam steps within 1e-2 relative (measured: 1.3e-4), while the loss falls by 0.34.
 */
class Bf16GradientTest {
    static final GptConfig CFG = new GptConfig(20, 8, 2, 16, 2, 32, Activation.GELU);
    static final int MICRO = 2, STEPS = 5;
    static final double GRAD_TOL = Math.scalb(1.0, -6), LOSS_TOL = 1e-2;

    record Run(ModelContext ctx, Trainer trainer) {
        static Run build(DType gradDType) {
            ModelContext ctx = new ModelContext(new CpuBackend(), DType.BF16, 11);
            ctx.setGradDType(gradDType);
            Gpt gpt = new Gpt(ctx, CFG, (c, layer, name) -> layer == 0
                    ? new Mlp(c, name, CFG.hidden(), CFG.ffnHidden(), CFG.activation(), 0.02, 0.02)
                    : MoE.builder().setContext(c).optName(name).setHiddenSize(CFG.hidden()).setFfnSize(24).optNumExperts(4).optK(2)
                            .optDropless(true).optExpertBias(true).optUseResidual(true).optSharedExperts(1, 24).optZLossCoeff(0.01)
                            .build().asFeedForward(0.01));
            ctx.allocateParameters();
            Trainer t = new Trainer(gpt, AdamW.withDefaults(ctx.params()), new TrainerCheckpointTest.RandomBatches(CFG.vocabSize(), 2, 8),
                    new CosineSchedule(1e-2f, 1e-3f, 1, 20), MICRO);
            return new Run(ctx, t);
        }
    }

    @Test
    void bf16GradientsTrainLikeF32GradientsWithinBf16Rounding() {
        Run f32 = Run.build(DType.F32), bf16 = Run.build(DType.BF16);
        assertEquals(DType.F32, f32.ctx().params().grad().dtype());
        assertEquals(DType.BF16, bf16.ctx().params().grad().dtype(), "the flat gradient buffer itself is bf16");
        assertEquals(DType.BF16, bf16.ctx().params().all().get(0).grad().dtype());
        assertEquals(DType.F32, bf16.ctx().params().master().dtype(), "master weights stay fp32");

        List<Double> l32 = new ArrayList<>(), l16 = new ArrayList<>();
        for (int step = 0; step < STEPS; step++) {
            StepMetrics a = f32.trainer().trainStep(), b = bf16.trainer().trainStep();
            assertTrue(!a.skipped() && !b.skipped(), "step " + step + " skipped");
            l32.add(a.loss());
            l16.add(b.loss());
            if (step == 0) {
                assertEquals(a.loss(), b.loss(), 0.0, "step 0: the same weights give the same forward");
                assertEquals(a.gradNorm(), b.gradNorm(), 1e-2 * a.gradNorm(), "step 0: gradient norm");
                assertGradientsWithinBf16Rounding(f32, bf16);
            }
        }
        for (int step = 1; step < STEPS; step++) {
            assertEquals(l32.get(step), l16.get(step), LOSS_TOL * l32.get(step), "loss at step " + step + ": " + l32 + " vs " + l16);
        }
        assertTrue(l16.get(STEPS - 1) < l16.get(0) - 0.1, "the bf16-gradient model must learn: " + l16);
    }

    private static void assertGradientsWithinBf16Rounding(Run f32, Run bf16) {
        boolean someRounded = false;
        for (Parameter p : f32.ctx().params().all()) {
            double[] want = p.grad().toDoubles(), got = bf16.ctx().params().get(p.name()).grad().toDoubles();
            double scale = 0, err = 0;
            for (int i = 0; i < want.length; i++) {
                assertEquals(DType.BF16.round(got[i]), got[i], 0.0, p.name() + "[" + i + "] must be a bf16 value");
                scale = Math.max(scale, Math.abs(want[i]));
                err = Math.max(err, Math.abs(want[i] - got[i]));
            }
            assertTrue(err <= GRAD_TOL * scale, p.name() + ": max error " + err + " vs max |gradient| " + scale);
            someRounded |= err > 0;
        }
        assertTrue(someRounded, "bf16 storage must round some gradient");
    }
}
