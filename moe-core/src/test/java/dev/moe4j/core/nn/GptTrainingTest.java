package dev.moe4j.core.nn;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.cpu.CpuBackend;
import dev.moe4j.core.optim.AdamW;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Scope;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.testing.Tensors;
import org.junit.jupiter.api.Test;

import java.util.SplittableRandom;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

class GptTrainingTest {
    private final CpuBackend cpu = new CpuBackend();

    @Test
    void tinyGptOverfitsOneBatch() {
        ModelContext ctx = new ModelContext(cpu, DType.F32, 1);
        Gpt gpt = new Gpt(ctx, new GptConfig(32, 16, 2, 32, 4, 64, Activation.GELU));
        ctx.allocateParameters();
        AdamW opt = new AdamW(ctx.params(), 0.9f, 0.95f, 1e-8f, 0f, 1f);
        SplittableRandom rnd = new SplittableRandom(3);
        Tensor tokens = Tensors.randomInts(cpu, rnd, 0, 32, 4, 16), targets = Tensors.randomInts(cpu, rnd, 0, 32, 4, 16);
        float first = 0, last = 0;
        long memAfterFirst = 0;
        for (int step = 0; step < 150; step++) {
            try (Scope s = Scope.open()) {
                ctx.params().zeroGrad();
                float loss = gpt.forwardLoss(tokens, targets, 64).toFloats()[0];
                gpt.backwardLoss(64, 1f);
                opt.step(3e-3f);
                if (step == 0) first = loss;
                last = loss;
            }
            if (step == 0) memAfterFirst = cpu.allocatedBytes();
            assertEquals(memAfterFirst, cpu.allocatedBytes(), "a step's temporaries must be freed by its scope");
        }
        assertEquals(Math.log(32), first, 0.3, "initial loss is about log(V)");
        assertTrue(last < 0.1, "loss after 150 steps on one batch: " + last);
    }

    @Test
    void badInputsNameTheProblem() {
        var e = assertThrows(IllegalArgumentException.class, () -> new GptConfig(32, 16, 2, 30, 4, 64, Activation.GELU));
        assertEquals("hidden (30) must be divisible by heads (4)", e.getMessage());
        ModelContext ctx = new ModelContext(cpu, DType.F32, 1);
        Gpt gpt = new Gpt(ctx, new GptConfig(32, 8, 1, 8, 2, 16, Activation.GELU));
        ctx.allocateParameters();
        var tooLong = assertThrows(IllegalArgumentException.class, () -> gpt.forward(cpu.zeros(DType.I32, 1, 9)));
        assertEquals("sequence length 9 exceeds maxSeqLen 8", tooLong.getMessage());
        var badToken = assertThrows(IllegalArgumentException.class, () -> gpt.forward(cpu.fromInts(new int[] {1, 40}, 1, 2)));
        assertEquals("embedding: token 40 at position 1 is outside the vocabulary [0, 32)", badToken.getMessage());
    }
}
