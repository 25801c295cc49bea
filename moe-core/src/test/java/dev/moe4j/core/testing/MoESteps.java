package dev.moe4j.core.testing;

import dev.moe4j.core.moe.MoE;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.tensor.Scope;
import dev.moe4j.core.tensor.Tensor;

/** The timed unit of the MoE layer benchmarks (MoeLayerBench on one GPU, EpLayerBench with expert parallelism). */
public final class MoESteps {
    private MoESteps() {}

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
