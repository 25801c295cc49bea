package dev.moe4j.cuda;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.moe.MoE;
import dev.moe4j.core.moe.MoEOutput;
import dev.moe4j.core.nn.Gpt;
import dev.moe4j.core.nn.GptConfig;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.nn.Mlp;
import dev.moe4j.core.optim.AdamW;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Scope;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.testing.Tensors;
import org.junit.jupiter.api.Tag;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.CsvSource;

import java.util.function.UnaryOperator;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assumptions.assumeTrue;

/**
 * Whole layers on the GPU against the CPU backend: the MoE layer forward + backward (top-1/top-2, capped with
 * drops, dropless, RTS and noise) and a GPT-MoE training step (loss and every parameter gradient), with the
 * same parameter values on both sides. F32 within 1e-4 (many fp32 ops in sequence), BF16 within 5e-2.
 */
@Tag("gpu")
class CudaModelTest extends GpuTestBase {

    /** Copies the CPU context's flat master parameters to the GPU's (and the model-dtype values). */
    static void sameParameters(ModelContext c, ModelContext g) {
        Tensor m = g.backend().fromDoubles(DType.F32, c.params().master().toDoubles(), (int) c.params().master().numel());
        g.backend().copy(m, g.params().master());
        if (g.params().value() != g.params().master()) g.backend().copy(m, g.params().value());
        m.close();
    }

    static double tolFor(DType dt) { return dt == DType.F32 ? 1e-4 : 5e-2; }

    @ParameterizedTest
    // BF16 with hidden 32 takes the 8-column dispatch and combine kernels; the layout matters for dropless (cf -1) only
    @CsvSource({"1, 0.6, true, false, F32, AUTO", "2, 0.5, false, true, F32, AUTO", "2, -1, false, false, F32, AUTO",
                "1, 0.6, true, true, BF16, AUTO", "2, 0.8, false, false, BF16, AUTO", "1, -1, false, false, BF16, PADDED",
                "2, -1, false, false, BF16, SORTED"})
    void moeLayerForwardBackwardMatchesTheCpu(int k, double capacityFactor, boolean rts, boolean noise, DType dt, MoE.DroplessLayout layout) {
        layerMatchesTheCpu(k, capacityFactor, rts, noise, dt, layout);
    }

    /**
     * The bf16 layer with its expert products on our own grouped kernels (forced): they read the offsets on the device,
     * so a dropless layer runs without reading its counts to the host (MoE.forward asks the host only for backends that
     * want them). Capacity and dropless, k 1 and 2; the wgmma products also on one persistent block (the fused
     * epilogues' ping-pong schedule: both consumers and their turns over every tile).
     */
    @ParameterizedTest
    @CsvSource({"WGMMA, 1, 0.6, false", "WGMMA, 2, -1, false", "WGMMA, 1, -1, false", "WGMMA, 2, 0.8, true", "WGMMA, 1, -1, true",
            "MMA_SYNC, 2, 0.8, false", "MMA_SYNC, 2, -1, false"})
    void moeLayerOnOurGroupedKernelsMatchesTheCpu(CudaBackend.GroupedKernel kernel, int k, double capacityFactor, boolean oneBlock) {
        assumeTrue(kernel != CudaBackend.GroupedKernel.WGMMA || gpu.hasWgmma(), "the wgmma kernels need compute capability 9.0");
        CudaBackend.GroupedKernel saved = gpu.groupedKernel;
        gpu.groupedKernel = kernel;
        if (oneBlock) gpu.wgmmaBlocks = 1;   // the layer's few tiles all on one block: both consumers and their turns
        try {
            assertFalse(gpu.wantsHostOffsets(DType.BF16, 48 * k, 6), "our kernels read the offsets on the device");
            layerMatchesTheCpu(k, capacityFactor, false, false, DType.BF16, MoE.DroplessLayout.AUTO);
        } finally {
            gpu.groupedKernel = saved;
            gpu.wgmmaBlocks = 0;
        }
    }

    private void layerMatchesTheCpu(int k, double capacityFactor, boolean rts, boolean noise, DType dt, MoE.DroplessLayout layout) {
        int s = 48, m = 32, f = 40, e = 6;
        UnaryOperator<MoE.Builder> cfg = bl -> {
            bl.setHiddenSize(m).setFfnSize(f).optNumExperts(e).optK(k).optMinCapacity(0).optUseRts(rts).optZLossCoeff(0.01)
                    .optActivation(Activation.GELU).optDroplessLayout(layout);
            if (capacityFactor > 0) bl.optCapacityFactor(capacityFactor); else bl.optDropTokens(false);
            if (noise) bl.optNoisyGatePolicy("RSample");
            return bl;
        };
        ModelContext[] ctx = {new ModelContext(cpu, dt, 11), new ModelContext(gpu, dt, 11)};
        MoE[] moe = new MoE[2];
        for (int i = 0; i < 2; i++) {
            ctx[i].setTraining(true);
            moe[i] = cfg.apply(MoE.builder()).setContext(ctx[i]).build();
            ctx[i].allocateParameters();
        }
        sameParameters(ctx[0], ctx[1]);
        Tensor[] x = rand(dt, 1, s, m), r = rand(dt, 1, s, m);
        Tensor[] out = new Tensor[2], dx = new Tensor[2], laux = new Tensor[2];
        for (int i = 0; i < 2; i++) {
            MoEOutput o = moe[i].forward(x[i]);
            out[i] = o.output();
            laux[i] = o.lAux();
            ctx[i].params().zeroGrad();
            dx[i] = moe[i].backward(r[i], 0.5f);
            ctx[i].params().finishGrads();
        }
        String name = "MoE layer k=" + k + " cf=" + capacityFactor + " rts=" + rts + " noise=" + noise + " " + dt + " " + layout;
        System.out.printf("%s: dropped %.3f (cpu) %.3f (gpu)%n", name, moe[0].droppedFraction(), moe[1].droppedFraction());
        check(name + " out", out, tolFor(dt));
        check(name + " l_aux", laux, 1e-5);
        check(name + " dx", dx, tolFor(dt));
        check(name + " grads", new Tensor[] {ctx[0].params().grad(), ctx[1].params().grad()}, tolFor(dt));
        for (int i = 0; i < 2; i++) { moe[i].close(); ctx[i].params().close(); }
    }

    @ParameterizedTest
    @CsvSource({"F32", "BF16"})
    void gptMoETrainingStepMatchesTheCpu(DType dt) {
        GptConfig cfg = new GptConfig(61, 16, 2, 32, 2, 64, Activation.GELU);
        ModelContext[] ctx = {new ModelContext(cpu, dt, 5), new ModelContext(gpu, dt, 5)};
        Gpt[] gpt = new Gpt[2];
        for (int i = 0; i < 2; i++) {
            ModelContext c = ctx[i];
            c.setTraining(true);
            gpt[i] = new Gpt(c, cfg, (cc, layer, name) -> {
                if (layer % 2 == 0) return new Mlp(cc, name, cfg.hidden(), cfg.ffnHidden(), cfg.activation(), 0.02, 0.02);
                return MoE.builder().setContext(cc).optName(name).setHiddenSize(cfg.hidden()).setFfnSize(48)
                        .optNumExperts(4).optK(2).optCapacityFactor(1.0).optMinCapacity(0).optZLossCoeff(0.01).build()
                        .asFeedForward(0.01);
            });
            c.allocateParameters();
        }
        sameParameters(ctx[0], ctx[1]);
        int b = 3, t = 13, valid = b * t;  // t <= maxSeqLen 16
        Tensor[] tokens = ints(0, 61, b, t), targets = ints(0, 61, b, t);
        Tensor[] loss = new Tensor[2];
        for (int i = 0; i < 2; i++) {
            try (Scope sc = Scope.open()) {
                ctx[i].params().zeroGrad();
                Tensor l = gpt[i].forwardLoss(tokens[i], targets[i], valid);
                loss[i] = Scope.keep(ctx[i].backend().fromDoubles(DType.F32, l.toDoubles(), (int) l.numel()));
                gpt[i].backwardLoss(valid, 1f);
                ctx[i].params().finishGrads();
            }
        }
        check("GPT-MoE step loss " + dt, loss, dt == DType.F32 ? 1e-5 : 1e-2);
        check("GPT-MoE step grads " + dt, new Tensor[] {ctx[0].params().grad(), ctx[1].params().grad()}, tolFor(dt));
        double lossValue = loss[1].toDoubles()[0];
        assertTrue(Math.abs(lossValue - Math.log(61)) < 1.0, "initial loss near ln(V): " + lossValue);
        for (int i = 0; i < 2; i++) ctx[i].params().close();
    }

    /**
     * A bf16 GPT-MoE step with BF16 gradients ({@link ModelContext#setGradDType}): two micro-batches (the second adds
     * into the bf16 gradients with beta = 1), a dropless MoE block with expert biases (bf16 scatter-add) and the tied
     * embedding (bf16 embedding backward); gradients within the BF16 tolerance of the CPU's. Then one AdamW step on
     * each side from the same (the GPU's) bf16 gradients: the norm and the fp32 master weights agree to fp32 rounding.
     */
    @Test
    void gptMoEStepWithBf16GradientsMatchesTheCpu() {
        GptConfig cfg = new GptConfig(61, 16, 2, 32, 2, 64, Activation.GELU);
        ModelContext[] ctx = {new ModelContext(cpu, DType.BF16, 5), new ModelContext(gpu, DType.BF16, 5)};
        Gpt[] gpt = new Gpt[2];
        AdamW[] opt = new AdamW[2];
        for (int i = 0; i < 2; i++) {
            ModelContext c = ctx[i];
            c.setGradDType(DType.BF16);
            c.setTraining(true);
            gpt[i] = new Gpt(c, cfg, (cc, layer, name) -> {
                if (layer % 2 == 0) return new Mlp(cc, name, cfg.hidden(), cfg.ffnHidden(), cfg.activation(), 0.02, 0.02);
                return MoE.builder().setContext(cc).optName(name).setHiddenSize(cfg.hidden()).setFfnSize(48)
                        .optNumExperts(4).optK(2).optDropless(true).optExpertBias(true).optZLossCoeff(0.01).build().asFeedForward(0.01);
            });
            c.allocateParameters();
            opt[i] = AdamW.withDefaults(c.params());
        }
        assertEquals(DType.BF16, ctx[1].params().grad().dtype());
        sameParameters(ctx[0], ctx[1]);
        int b = 3, t = 13, valid = b * t;
        Tensor[][] tokens = {ints(0, 61, b, t), ints(0, 61, b, t)}, targets = {ints(0, 61, b, t), ints(0, 61, b, t)};
        Tensor[] grads = new Tensor[2], normSq = new Tensor[2];
        for (int i = 0; i < 2; i++) {
            ctx[i].params().zeroGrad();
            for (int micro = 0; micro < 2; micro++) {
                try (Scope sc = Scope.open()) {
                    gpt[i].forwardLoss(tokens[micro][i], targets[micro][i], valid);
                    gpt[i].backwardLoss(valid, 0.5f);
                }
            }
            ctx[i].params().finishGrads();
            grads[i] = ctx[i].params().grad();
        }
        check("GPT-MoE bf16 gradients, 2 micro-batches", grads, tolFor(DType.BF16));
        try (Tensor g = cpu.fromDoubles(DType.BF16, grads[1].toDoubles(), grads[0].shape().dims())) { cpu.copy(g, grads[0]); }
        for (int i = 0; i < 2; i++) normSq[i] = opt[i].step(1e-2f);
        check("AdamW from bf16 gradients: squared norm", normSq, F32_TOL);
        check("AdamW from bf16 gradients: master weights", new Tensor[] {ctx[0].params().master(), ctx[1].params().master()}, F32_TOL);
        for (int i = 0; i < 2; i++) { opt[i].close(); ctx[i].params().close(); }
    }

}
