package dev.moe4j.core.nn;

import dev.moe4j.core.tensor.Shape;
import dev.moe4j.core.tensor.Tensor;

/**
 * One named parameter: its views into the flat buffers of {@link Parameters} once they are allocated.
 * {@link #value()} is what the forward reads (model dtype), {@link #master()} the F32 copy the optimizer
 * updates (the same tensor when the model dtype is F32 or F64), {@link #grad()} the gradient (accumulated).
 */
public final class Parameter {
    private final String name;
    private final Shape shape;
    private final Init init;
    private final boolean decay;
    private final ExpertShard shard;
    final long index;
    Tensor value, master, grad;

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

    public Tensor grad() { return check(grad); }

    private Tensor check(Tensor t) {
        if (t == null) throw new IllegalStateException("parameter " + name + " is not allocated yet: call Parameters.allocate() after building the model");
        return t;
    }

    @Override public String toString() { return name + shape; }
}
