package dev.moe4j.core.nn;

import dev.moe4j.core.tensor.Shape;
import dev.moe4j.core.tensor.Tensor;

/**
 * One named parameter: its views into the flat buffers of {@link Parameters} once they are allocated.
 * {@link #value()} is what the forward reads (model dtype), {@link #master()} the F32 copy the optimizer
 * updates (the same tensor when the model dtype is F32 or F64), {@link #grad()} the gradient.
 *
 * <p>The gradient is stale from {@link Parameters#zeroGrad()} until its first write: it still holds the previous
 * step's values, because zeroing it would cost a fill and a read per element. Code that writes a gradient goes
 * through {@link #gradBeta()} or {@link #definedGrad()}; code that reads one calls {@link Parameters#finishGrads()}
 * (or {@link #definedGrad()}) first.
 */
public final class Parameter {
    private final String name;
    private final Shape shape;
    private final Init init;
    private final boolean decay;
    private final ExpertShard shard;
    final long index;
    Tensor value, master, grad;
    boolean gradStale;   // nothing written to grad since zeroGrad: it holds the previous step's values

    Parameter(String name, Shape shape, Init init, boolean decay, long index, ExpertShard shard) {
        this.name = name;
        this.shape = shape;
        this.init = init;
        this.decay = decay;
        this.index = index;
        this.shard = shard;
    }

    public String name() { return name; }

    public Shape shape() { return shape; }

    public Init init() { return init; }

    /** Whether AdamW's weight decay applies (matrices yes; biases, norms and embeddings by GPT-2 convention no). */
    public boolean decay() { return decay; }

    /**
     * For the routed experts of an MoE layer: which rows of the layer's whole [E, ...] expert tensor this rank
     * holds and the layer's expert-parallel degree; null for every other parameter (replicated on all ranks).
     */
    public ExpertShard expertShard() { return shard; }

    /** True for expert parameters (gradients all-reduced in the expert-data-parallel group). */
    public boolean isExpert() { return shard != null; }

    public Tensor value() { return check(value); }

    public Tensor master() { return check(master); }

    /** The gradient tensor; stale between {@link Parameters#zeroGrad()} and the first write (see the class comment). */
    public Tensor grad() { return check(grad); }

    /**
     * The beta of a gradient write {@code grad = beta * grad + contribution} (a GEMM or sumRows epilogue), issued
     * right after this call: 0 for the first write since {@link Parameters#zeroGrad()}, which overwrites the stale
     * values without reading them, else 1 (further micro-batches, a parameter used twice). Marks the gradient written.
     */
    public float gradBeta() {
        check(grad);
        float beta = gradStale ? 0f : 1f;
        gradStale = false;
        return beta;
    }

    /**
     * The gradient with no stale values: zero-filled first if nothing has written it since
     * {@link Parameters#zeroGrad()} (it then counts as written). For ops that can only add into a gradient
     * (scatter-add, LayerNorm's dgamma/dbeta) and for code that reads gradients.
     */
    public Tensor definedGrad() {
        Tensor g = check(grad);
        if (gradStale) {
            g.backend().fill(g, 0);
            gradStale = false;
        }
        return g;
    }

    private Tensor check(Tensor t) {
        if (t == null) throw new IllegalStateException("parameter " + name + " is not allocated yet: call Parameters.allocate() after building the model");
        return t;
    }

    @Override public String toString() { return name + shape; }
}
