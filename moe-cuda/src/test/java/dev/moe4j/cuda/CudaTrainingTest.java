package dev.moe4j.cuda;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.moe.MoE;
import dev.moe4j.core.nn.Gpt;
import dev.moe4j.core.nn.GptConfig;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.nn.Mlp;
import dev.moe4j.core.optim.AdamW;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Scope;
import dev.moe4j.core.tensor.Tensor;
import org.junit.jupiter.api.Tag;
import org.junit.jupiter.api.Test;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * A bf16 GPT-MoE (MoE FFN, top-2 with capacity, every other layer) trained on the GPU with AdamW for 1000
 * steps on one batch: the loss falls, and device memory (allocatedBytes, cudaMalloc calls, live tensors) is
 * the same after every step once the first steps have warmed the caching allocator.
 */
@Tag("gpu")
class CudaTrainingTest extends GpuTestBase {

    @Test
    void gptMoETrainsAndDeviceMemoryDoesNotGrowOver1000Steps() {
        GptConfig cfg = new GptConfig(64, 32, 2, 64, 4, 128, Activation.GELU);
        ModelContext ctx = new ModelContext(gpu, DType.BF16, 9);
        ctx.setTraining(true);
        Gpt gpt = new Gpt(ctx, cfg, (c, layer, name) -> {
            if (layer % 2 == 0) return new Mlp(c, name, cfg.hidden(), cfg.ffnHidden(), cfg.activation(), 0.02, 0.02);
            return MoE.builder().setContext(c).optName(name).setHiddenSize(cfg.hidden()).setFfnSize(96)
                    .optNumExperts(4).optK(2).optCapacityFactor(1.25).optMinCapacity(4).optZLossCoeff(1e-3).build()
                    .asFeedForward(0.01);
        });
        ctx.allocateParameters();
        AdamW opt = new AdamW(ctx.params(), 0.9f, 0.95f, 1e-8f, 0.01f, 1f);
        int b = 8, t = 32, valid = b * t;
        Tensor tokens = ints(0, 64, b, t)[1], targets = ints(0, 64, b, t)[1];
        float first = 0, last = 0;
        long held = 0, mallocs = 0, inUse = 0;
        long t0 = 0;
        for (int step = 0; step < 1000; step++) {
            try (Scope s = Scope.open()) {
                ctx.params().zeroGrad();
                Tensor l = gpt.forwardLoss(tokens, targets, valid);
                gpt.backwardLoss(valid, 1f);
                opt.step(2e-3f);
                if (step == 0 || step == 999 || step % 100 == 0) {
                    float loss = l.toFloats()[0];
                    if (step == 0) first = loss;
                    last = loss;
                }
            }
            if (step == 4) {
                gpu.synchronize();
                held = gpu.allocatedBytes(); mallocs = gpu.mallocCalls(); inUse = gpu.inUseBytes();
                t0 = System.nanoTime();
            }
            if (step > 4 && step % 50 == 0) {
                assertEquals(held, gpu.allocatedBytes(), "device memory grew by step " + step);
                assertEquals(mallocs, gpu.mallocCalls(), "cudaMalloc after warm-up, step " + step);
                assertEquals(inUse, gpu.inUseBytes(), "live tensors grew by step " + step);
            }
        }
        gpu.synchronize();
        double secs = (System.nanoTime() - t0) / 1e9;
        System.out.printf("GPT-MoE bf16 on %s: loss %.4f -> %.4f over 1000 steps, %.0f tokens/s, device memory %d bytes held, %d cudaMalloc calls%n",
                gpu.name(), first, last, 995.0 * valid / secs, gpu.allocatedBytes(), gpu.mallocCalls());
        assertEquals(Math.log(64), first, 0.5, "initial loss is about ln(V)");
        assertTrue(last < first - 2.0, "the loss must fall: " + first + " -> " + last);
        assertEquals(held, gpu.allocatedBytes());
        opt.close();
        ctx.params().close();
    }
}
