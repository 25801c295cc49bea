package dev.moe4j.cuda;

import dev.moe4j.core.cpu.CpuBackend;
import dev.moe4j.core.model.ModelSpec;
import dev.moe4j.core.model.Presets;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.model.Models;
import dev.moe4j.core.tensor.DType;
import org.junit.jupiter.api.Test;

import java.util.regex.Matcher;
import java.util.regex.Pattern;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

/** TrainBench's smoke mode (tiny-moe on the CPU backend) and its parameter arithmetic, with no GPU. */
class TrainBenchSmokeTest {

    @Test
    void smokeRunPrintsOneJsonLineWithConsistentFigures() {
        String json = TrainBench.run(new CpuBackend(), TrainBench.parse(new String[] {"--smoke"}), 64);
        assertTrue(json.startsWith("{\"impl\":\"moe4j\"") && json.endsWith("}") && !json.contains("\n"), json);
        double ms = num(json, "step_ms"), tps = num(json, "tokens_per_s"), mfu = num(json, "mfu");
        double flops = num(json, "flops_per_token"), gemm = num(json, "gemm_tflops");
        assertTrue(ms > 0 && gemm > 0, json);
        assertEquals(2 * 32 / (ms / 1e3), tps, tps * 1e-3, "tokens/s of the median step");
        assertEquals(flops * tps / (gemm * 1e12), mfu, mfu * 1e-2, "MFU = FLOPs/token * tokens/s / GEMM rate");
        // random tokens over a 256-token vocabulary: the untrained model's loss is about ln 256
        assertEquals(Math.log(256), num(json, "loss_first"), 0.5, json);
        assertFalse(json.contains("\"skipped_last\":true"), json);
    }

    @Test
    void activeParametersCountOneOfSixteenExpertsAndNoPositions() {
        // 350M+MoE-16 at sequence 1024, counted from the layer shapes: per block LayerNorms 4C, attention
        // 4C^2 + 4C, dense MLP 2CF + F + C; MoE block: gate E*C, experts E x (2CF + F + C)
        ModelSpec spec = Presets.get("350M+MoE-16").withVocab(50304, 1024);
        long c = 1024, f = 4096, e = 16, v = 50304, t = 1024;
        long attn = 4 * c + 4 * c * c + 4 * c, mlp = 2 * c * f + f + c, gate = e * c;
        long total = v * c + t * c + 2 * c + 12 * (attn + mlp) + 12 * (attn + gate + e * mlp);
        long active = total - t * c - 12 * (e - 1) * mlp;
        // a shape-only count: the CPU backend would allocate 1.9B doubles, so count the declared shapes unallocated
        ModelContext ctx = new ModelContext(new CpuBackend(), DType.BF16, 1);
        Models.build(ctx, spec);
        long declared = ctx.params().all().stream().mapToLong(p -> p.shape().numel()).sum();
        assertEquals(total, declared, "declared parameters of 350M+MoE-16");
        assertTrue(total > 1.8e9 && total < 1.95e9, "about 1.9B parameters: " + total);
        assertEquals(active, TrainBench.activeParams(ctx, spec));
    }

    @Test
    void badArgumentsAreRejectedByName() {
        var ex = assertThrows(IllegalArgumentException.class, () -> TrainBench.parse(new String[] {"350M+MoE-16", "0"}));
        assertTrue(ex.getMessage().contains("microBatch"), ex.getMessage());
        assertThrows(IllegalArgumentException.class, () -> TrainBench.parse(new String[] {"--smoke", "3"}));
    }

    private static double num(String json, String key) {
        Matcher m = Pattern.compile("\"" + key + "\":([-0-9.eE+]+)").matcher(json);
        assertTrue(m.find(), key + " missing in " + json);
        return Double.parseDouble(m.group(1));
    }
}
