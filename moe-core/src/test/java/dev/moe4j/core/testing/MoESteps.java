package dev.moe4j.core.testing;

import dev.moe4j.core.moe.MoE;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Scope;
import dev.moe4j.core.tensor.Tensor;

/** The timed unit of the MoE layer benchmarks (MoeLayerBench on one GPU, EpLayerBench with expert parallelism). */
public final class MoESteps {
    private MoESteps() {}

    /**
     * The layer benchmarks' gradient dtype, {@code -Dmoe4j.bench.gradDType=bf16|f32}: bf16 by default, as their
     * PyTorch peers (bf16 parameters) write bf16 gradients.
     */
    public static DType gradDType() {
        String s = System.getProperty("moe4j.bench.gradDType", "bf16");
        return switch (s.toLowerCase(java.util.Locale.ROOT)) {
            case "bf16" -> DType.BF16;
            case "f32" -> DType.F32;
            default -> throw new IllegalArgumentException("moe4j.bench.gradDType must be bf16 or f32, got " + s);
        };
    }

    /**
     * One forward + backward inside a step scope, as in training with one micro-batch per optimizer step: the
     * gradients are zeroed first (lazily), so the backward writes them instead of adding to them. measure: also
     * returns the fraction of dropped choices (a host read), else 0.
     */
    public static double forwardBackward(ModelContext ctx, MoE moe, Tensor x, Tensor dy, boolean measure) {
        ctx.params().zeroGrad();
        try (Scope s = Scope.open()) {
            moe.forward(x);
            double dropped = measure ? moe.droppedFraction() : 0;  // the gate's outputs die with the step scope
            moe.backward(dy, 0.01f);
            return dropped;
        }
    }
}
