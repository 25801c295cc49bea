package dev.moe4j.core.nn;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Scope;
import dev.moe4j.core.tensor.Shape;
import dev.moe4j.core.tensor.Tensor;

import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * All parameters of a model in one allocation (llm.c's {@code malloc_and_point_parameters}): layers declare
 * their parameters while the model is built, then {@link #allocate} carves one flat master buffer, one flat
 * gradient buffer (same layout; fp32, or bf16 on request) and, for bf16 models, one flat model-dtype copy into views. Parameters with
 * weight decay come first, so the optimizer runs two fused AdamW calls over two contiguous ranges.
 */
public final class Parameters implements AutoCloseable {
    private final Map<String, Parameter> byName = new LinkedHashMap<>();
    private Tensor master, grad, value;
    private long decayCount, total;

    /** Declares a parameter; names must be unique. Call before {@link #allocate}. */
    public Parameter add(String name, Init init, boolean decay, int... shape) {
        return add(name, init, decay, null, shape);
    }

    /**
     * Declares a parameter that holds rows [shard.firstRow, + shape[0]) of an expert tensor of shard.globalRows
     * rows (shard null: an ordinary parameter). A shard is initialised with exactly the values those rows get in
     * the whole tensor, so a model has the same initial weights at every expert-parallel degree.
     */
    public Parameter add(String name, Init init, boolean decay, ExpertShard shard, int... shape) {
        if (master != null) throw new IllegalStateException("parameters already allocated; cannot add " + name);
        if (byName.containsKey(name)) throw new IllegalArgumentException("duplicate parameter name " + name);
        if (shard != null && (shape.length == 0 || shape[0] != shard.rows())) {
            throw new IllegalArgumentException("parameter " + name + ": shape " + java.util.Arrays.toString(shape) + " must have "
                    + shard.rows() + " rows in its first dimension (the expert shard " + shard + ")");
        }
        Parameter p = new Parameter(name, Shape.of(shape), init, decay, byName.size(), shard);
        byName.put(name, p);
        return p;
    }

    public boolean isAllocated() { return master != null; }

    /** The dtype of the master weights of a model of {@code dtype}: F32, or F64 in the float64 reference mode. */
    public static DType masterDType(DType dtype) { return dtype == DType.F64 ? DType.F64 : DType.F32; }

    /** Throws unless gradients of {@code gradDType} fit a model of {@code dtype}: its master dtype, or BF16 for a BF16 model. */
    public static void checkGradDType(DType dtype, DType gradDType) {
        DType master = masterDType(dtype);
        if (gradDType != master && !(gradDType == DType.BF16 && dtype == DType.BF16)) {
            throw new IllegalArgumentException("gradient dtype " + gradDType + " does not fit model dtype " + dtype + ": allowed are " + master
                    + (dtype == DType.BF16 ? " and BF16" : ", or BF16 with a BF16 model"));
        }
    }

    /**
     * Allocates the flat buffers on {@code backend} and initialises every parameter from (seed, its index),
     * so the initial weights do not depend on the backend. The master buffer is F32 (F64 when {@code dtype} is
     * F64), the gradient buffer {@code gradDType} (see {@link #checkGradDType}); the forward reads a
     * {@code dtype} copy when dtype is BF16.
     */
    public void allocate(Backend backend, DType dtype, DType gradDType, long seed) {
        if (master != null) throw new IllegalStateException("parameters already allocated");
        if (!dtype.isFloating()) throw new IllegalArgumentException("model dtype must be floating, got " + dtype);
        checkGradDType(dtype, gradDType);
        DType masterType = masterDType(dtype);
        List<Parameter> order = ordered();
        total = 0;
        decayCount = 0;
        for (Parameter p : order) {
            total += p.shape().numel();
            if (p.decay()) decayCount += p.shape().numel();
        }
        int[] flat = flatShape(total);
        master = Scope.keep(backend.zeros(masterType, flat));
        grad = Scope.keep(backend.zeros(gradDType, flat));
        value = dtype == masterType ? master : Scope.keep(backend.zeros(dtype, flat));
        long at = 0;
        for (Parameter p : order) {
            int[] dims = p.shape().dims();
            p.master = master.view(at, dims);
            p.grad = grad.view(at, dims);
            p.value = value.view(at, dims);
            switch (p.init().kind()) {
                case ZEROS -> backend.fill(p.master, 0);
                case ONES -> backend.fill(p.master, 1);
                case NORMAL -> backend.randomNormal(p.master, 0, p.init().std(), seed, (p.index << 40) + initOffset(p));
            }
            at += p.shape().numel();
        }
        if (value != master) backend.copy(master, value);
    }

    /**
     * The shape of a flat buffer of {@code n} elements: [n] while that fits an int dimension, else
     * [ceil(n / 2^20), 2^20] (zero padding at the end), so models past 2^31 parameters still get one allocation.
     */
    public static int[] flatShape(long n) {
        if (n <= Integer.MAX_VALUE - 8) return new int[] {(int) n};
        int cols = 1 << 20;
        return new int[] {Math.toIntExact((n + cols - 1) / cols), cols};
    }

    /** A shard's first element in the whole expert tensor: its counters continue the whole tensor's. */
    private static long initOffset(Parameter p) {
        ExpertShard s = p.expertShard();
        if (s == null || p.shape().dims()[0] == 0) return 0;
        return (long) s.firstRow() * (p.shape().numel() / p.shape().dims()[0]);
    }

    /**
     * Decayed parameters first; within each of the two, the replicated parameters in declaration order, then the
     * expert parameters grouped by expert-parallel degree (ascending), so each gradient group (data-parallel, or
     * expert-data-parallel of one degree) is a few contiguous ranges of the flat buffer.
     */
    private List<Parameter> ordered() {
        List<Parameter> order = new ArrayList<>();
        for (boolean decay : new boolean[] {true, false}) {
            List<Parameter> experts = new ArrayList<>();
            for (Parameter p : byName.values()) {
                if (p.decay() != decay) continue;
                if (p.isExpert()) experts.add(p);
                else order.add(p);
            }
            experts.sort(java.util.Comparator.comparingInt(p -> p.expertShard().epSize()));  // stable: declaration order within a degree
            order.addAll(experts);
        }
        return order;
    }

    /** Parameters in the order of the flat buffers (see {@link #allocate}). */
    public List<Parameter> layoutOrder() {
        if (master == null) throw new IllegalStateException("parameters are not allocated yet");
        return Collections.unmodifiableList(ordered());
    }

    public Parameter get(String name) {
        Parameter p = byName.get(name);
        if (p == null) throw new IllegalArgumentException("no parameter named " + name);
        return p;
    }

    /** Parameters in declaration order. */
    public List<Parameter> all() { return Collections.unmodifiableList(new ArrayList<>(byName.values())); }

    /** Total element count. */
    public long count() { return total; }

    /** Elements [0, decayCount()) of the flat buffers get weight decay, the rest none. */
    public long decayCount() { return decayCount; }

    /** The flat F32 (or F64) master weights (elements past {@link #count()} are padding, always zero). */
    public Tensor master() { return master; }

    /** The flat gradients (F32 or BF16, see {@link #allocate}), same layout as {@link #master()}; call {@link #finishGrads()} before reading them. */
    public Tensor grad() { return grad; }

    /** The flat weights the forward reads (== master unless the model dtype differs). */
    public Tensor value() { return value; }

    /**
     * Starts a new gradient (before a step's first micro-batch): marks every gradient stale instead of filling
     * the buffer with zeros, so the first write of each overwrites it (see {@link Parameter#gradBeta()}) and a
     * large MoE model saves a fill and a read of every gradient element per step.
     */
    public void zeroGrad() {
        if (master == null) throw new IllegalStateException("parameters are not allocated yet");
        for (Parameter p : byName.values()) p.gradStale = true;
    }

    /**
     * Makes every gradient defined: the ones nothing wrote since {@link #zeroGrad()} (an expert layer that got no
     * tokens, an unused parameter) become zero. Whatever reads gradients (the optimizer, the norm, the all-reduce)
     * calls this first.
     */
    public void finishGrads() {
        for (Parameter p : byName.values()) p.definedGrad();
    }

    @Override
    public void close() {
        if (value != null && value != master) value.close();
        if (master != null) master.close();
        if (grad != null) grad.close();
    }
}
