package dev.moe4j.core.nn;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;

/**
 * LayerNorm over the last dimension C: out = (x - mean) * rstd * gamma + beta; gamma ones, beta zeros.
 * Backward: dgamma, dbeta accumulate; dx assigned.
 */
public final class LayerNorm {
    public static final float EPS = 1e-5f;

    private final ModelContext ctx;
    private final Parameter gamma, beta;
    private final int dim;
    private Tensor x, mean, rstd;  // saved: x [N, C], mean [N], rstd [N]

    public LayerNorm(ModelContext ctx, String name, int dim) {
        this.ctx = ctx;
        this.dim = dim;
        this.gamma = ctx.params().add(name + ".weight", Init.ones(), false, dim);
        this.beta = ctx.params().add(name + ".bias", Init.zeros(), false, dim);
    }

    /** x [N, C] -> [N, C]. */
    public Tensor forward(Tensor x) {
        Backend b = ctx.backend();
        if (x.cols() != dim) throw new IllegalArgumentException(gamma.name() + ": input width " + x.cols() + " != " + dim);
        DType stats = ctx.dtype() == DType.F64 ? DType.F64 : DType.F32;
        this.x = x;
        this.mean = b.empty(stats, x.rows());
        this.rstd = b.empty(stats, x.rows());
        Tensor out = b.empty(ctx.dtype(), x.rows(), dim);
        b.layerNorm(x, gamma.value(), beta.value(), EPS, out, mean, rstd);
        return out;
    }

    /** dout [N, C] -> dx [N, C]. */
    public Tensor backward(Tensor dout) {
        return backward(dout, null);
    }

    /** dout [N, C] -> dx [N, C] + residual (the input's gradient through a residual connection; null: none). */
    public Tensor backward(Tensor dout, Tensor residual) {
        if (x == null) throw new IllegalStateException(gamma.name() + ": backward before forward");
        Tensor dx = ctx.backend().empty(ctx.dtype(), x.rows(), dim);
        if (residual == null) ctx.backend().layerNormBackward(dout, x, gamma.value(), mean, rstd, dx, gamma.definedGrad(), beta.definedGrad());
        else ctx.backend().layerNormBackward(dout, x, gamma.value(), mean, rstd, residual, dx, gamma.definedGrad(), beta.definedGrad());
        x = mean = rstd = null;
        return dx;
    }
}
