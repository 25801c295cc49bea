package dev.moe4j.core.moe;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.backend.GateOutputs;
import dev.moe4j.core.backend.GateSpec;
import dev.moe4j.core.nn.Init;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.nn.Parameter;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.SavedTensors;
import dev.moe4j.core.tensor.Tensor;


/**
 * The MoE gate (DeepSpeed's TopKGate): a bias-free linear hidden -&gt; E computed in fp32 whatever the model
 * dtype (F64 in the float64 reference mode), Jitter noise on its input in training, then the fused
 * {@link Backend#moeGate} (softmax, top-k, capacity slots, drops, combine weights, counts, l_aux, z-loss).
 *
 * <p>It reads and accumulates into the fp32 master copy of its weight, so a bf16 model still gates in fp32.
 */
public final class Gate implements AutoCloseable {
    /** DeepSpeed's multiplicative_jitter epsilon. */
    public static final double JITTER_EPS = 1e-2;

    private final ModelContext ctx;
    private final Backend b;
    private final int hidden, experts;
    private final NoisyGatePolicy policy;
    private final Parameter weight;   // [E, M]
    private final DType gdt;

    // saved by forward for backward; xg is the caller's x itself when there is no jitter (not owned, not closed here)
    private final SavedTensors saved = new SavedTensors();
    private Tensor xg, noise, logits, dlogits;
    private GateSpec spec;
    private GateOutputs out;

    public Gate(ModelContext ctx, String name, int hidden, int experts, NoisyGatePolicy policy, double initStd) {
        this.ctx = ctx;
        this.b = ctx.backend();
        this.hidden = hidden;
        this.experts = experts;
        this.policy = policy;
        this.gdt = ctx.dtype() == DType.F64 ? DType.F64 : DType.F32;
        this.weight = ctx.params().add(name + ".weight", Init.normal(initStd), true, experts, hidden);
    }

    public Parameter weight() { return weight; }

    /** The dtype the gate computes in: F32, or F64 in the float64 reference mode. */
    public DType dtype() { return gdt; }

    /**
     * x [S, M] (model dtype) -&gt; routing for S tokens. {@code capacity <= 0}: dropless. The spec's RNG
     * counters are reserved from the context's stream here.
     */
    public GateOutputs forward(Tensor x, int k, int capacity, boolean useRts, boolean rsample, boolean secondSampling) {
        release();
        int S = x.rows();
        if (x.cols() != hidden) throw new IllegalArgumentException("Gate: x is " + x.shape() + ", expected last dimension hiddenSize = " + hidden);
        // xg [S,M]: x, or in training with jitter an fp32 copy times the noise. The product below is fp32 either
        // way: the backend computes a bf16 x times the fp32 weight in fp32 (Backend#matmul).
        noise = null;
        if (policy == NoisyGatePolicy.JITTER && ctx.training()) {
            xg = saved.keep(b.empty(gdt, S, hidden));
            b.copy(x, xg);
            noise = saved.keep(b.empty(gdt, S, hidden));
            b.randomUniform(noise, 1 - JITTER_EPS, 1 + JITTER_EPS, ctx.seed(), ctx.nextRandomOffset((long) S * hidden));
            b.mul(xg, noise, xg);
        } else {
            xg = x;
        }
        // logits [S,E] = xg [S,M] * W^T [M,E], then the routing
        logits = saved.keep(b.empty(gdt, S, experts));
        GateSpec probe = new GateSpec(k, capacity, useRts, rsample, secondSampling, ctx.seed(), 0);
        spec = new GateSpec(k, capacity, useRts, rsample, secondSampling, ctx.seed(),
                ctx.nextRandomOffset(probe.randomCount(S, experts)));
        out = newOutputs(S, k);
        b.moeGateLinear(spec, xg, weight.master(), logits, out);
        return out;
    }

    /**
     * The last (dropless) forward's routing in the capacity layout with capacity C = at least its largest expert count:
     * the same choices and combine weights, nothing dropped, every expert an equal (padded) segment of C rows, as a
     * forward with capacity C would route ({@link Backend#moeGatePad}: the destinations remapped, not routed again).
     * The outputs it returns replace the forward's.
     */
    public GateOutputs pad(int capacity) {
        if (out == null) throw new IllegalStateException("Gate.pad called before forward");
        if (!spec.dropless()) throw new IllegalStateException("Gate.pad: the forward routed with capacity " + spec.capacity() + ", not dropless");
        if (capacity < 1) throw new IllegalArgumentException("Gate.pad: capacity must be >= 1, got " + capacity);
        int S = logits.rows();
        Tensor dest = saved.keep(b.empty(DType.I32, S, spec.k())), offsets = saved.keep(b.empty(DType.I32, experts + 1));
        b.moeGatePad(out, capacity, dest, offsets);
        spec = new GateSpec(spec.k(), capacity, spec.useRts(), spec.rsample(), spec.secondSampling(), spec.seed(), spec.offset());
        out = new GateOutputs(out.gates(), out.experts(), dest, out.weights(), out.counts(), offsets, out.losses());
        return out;
    }

    private GateOutputs newOutputs(int S, int k) {
        return new GateOutputs(
                saved.keep(b.empty(gdt, S, experts)),
                saved.keep(b.empty(DType.I32, S, k)),
                saved.keep(b.empty(DType.I32, S, k)),
                saved.keep(b.empty(gdt, S, k)),
                saved.keep(b.empty(DType.I32, experts)),
                saved.keep(b.empty(DType.I32, experts + 1)),
                saved.keep(b.empty(gdt, 2)));
    }

    /** The last forward's outputs (valid until the next forward). */
    public GateOutputs outputs() { return out; }

    public GateSpec spec() { return spec; }

    public Tensor logits() { return logits; }

    /**
     * The first half of the backward, from dweights [S,k] (the gradient of the combine weights): the logits'
     * gradient (kept for {@link #addInputGrad}) and the gate weight's gradient (accumulated). x must be unchanged
     * since the forward. The loss the gradient is of: f(weights) + lauxCoeff * l_aux + zlossCoeff * z-loss.
     */
    public void backward(Tensor dweights, float lauxCoeff, float zlossCoeff) {
        if (out == null) throw new IllegalStateException("Gate.backward called before forward");
        int S = logits.rows();
        if (dlogits != null) dlogits.close();
        dlogits = b.empty(gdt, S, experts);
        b.moeGateBackward(spec, logits, out, dweights, lauxCoeff, zlossCoeff, dlogits);
        // dW [E,M] += dlogits^T [E,S] * xg [S,M]
        b.matmul(dlogits, true, xg, false, weight.grad(), 1f, weight.gradBeta());
    }

    /**
     * The second half: dx [S,M] (the caller's input gradient, any float dtype) += the gate input's gradient,
     * dlogits [S,E] * W [E,M] computed in fp32 (through the jitter: times the noise).
     */
    public void addInputGrad(Tensor dx) {
        if (dlogits == null) throw new IllegalStateException("Gate.addInputGrad called before Gate.backward");
        if (noise == null) {
            b.matmul(dlogits, false, weight.master(), false, dx, 1f, 1f);
        } else {
            try (Tensor dxg = b.empty(gdt, dlogits.rows(), hidden)) {
                b.matmul(dlogits, false, weight.master(), false, dxg, 1f, 0f);
                b.mul(dxg, noise, dxg);
                b.add(dx, 1, dxg, 1, dx);
            }
        }
        dlogits.close();
        dlogits = null;
    }

    private void release() {
        saved.close();
        if (dlogits != null) dlogits.close();
        dlogits = null;
        xg = null;
        out = null;
    }

    @Override
    public void close() { release(); }
}
