package dev.moe4j.core.moe;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.cpu.CpuBackend;
import dev.moe4j.core.nn.Gpt;
import dev.moe4j.core.nn.GptConfig;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.nn.Mlp;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.testing.GradCheck;
import dev.moe4j.core.testing.Tensors;
import org.junit.jupiter.api.Test;

import java.util.SplittableRandom;
import java.util.function.DoubleSupplier;

import static org.junit.jupiter.api.Assertions.*;

/** The MoE layer dropped into the GPT as its FFN: the whole loss (CE + aux) against float64 finite differences. */
class GptMoEGradientTest {
    @Test
    void gptWithMoEEveryOtherLayerMatchesFiniteDifferences() {
        CpuBackend cpu = new CpuBackend();
        ModelContext ctx = new ModelContext(cpu, DType.F64, 3);
        GptConfig cfg = new GptConfig(11, 8, 2, 8, 2, 12, Activation.GELU);
        MoE[] moes = new MoE[cfg.layers()];
        Gpt gpt = new Gpt(ctx, cfg, (c, layer, name) -> {
            if (layer % 2 == 0) return new Mlp(c, name, cfg.hidden(), cfg.ffnHidden(), cfg.activation(), 0.5, 0.5);
            moes[layer] = MoE.builder().setContext(c).optName(name).setHiddenSize(cfg.hidden()).setFfnSize(6)
                    .optNumExperts(4).optK(2).optCapacityFactor(0.5).optMinCapacity(0).optZLossCoeff(0.05)
                    .optUseResidual(true).optInitStd(0.5).build();
            return moes[layer].asFeedForward(0.3);
        });
        ctx.allocateParameters();
        SplittableRandom rnd = new SplittableRandom(4);
        int b = 2, t = 5, valid = b * t;
        Tensor tokens = Tensors.randomInts(cpu, rnd, 0, 11, b, t);
        Tensor targets = Tensors.randomInts(cpu, rnd, 0, 11, b, t);
        long rng = ctx.rngOffset();
        float scale = 0.5f;
        ctx.params().zeroGrad();
        double[] l = gpt.forwardLoss(tokens, targets, valid).toDoubles();
        assertTrue(moes[1].droppedFraction() > 0, "the MoE layer should drop tokens");
        MoEOutput o = moes[1].lastOutput();
        assertEquals(0.3 * o.lAux().toDoubles()[0] + 0.05 * o.zLoss().toDoubles()[0], l[1], 1e-12, "aux = 0.3 l_aux + 0.05 z");
        gpt.backwardLoss(valid, scale);
        ctx.params().finishGrads();
        DoubleSupplier loss = () -> {
            ctx.setRngOffset(rng);
            double[] v = gpt.forwardLoss(tokens, targets, valid).toDoubles();
            return scale * (v[0] + v[1]);
        };
        GradCheck.check("gpt-moe parameters", ctx.params().master(), ctx.params().grad(), loss, 400, GradCheck.F64_TOL);
        for (var p : ctx.params().all()) {
            if (p.name().startsWith("h.1.ffn.gate")) GradCheck.check(p.name(), p.master(), p.grad(), loss, 20, GradCheck.F64_TOL);
        }
    }
}
