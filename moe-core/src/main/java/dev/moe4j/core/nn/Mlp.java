package dev.moe4j.core.nn;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.Tensor;

/**
 * Dense FFN: fc2(act(fc1(x))). C model width, F hidden width; fc1 C -> act.inputWidth(F) (2F for GEGLU/SwiGLU),
 * fc2 F -> C with the GPT-2 residual scaling of its init.
 */
public final class Mlp implements FeedForward {
    private final ModelContext ctx;
    private final Linear fc1, fc2;
    private final Activation act;
    private Tensor h;  // saved fc1 output [N, act.inputWidth(F)]

    public Mlp(ModelContext ctx, String name, int dim, int hidden, Activation act, double std, double residualStd) {
        this.ctx = ctx;
        this.act = act;
        this.fc1 = new Linear(ctx, name + ".fc1", dim, act.inputWidth(hidden), true, std);
        this.fc2 = new Linear(ctx, name + ".fc2", hidden, dim, true, residualStd);
    }

    @Override
    public Tensor forward(Tensor x) {
        Backend b = ctx.backend();
        h = fc1.forward(x);
        Tensor a = b.empty(ctx.dtype(), h.rows(), h.cols() / (act.gated() ? 2 : 1));
        b.activation(act, h, a);
        return fc2.forward(a);
    }

    @Override
    public Tensor backward(Tensor dy, float lossScale) {
        Tensor da = fc2.backward(dy);
        Tensor dh = ctx.backend().empty(ctx.dtype(), h.rows(), h.cols());
        ctx.backend().activationBackward(act, h, da, dh);
        h = null;
        return fc1.backward(dh);
    }
}
