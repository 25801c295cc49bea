package dev.moe4j.core.nn;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.Tensor;

/**
 * y = x W^T + b. Letters: N rows (tokens), I input width, O output width.
 * weight [O, I] (PyTorch's layout, so checkpoints map one to one), bias [O] (optional).
 * Backward: dW += dy^T x, db += sum_n dy (accumulate); dx = dy W (assigned).
 */
public final class Linear {
    private final ModelContext ctx;
    private final Parameter weight, bias;
    private final int in, out;
    private Tensor x;  // saved input [N, I]

    /** Weights Normal(0, std) with decay, bias zeros without. */
    public Linear(ModelContext ctx, String name, int in, int out, boolean hasBias, double std) {
        if (in <= 0 || out <= 0) throw new IllegalArgumentException(name + ": Linear sizes must be > 0, got in=" + in + " out=" + out);
        this.ctx = ctx;
        this.in = in;
        this.out = out;
        this.weight = ctx.params().add(name + ".weight", Init.normal(std), true, out, in);
        this.bias = hasBias ? ctx.params().add(name + ".bias", Init.zeros(), false, out) : null;
    }

    public Parameter weight() { return weight; }

    public Parameter bias() { return bias; }

    /** x [N, I] -> y [N, O]. */
    public Tensor forward(Tensor x) {
        Backend b = ctx.backend();
        if (x.cols() != in) throw new IllegalArgumentException(weight.name() + ": input width " + x.cols() + " != " + in + " (input " + x.shape() + ")");
        this.x = x;
        Tensor y = b.empty(ctx.dtype(), x.rows(), out);
        if (bias != null) b.matmulBias(x.reshape(x.rows(), in), false, weight.value(), true, bias.value(), y);
        else b.matmul(x.reshape(x.rows(), in), false, weight.value(), true, y, 1f, 0f);
        return y;
    }

    /** dy [N, O] -> dx [N, I]. */
    public Tensor backward(Tensor dy) {
        Backend b = ctx.backend();
        if (x == null) throw new IllegalStateException(weight.name() + ": backward before forward");
        Tensor x2 = x.reshape(x.rows(), in), dy2 = dy.reshape(dy.rows(), out);
        b.matmul(dy2, true, x2, false, weight.grad(), 1f, weight.gradBeta());
        if (bias != null) b.sumRows(dy2, bias.grad(), bias.gradBeta());
        Tensor dx = b.empty(ctx.dtype(), dy.rows(), in);
        b.matmul(dy2, false, weight.value(), false, dx, 1f, 0f);
        x = null;
        return dx;
    }
}
