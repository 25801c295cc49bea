package dev.moe4j.core.nn;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.DType;

/**
 * What every layer of one model shares: the backend, the activation dtype, the parameter store, the
 * training flag and the counter-based RNG stream (noise, random token selection).
 */
public final class ModelContext {
    private final Backend backend;
    private final DType dtype;
    private DType gradDType;
    private final Parameters params = new Parameters();
    private final long seed;
    private long rngOffset;
    /** Evaluation draws come from their own counter range, so how often a run validates never changes training. */
    private static final long EVAL_RNG_BASE = 1L << 62;
    private long evalRngOffset = EVAL_RNG_BASE;
    private boolean training = true;

    public ModelContext(Backend backend, DType dtype, long seed) {
        if (!backend.supports(dtype)) throw new IllegalArgumentException("backend " + backend.name() + " does not support dtype " + dtype);
        this.backend = backend;
        this.dtype = dtype;
        this.gradDType = Parameters.masterDType(dtype);
        this.seed = seed;
    }

    public Backend backend() { return backend; }

    /** The dtype of weights and activations the forward reads and writes (F32/BF16, F64 for gradient checks). */
    public DType dtype() { return dtype; }

    public Parameters params() { return params; }

    /** The dtype of the flat gradient buffer: the master dtype (F32; F64 in the reference mode) unless set. */
    public DType gradDType() { return gradDType; }

    /**
     * Stores the gradients in {@code gradDType} (before {@link #allocateParameters()}): the master dtype, or BF16
     * when the model dtype is BF16, which halves the gradient memory and traffic (Megatron's and DeepSpeed's bf16
     * gradient option; the optimizer still updates in fp32).
     */
    public void setGradDType(DType gradDType) {
        if (params.isAllocated()) throw new IllegalStateException("set the gradient dtype before allocating the parameters");
        Parameters.checkGradDType(dtype, gradDType);
        this.gradDType = gradDType;
    }

    public long seed() { return seed; }

    public boolean training() { return training; }

    /**
     * Switches between training and evaluation. Entering evaluation restarts the evaluation random stream, so an
     * evaluation pass draws the same numbers whenever it runs and takes none from the training stream.
     */
    public void setTraining(boolean training) {
        if (!training && this.training) evalRngOffset = EVAL_RNG_BASE;
        this.training = training;
    }

    /** Reserves {@code count} random numbers and returns the counter offset of the first. */
    public long nextRandomOffset(long count) {
        if (!training) {
            long o = evalRngOffset;
            evalRngOffset += count;
            return o;
        }
        long o = rngOffset;
        rngOffset += count;
        return o;
    }

    /**
     * The RNG position of the current mode's stream (training: the one saved in checkpoints, so a resumed run
     * draws the same numbers; evaluation: the evaluation stream).
     */
    public long rngOffset() { return training ? rngOffset : evalRngOffset; }

    /** Sets the RNG position of the current mode's stream (see {@link #rngOffset()}). */
    public void setRngOffset(long offset) {
        if (training) rngOffset = offset;
        else evalRngOffset = offset;
    }

    /** Allocates and initialises all declared parameters (call once the model is built). */
    public void allocateParameters() { params.allocate(backend, dtype, gradDType, seed); }
}
