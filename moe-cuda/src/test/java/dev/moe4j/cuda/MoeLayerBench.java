package dev.moe4j.cuda;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.backend.GateOutputs;
import dev.moe4j.core.backend.GateSpec;
import dev.moe4j.core.moe.MoE;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Scope;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.testing.MoESteps;
import dev.moe4j.core.testing.BenchTiming;

/**
 * Times the MoE layer forward + backward (bf16, training, one GPU, all experts local) on the five configs of
 * SPEC.md with the CUDA backend. Usage: MoeLayerBench [iterations] [capped|dropless|attention|routing] [config names...]. The layer is
 * its PyTorch peer's (moe_layer_reference.py): GeLU experts without bias, bf16 gradients
 * ({@code -Dmoe4j.bench.gradDType=f32} for fp32).
 * Prints ms per forward+backward and the expert-GEMM TFLOP/s (12 * S * k * M * F FLOPs). Every figure is the
 * median of the timed iterations after 200 warm-up steps (the JIT compiles the Java path, as in training), each timed with CUDA events on the backend's stream
 * ({@link BenchTiming#medianMs}).
 */
public final class MoeLayerBench {
    // The JIT needs over a hundred steps to finish compiling the step's Java path: after 20 the host still took 0.8 ms
    // to issue a 350M step (0.3 ms at steady state) and the GPU waited on it at the step's start. The PyTorch peer
    // warms up as many steps.
    static final int WARMUP = 200;
    record Config(String name, int s, int m, int f, int e, int k) {}

    static final Config[] CONFIGS = {
        new Config("350M+MoE-128", 8192, 1024, 4096, 128, 1),
        new Config("1.3B+MoE-128", 8192, 2048, 8192, 128, 1),
        new Config("1.3B+MoE-64-top2", 8192, 2048, 8192, 64, 2),
        new Config("mixtral-8e-top2", 8192, 4096, 14336, 8, 2),
        new Config("1.3B+MoE-128-EP8-share", 8192, 2048, 8192, 16, 1),
    };

    public static void main(String[] args) {
        int iters = args.length > 0 ? Integer.parseInt(args[0]) : 10;
        boolean dropless = args.length > 1 && args[1].equals("dropless");
        java.util.Set<String> only = new java.util.HashSet<>();
        for (int i = 2; i < args.length; i++) only.add(args[i]);
        try (CudaBackend gpu = new CudaBackend(0)) {
            if (args.length > 1 && args[1].equals("attention")) {
                attention(gpu, iters);
                return;
            }
            if (args.length > 1 && args[1].equals("routing")) {
                routing(gpu, iters);
                return;
            }
            for (Config c : CONFIGS) {
                if (!only.isEmpty() && !only.contains(c.name)) continue;
                try {
                    run(gpu, c, iters, dropless);
                } catch (RuntimeException | OutOfMemoryError ex) {
                    System.out.printf("%-24s FAILED: %s%n", c.name, ex);
                }
                gpu.allocator().emptyCache();
                if (System.getenv("MOE4J_CUDA_PROFILE") != null) System.out.print(gpu.profileReport(true));
            }
        }
    }

    static void run(CudaBackend gpu, Config c, int iters, boolean dropless) {
        ModelContext ctx = new ModelContext(gpu, DType.BF16, 1);
        ctx.setGradDType(MoESteps.gradDType());
        ctx.setTraining(true);
        MoE.Builder b = MoE.builder().setContext(ctx).setHiddenSize(c.m).setFfnSize(c.f).optNumExperts(c.e).optK(c.k)
                .optActivation(Activation.GELU).optExpertBias(false).optCapacityFactor(1.0).optUseRts(Boolean.getBoolean("moe4j.bench.rts")).optInitStd(0.02);
        if (dropless) b.optDropless(true);
        MoE moe = b.build();
        ctx.allocateParameters();
        Tensor x = gpu.empty(DType.BF16, c.s, c.m), dy = gpu.empty(DType.BF16, c.s, c.m);
        gpu.randomNormal(x, 0, 1, 3, 0);
        gpu.randomNormal(dy, 0, 1e-3, 4, 0);
        double dropped = 0;
        for (int i = 0; i < WARMUP; i++) dropped = MoESteps.forwardBackward(ctx, moe, x, dy, true);
        gpu.profileReport(true);  // profile the timed steps only
        double ms = BenchTiming.medianMs(gpu, 0, iters, () -> MoESteps.forwardBackward(ctx, moe, x, dy, false));
        double hostMs = BenchTiming.medianHostMs(gpu, iters, () -> MoESteps.forwardBackward(ctx, moe, x, dy, false));
        double flops = 12.0 * c.s * c.k * c.m * c.f;
        System.out.printf("%-24s S=%d M=%d F=%d E=%d k=%d %s, %s gradients: %8.3f ms fwd+bwd, %6.1f TFLOP/s (expert GEMMs), host issue %.3f ms, dropped %.3f, device memory %.2f GiB%n",
                c.name, c.s, c.m, c.f, c.e, c.k, dropless ? "dropless" : Boolean.getBoolean("moe4j.bench.rts") ? "capacity 1.0, RTS" : "capacity 1.0",
                ctx.gradDType().name().toLowerCase(java.util.Locale.ROOT), ms, flops / ms / 1e9, hostMs, dropped, gpu.allocatedBytes() / (double) (1L << 30));
        x.close();
        dy.close();
        moe.close();
        ctx.params().close();
    }

    /**
     * Causal attention forward + backward, bf16: GPT-2 350M shapes (B=8, T=1024, H=16, D=64) and D=128
     * (JAVA_OPTS=-Dmoe4j.cuda.noTensorCoreAttention=true for the CUDA-core kernels).
     */
    static void attention(CudaBackend gpu, int iters) {
        attention(gpu, iters, 8, 1024, 16, 64);
        attention(gpu, iters, 8, 1024, 16, 128);
    }

    static void attention(CudaBackend gpu, int iters, int b, int t, int h, int d) {
        int c = h * d;
        try (Scope s = Scope.open()) {
            Tensor qkv = gpu.empty(DType.BF16, b, t, 3 * c), out = gpu.empty(DType.BF16, b, t, c), lse = gpu.empty(DType.F32, b, h, t);
            Tensor dout = gpu.empty(DType.BF16, b, t, c), dqkv = gpu.empty(DType.BF16, b, t, 3 * c);
            gpu.randomNormal(qkv, 0, 1, 1, 0);
            gpu.randomNormal(dout, 0, 1, 2, 0);
            for (int i = 0; i < 2; i++) { gpu.attention(qkv, h, out, lse); gpu.attentionBackward(dout, qkv, out, lse, h, dqkv); }
            double fwd = BenchTiming.medianMs(gpu, 0, iters, () -> gpu.attention(qkv, h, out, lse));
            double bwd = BenchTiming.medianMs(gpu, 0, iters, () -> gpu.attentionBackward(dout, qkv, out, lse, h, dqkv));
            double flops = 4.0 * b * h * (double) t * t * d / 2;  // causal: half of QK^T and PV
            System.out.printf("attention B=%d T=%d H=%d D=%d bf16 (%s kernels): forward %.3f ms (%.1f TFLOP/s), backward %.3f ms (%.1f TFLOP/s)%n",
                    b, t, h, d, Boolean.getBoolean("moe4j.cuda.rowAttention") ? "row" : Boolean.getBoolean("moe4j.cuda.noTensorCoreAttention") ? "tiled CUDA-core" : "tiled, tensor cores (FA2 form)", fwd, flops / fwd / 1e9, bwd, 2.5 * flops / bwd / 1e9);
        }
    }

    /**
     * The padded dropless layer's routing on each config's gate shape (fp32 logits [S, E]): the dropless gate, the read
     * of its counts (the layer's one wait), then the capacity layout with capacity = the largest count, either by
     * routing again with that capacity (the layer before moeGatePad) or by moeGatePad. Medians of CUDA-event spans,
     * which include the host's time to issue what follows the wait, as in the layer.
     */
    static void routing(CudaBackend gpu, int iters) {
        for (Config c : CONFIGS) {
            try (Scope sc = Scope.open()) {
                Tensor logits = gpu.empty(DType.F32, c.s, c.e);
                gpu.randomNormal(logits, 0, 1, 5, 0);
                GateOutputs first = CudaMoeVsCpuTest.outputs(gpu, c.s, c.e, c.k), again = CudaMoeVsCpuTest.outputs(gpu, c.s, c.e, c.k);
                Tensor dest = gpu.empty(DType.I32, c.s, c.k), offsets = gpu.empty(DType.I32, c.e + 1);
                GateSpec dropless = new GateSpec(c.k, 0, false, false, false, 7, 0);
                java.util.function.IntSupplier gateAndRead = () -> {
                    gpu.moeGate(dropless, logits, first);
                    return java.util.Arrays.stream(first.counts().toInts()).max().orElseThrow();
                };
                Runnable gateOnly = gateAndRead::getAsInt;
                Runnable routeAgain = () -> gpu.moeGate(new GateSpec(c.k, gateAndRead.getAsInt(), false, false, false, 7, 0), logits, again);
                Runnable pad = () -> gpu.moeGatePad(first, gateAndRead.getAsInt(), dest, offsets);
                double[] ms = new double[3];
                Runnable[] ways = {gateOnly, routeAgain, pad};
                for (int round = 0; round < 2; round++) {   // the first round warms up
                    for (int w = 0; w < 3; w++) ms[w] = BenchTiming.medianMs(gpu, 50, iters, ways[w]);
                }
                System.out.printf("%-24s S=%d E=%d k=%d routing: dropless gate + count read %.1f us, + routed again %.1f us, + moeGatePad %.1f us%n",
                        c.name, c.s, c.e, c.k, 1e3 * ms[0], 1e3 * ms[1], 1e3 * ms[2]);
            }
        }
    }
}
