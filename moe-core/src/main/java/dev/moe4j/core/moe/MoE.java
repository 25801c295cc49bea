package dev.moe4j.core.moe;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.backend.GateOutputs;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.nn.ExpertShard;
import dev.moe4j.core.nn.FeedForward;
import dev.moe4j.core.nn.Init;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.nn.Parameter;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.SavedTensors;
import dev.moe4j.core.tensor.Tensor;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;

/**
 * A Mixture-of-Experts FFN layer with DeepSpeed's semantics ({@code deepspeed.moe.layer.MoE}): an fp32 gate,
 * index-based dispatch into an expert-sorted buffer, the experts as grouped GEMMs, a weighted index-based
 * combine; optionally Residual-MoE (a dense MLP mixed in by a learned softmax coefficient), always-on shared
 * experts (DeepSeekMoE) and a dropless mode that never pads to capacity.
 *
 * <p>Use: {@code forward(x [S, M])} with S = B*T tokens, then {@code backward(dout [S, M], auxLossCoeff)}.
 * The forward saves what the backward needs (x must stay unchanged until then); one forward, one backward.
 *
 * <pre>
 * MoE moe = MoE.builder().setContext(ctx).setHiddenSize(768).setFfnSize(3072)
 *         .optNumExperts(16).optK(2).optName("h.1.moe").build();
 * </pre>
 *
 * <p>Capacity per expert: C = max(ceil(S / E * cf * k), minCapacity), capped at S (no expert can get more),
 * cf = capacityFactor in training and evalCapacityFactor otherwise. {@code dropTokens = false} and
 * {@code dropless = true} both take the dropless path: every choice is kept, and the buffer holds either exactly
 * S*k rows sorted by expert or, as DeepSpeed lays it out, every expert padded to the largest expert's load (the
 * output is the same; {@link DroplessLayout} says which is used where).
 *
 * <p>Differences from DeepSpeed, all deliberate: noise (Jitter, RSample, second-expert sampling) is applied in
 * training only (DeepSpeed samples the second expert in eval too); RSample applies to the first choice for any
 * k (DeepSpeed: top-1 only); RTS is used for k = 1 only, as in DeepSpeed; l_aux is E * sum_e me_e * ce_e with
 * ce from the first choices for every k (DeepSpeed's top-1 and top-2 formulas; its top-k &gt; 2 differs).
 *
 * <p>Expert parallelism ({@code epSize > 1}, with {@link Builder#optExpertParallelGroup}): rank q of the group holds
 * experts [q*E/epSize, (q+1)*E/epSize) (parameters {@code NAME.experts.*} of E/epSize rows, initialised as those
 * rows of the whole tensor). The gate runs on the rank's own S tokens over all E experts, with the capacity of S
 * tokens (DeepSpeed: capacity is per rank) and a local l_aux; the expert-sorted buffer travels to the experts'
 * owners by all-to-all, the local experts run as one grouped GEMM over what they received from every rank, and the
 * results come back by the reverse all-to-all ({@link ExpertParallel}). Capacity mode exchanges equal splits and
 * needs no count; dropless mode (and {@code dropTokens = false}, which routes dropless: the output equals
 * DeepSpeed's padding to the group's largest load, without the padding or its max-reduce) all-gathers the
 * per-expert counts once per layer. The communicator decides flat or hierarchical all-to-all.
 */
public final class MoE implements AutoCloseable {
    private final ModelContext ctx;
    private final Backend b;
    private final Config cfg;
    private final Gate gate;
    private final ExpertBank experts;
    private final ExpertBank mlp;        // Residual-MoE's dense MLP, or null
    private final Parameter coefW, coefB; // Residual-MoE's Linear(hidden, 2)
    private final ExpertBank shared;     // always-on shared experts as one dense FFN, or null
    private final Communicator ep;       // the expert-parallel group (epSize > 1), or null
    private ExpertParallel.Route route;  // the last forward's expert-parallel routing (epSize > 1)
    private ExpertParallel.Windows windows;   // the peer windows of this layer (epSize > 1 and peerExchange), or null

    // saved by forward
    private final SavedTensors saved = new SavedTensors();
    private Tensor x, y, rowExpert, stack, coef, resDest;
    private int capacity, tokens;
    private int slots;   // rows per expert in buf (0: dropless, sorted by expert)
    private MoEOutput last;

    private MoE(ModelContext ctx, Config c, Communicator ep) {
        this.ctx = ctx;
        this.b = ctx.backend();
        this.cfg = c;
        this.ep = c.epSize > 1 ? ep : null;
        this.windows = this.ep != null && c.peerExchange ? new ExpertParallel.Windows() : null;
        String n = c.name;
        this.gate = new Gate(ctx, n + ".gate", c.hiddenSize, c.numExperts, c.noisyGatePolicy, c.initStd);
        int local = c.numExperts / c.epSize, first = this.ep == null ? 0 : this.ep.rank() * local;
        this.experts = new ExpertBank(ctx, n + ".experts", local, c.hiddenSize, c.ffnSize,
                c.activation, c.expertBias, c.initStd, c.outputInitStd, new ExpertShard(c.epSize, first, local, c.numExperts));
        if (c.useResidual) {
            this.mlp = new ExpertBank(ctx, n + ".mlp", 1, c.hiddenSize, c.ffnSize, c.activation, c.expertBias, c.initStd, c.outputInitStd);
            this.coefW = ctx.params().add(n + ".coefficient.weight", Init.normal(c.initStd), true, 2, c.hiddenSize);
            this.coefB = ctx.params().add(n + ".coefficient.bias", Init.zeros(), false, 2);
        } else {
            this.mlp = null;
            this.coefW = null;
            this.coefB = null;
        }
        // n shared experts of FFN size F_s are one FFN of size n * F_s (each hidden unit is independent)
        this.shared = c.sharedExperts > 0
                ? new ExpertBank(ctx, n + ".shared", 1, c.hiddenSize, c.sharedExperts * c.sharedFfnSize, c.activation, c.expertBias, c.initStd, c.outputInitStd)
                : null;
    }

    public static Builder builder() { return new Builder(); }

    /** The configuration this layer was built with. */
    public Config config() { return cfg; }

    public Gate gate() { return gate; }

    /** The routed experts held by this rank: experts [rank * E/epSize, (rank + 1) * E/epSize) of the layer. */
    public ExpertBank experts() { return experts; }

    /** The expert-parallel group (null when epSize = 1). */
    public Communicator expertParallelGroup() { return ep; }

    /** Residual-MoE's dense MLP, or null. */
    public ExpertBank mlp() { return mlp; }

    /** The shared experts (one dense FFN of sharedExperts * sharedFfnSize), or null. */
    public ExpertBank shared() { return shared; }

    /** Capacity per expert for S tokens in the current mode (training or eval); 0 when dropless. */
    public int capacity(int s) {
        if (cfg.dropless()) return 0;
        int e = cfg.numExperts, k = cfg.k;
        double cf = ctx.training() ? cfg.capacityFactor : cfg.evalCapacityFactor;
        long c = (long) Math.ceil(((double) s / e) * (cf * k));
        c = Math.max(c, cfg.minCapacity);
        return (int) Math.max(1, Math.min(c, s));
    }

    /**
     * x [S, M] (model dtype) -&gt; output [S, M], l_aux, z-loss, expert counts.
     */
    public MoEOutput forward(Tensor x) {
        release();
        if (x.cols() != cfg.hiddenSize) throw new IllegalArgumentException("MoE " + cfg.name + ": x is " + x.shape() + ", expected last dimension hiddenSize = " + cfg.hiddenSize);
        int S = x.rows(), M = cfg.hiddenSize, E = cfg.numExperts, k = cfg.k;
        if (S == 0) throw new IllegalArgumentException("MoE " + cfg.name + ": x has no tokens");
        this.x = x;
        this.tokens = S;
        boolean train = ctx.training();
        capacity = capacity(S);
        boolean dropless = capacity <= 0;

        // gate: routing of S tokens (fp32)
        GateOutputs g = gate.forward(x, k, capacity, cfg.useRts && k == 1 && !dropless,
                train && cfg.noisyGatePolicy == NoisyGatePolicy.RSAMPLE,
                train && k > 1 && cfg.top2SecondExpertSampling);

        // Dropless in the capacity layout: capacity = the largest expert count, nothing is dropped and every expert owns
        // an equal segment, which backends that prefer equal groups run much faster.
        int slots = capacity;   // rows per expert in buf; 0: dropless, sorted by expert, unpadded
        int[] counts = null;    // on the host only where the layout decision needs them
        if (dropless && ep == null && padsDropless(cfg.droplessLayout, b, ctx.dtype(), E, 0, S * k)) {
            counts = g.counts().toInts();   // the one wait of a dropless layer (its offsets would be read anyway)
            int most = Arrays.stream(counts).max().orElse(0);
            if (padsDropless(cfg.droplessLayout, b, ctx.dtype(), E, (long) E * most, S * k)) {
                slots = most;
                g = gate.pad(slots);
            }
        }

        // dispatch: buf [R, M], R = E*C (slot e*C + c) or S*k (dropless, sorted by expert); the counts form writes every
        // row (unused capacity and padding rows 0), so buf needs no zero fill
        int R = slots > 0 ? E * slots : S * k;
        this.slots = slots;
        if (ep != null) {
            // expert parallelism: buf's rows go to the ranks owning their experts and y comes back in buf's layout
            if (route == null || !route.reusableFor(dropless ? 0 : capacity)) {
                if (route != null) route.close();
                route = ExpertParallel.route(ep, g, cfg.numExperts, dropless ? 0 : capacity, cfg.overlapAllToAll, cfg.droplessLayout, ctx.dtype(),
                        windows, M, experts.hasBias());
            }
            GateOutputs routed = g;
            // through peer windows the dispatch stores each row straight into its owner's window: no buf
            y = saved.keep(ExpertParallel.forward(ep, route, experts, R, M, ctx.dtype(), new ExpertParallel.Rows() {
                @Override
                public void into(Tensor buf) { b.moePermute(x, routed.dest(), routed.counts(), MoE.this.slots, buf); }

                @Override
                public void to(Tensor rowDest, Tensor[] dsts) { b.moePermuteTo(x, routed.dest(), routed.counts(), MoE.this.slots, rowDest, dsts); }
            }));
        } else {
            Tensor buf = saved.keep(b.empty(ctx.dtype(), R, M));
            b.moePermute(x, g.dest(), g.counts(), slots, buf);
            if (experts.hasBias()) rowExpert = saved.keep(rowExperts(g, S, k, R));
            // experts: y [R, M]
            // The expert offsets on the host, for backends whose grouped GEMMs need them there. Capacity mode:
            // expert e owns slots e*C .. (e+1)*C, known without asking the device. Dropless: one read for the
            // layer's six GEMMs (each would otherwise read them itself, waiting for the stream each time), and
            // none where the backend reads them on the device.
            int[] hostOffsets = null;
            if (slots > 0) {
                hostOffsets = new int[E + 1];
                for (int e = 0; e <= E; e++) hostOffsets[e] = e * slots;
            } else if (counts != null) {
                hostOffsets = new int[E + 1];
                for (int e = 0; e < E; e++) hostOffsets[e + 1] = hostOffsets[e] + counts[e];
            } else if (b.wantsHostOffsets(ctx.dtype(), R, E)) {
                hostOffsets = g.offsets().toInts();
            }
            y = saved.keep(experts.forward(buf, g.offsets(), hostOffsets, rowExpert));
        }

        // combine: moeOut [S, M] = sum_j weights[s,j] * y[dest[s,j]]
        Tensor out;
        if (cfg.useResidual) {
            // stack [2S, M] = [moe(x); mlp(x)], out[s] = coef[s,0] * stack[s] + coef[s,1] * stack[S+s]
            stack = saved.keep(b.empty(ctx.dtype(), 2 * S, M));
            b.moeUnpermute(y, g.dest(), g.weights(), stack.rowSlice(0, S));
            try (Tensor m = mlp.forward(x, null, null)) {
                b.copy(m, stack.rowSlice(S, S));
            }
            // coef [S, 2] = softmax(x [S,M] * Wc^T [M,2] + bc)
            Tensor cl = saved.keep(b.empty(ctx.dtype(), S, 2));
            b.matmul(x, false, coefW.value(), true, cl, 1f, 0f);
            b.addBias(cl, coefB.value(), cl);
            coef = saved.keep(b.empty(ctx.dtype(), S, 2));
            b.softmax(cl, coef);
            int[] rd = new int[2 * S];
            for (int s = 0; s < S; s++) { rd[2 * s] = s; rd[2 * s + 1] = S + s; }
            resDest = saved.keep(b.fromInts(rd, S, 2));
            out = b.empty(ctx.dtype(), S, M);
            b.moeUnpermute(stack, resDest, coef, out);
        } else {
            out = b.empty(ctx.dtype(), S, M);
            b.moeUnpermute(y, g.dest(), g.weights(), out);
        }
        if (shared != null) {
            try (Tensor sh = shared.forward(x, null, null)) {
                b.add(out, 1, sh, 1, out);
            }
        }
        last = new MoEOutput(out, g.losses().view(0, 1), g.losses().view(1, 1), g.counts());
        return last;
    }

    /** AUTO's padding bound: the padded rows may be at most this many times the routed rows. */
    static final double MAX_DROPLESS_PADDING = 2.0;

    /**
     * The padding a dropless layout allows, as {@link dev.moe4j.core.backend.ExpertLayout}'s maxPadding (padded rows
     * at most this many times the routed rows): SORTED 0 (never), PADDED unbounded, AUTO {@link #MAX_DROPLESS_PADDING}
     * where the backend prefers equal groups for the dtype and the shape (about rows routed rows over groups experts),
     * else 0.
     */
    static double maxPadding(DroplessLayout layout, Backend b, DType dtype, int groups, long rows) {
        return switch (layout) {
            case SORTED -> 0;
            case PADDED -> Double.POSITIVE_INFINITY;
            case AUTO -> b.prefersEqualGroups(dtype, rows, groups) ? MAX_DROPLESS_PADDING : 0;
        };
    }

    /**
     * Whether a dropless layout pads {@code rows} routed rows of {@code groups} experts to {@code paddedRows} (experts
     * times the largest count; 0 while the counts are not known yet: whether it may pad at all): SORTED never, PADDED
     * always, AUTO where the backend prefers equal groups for the dtype and shape and the padding stays within
     * {@link #MAX_DROPLESS_PADDING}.
     */
    static boolean padsDropless(DroplessLayout layout, Backend b, DType dtype, int groups, long paddedRows, long rows) {
        return dev.moe4j.core.backend.ExpertLayout.pads(maxPadding(layout, b, dtype, groups, rows), paddedRows, rows);
    }

    /** rowExpert [R] I32: the expert each buffer row belongs to (0 for unused rows), by dispatching the choices. */
    private Tensor rowExperts(GateOutputs g, int S, int k, int R) {
        try (Tensor ef = b.empty(DType.F32, S * k, 1); Tensor rf = b.zeros(DType.F32, R, 1)) {
            b.copy(g.experts(), ef);
            b.moePermute(ef, g.dest().reshape(S * k, 1), rf);
            Tensor re = b.empty(DType.I32, R);
            b.copy(rf, re);
            return re;
        }
    }

    /**
     * dout [S, M] -&gt; dx [S, M] (returned, assigned); accumulates every parameter gradient.
     *
     * @param auxLossCoeff the coefficient of this layer's l_aux in the loss (the model's auxLossCoeff, times any
     *                     loss scaling the caller applies to dout). The z-loss enters with the layer's zLossCoeff.
     */
    public Tensor backward(Tensor dout, float auxLossCoeff) {
        return backward(dout, auxLossCoeff, (float) cfg.zLossCoeff);
    }

    /**
     * dout [S, M] -&gt; dx [S, M] for loss = f(output) + auxLossCoeff * l_aux + zLossCoeff * z-loss, dout = df/doutput.
     * Gradient accumulation scales all three by the same factor: pass it in both coefficients.
     */
    public Tensor backward(Tensor dout, float auxLossCoeff, float zLossCoeff) {
        if (y == null) throw new IllegalStateException("MoE " + cfg.name + ": backward called before forward");
        int S = tokens, M = cfg.hiddenSize, k = cfg.k;
        if (dout.rows() != S || dout.cols() != M) throw new IllegalArgumentException("MoE " + cfg.name + ": dout is " + dout.shape() + ", expected [" + S + ", " + M + "]");
        GateOutputs g = gate.outputs();
        List<Tensor> tmp = new ArrayList<>();
        Tensor dxOther = null;   // the residual MLP's and the shared expert's share of dx, added at the end
        Tensor dmoe = dout;
        if (cfg.useResidual) {
            // out = coef0 * moe + coef1 * mlp: dstack rows and dcoef [S,2]
            Tensor dstack = tmpAdd(tmp, b.empty(ctx.dtype(), 2 * S, M));   // resDest addresses every row
            Tensor dcoef = tmpAdd(tmp, b.empty(ctx.dtype(), S, 2));
            b.moeUnpermuteBackward(dout, stack, resDest, coef, dstack, dcoef);
            dmoe = dstack.rowSlice(0, S);
            dxOther = tmpAdd(tmp, mlp.backward(dstack.rowSlice(S, S)));
            // softmax, then Linear(hidden, 2): dWc += dl^T x, dbc += sum dl, dx += dl Wc
            Tensor dl = tmpAdd(tmp, b.empty(ctx.dtype(), S, 2));
            b.softmaxBackward(coef, dcoef, dl);
            b.matmul(dl, true, x, false, coefW.grad(), 1f, coefW.gradBeta());
            b.sumRows(dl, coefB.grad(), coefB.gradBeta());
            b.matmul(dl, false, coefW.value(), false, dxOther, 1f, 1f);
        }
        if (shared != null) {
            Tensor dxs = tmpAdd(tmp, shared.backward(dout));
            if (dxOther == null) dxOther = dxs;
            else b.add(dxOther, 1, dxs, 1, dxOther);
        }
        // combine backward: dy rows addressed by dest, the others 0 (the counts form writes every row), and dweights
        // [S,k] in the gate dtype
        Tensor dw = tmpAdd(tmp, b.empty(gate.dtype(), S, k));
        // experts backward (with expert parallelism the gate's backward runs while dy travels to the experts),
        // then the dispatch's backward (a gather-sum with weight 1)
        Runnable gateBackward = () -> gate.backward(dw, auxLossCoeff, zLossCoeff);
        Tensor dbuf;
        Tensor dm = dmoe;
        if (ep == null) {
            Tensor dy = tmpAdd(tmp, b.empty(ctx.dtype(), y.rows(), M));
            b.moeUnpermuteBackward(dmoe, y, g.dest(), g.weights(), g.counts(), slots, dy, dw);
            dbuf = tmpAdd(tmp, experts.backward(dy));
            gateBackward.run();
        } else {
            // runs gateBackward on every path; through peer windows dy's rows are stored straight into their owners' windows
            dbuf = tmpAdd(tmp, ExpertParallel.backward(ep, route, experts, y.rows(), M, ctx.dtype(), new ExpertParallel.Rows() {
                @Override
                public void into(Tensor dy) { b.moeUnpermuteBackward(dm, y, g.dest(), g.weights(), g.counts(), slots, dy, dw); }

                @Override
                public void to(Tensor rowDest, Tensor[] dsts) {
                    b.moeUnpermuteBackwardTo(dm, y, g.dest(), g.weights(), g.counts(), slots, rowDest, dsts, dw);
                }
            }, gateBackward));
        }
        if (route != null && !route.equal) {   // a dropless routing serves one step; a capacity one is kept
            route.close();
            route = null;
        }
        Tensor dx = b.empty(ctx.dtype(), S, M);
        b.moeUnpermute(dbuf, g.dest(), null, dx);   // writes every row (0 where all choices were dropped)
        if (dxOther != null) b.add(dx, 1, dxOther, 1, dx);
        // the gate input's gradient (combine weights, l_aux, z-loss), accumulated into dx by its GEMM
        gate.addInputGrad(dx);
        for (Tensor t : tmp) t.close();
        return dx;
    }

    /**
     * This layer as a transformer block's FFN ({@link FeedForward}): forward returns the output; auxLoss() is
     * auxLossCoeff * l_aux + zLossCoeff * z-loss of the last forward; backward(dy, lossScale) scales both
     * coefficients by lossScale. The MoE statistics stay readable through this layer ({@link #lastOutput()}).
     */
    public FeedForward asFeedForward(double auxLossCoeff) {
        if (!(auxLossCoeff >= 0) || Double.isInfinite(auxLossCoeff)) throw new IllegalArgumentException("auxLossCoeff must be a finite number >= 0, got " + auxLossCoeff);
        return new FeedForward() {
            private Tensor aux;

            @Override
            public Tensor forward(Tensor x) {
                MoEOutput o = MoE.this.forward(x);
                aux = saved.keep(b.empty(o.lAux().dtype(), 1));
                b.add(o.lAux(), auxLossCoeff, o.zLoss(), cfg.zLossCoeff, aux);
                return o.output();
            }

            @Override
            public Tensor backward(Tensor dy, float lossScale) {
                return MoE.this.backward(dy, (float) (auxLossCoeff * lossScale), (float) (cfg.zLossCoeff * lossScale));
            }

            @Override
            public Tensor auxLoss() { return aux; }

            @Override
            public String toString() { return "MoE " + cfg.name + " (auxLossCoeff " + auxLossCoeff + ")"; }
        };
    }

    /** The last forward's result (its tensors valid until the next forward), or null. */
    public MoEOutput lastOutput() { return last; }

    /** The capacity of the last forward (0: dropless). */
    public int lastCapacity() { return capacity; }

    /**
     * Fraction of the last forward's S*k choices that were dropped. A host transfer: for logging, not for
     * the training step.
     */
    public double droppedFraction() {
        GateOutputs g = gate.outputs();
        if (g == null) throw new IllegalStateException("MoE " + cfg.name + ": no forward yet");
        int[] d = g.dest().toInts();
        int dropped = 0;
        for (int v : d) if (v < 0) dropped++;
        return (double) dropped / d.length;
    }

    private static Tensor tmpAdd(List<Tensor> l, Tensor t) {
        l.add(t);
        return t;
    }


    private void release() {
        saved.close();
        y = null;
        if (route != null) {
            // a capacity-mode routing is kept for the next forward (it does not depend on the tokens)
            route.releaseActivations();
            if (!route.equal) {
                route.close();
                route = null;
            }
        }
        rowExpert = null;
        stack = null;
        coef = null;
        resDest = null;
        last = null;
    }

    @Override
    public void close() {
        release();
        if (route != null) route.close();
        route = null;
        if (windows != null) windows.close();
        gate.close();
        experts.close();
        if (mlp != null) mlp.close();
        if (shared != null) shared.close();
    }

    // ------------------------------------------------------------------ configuration

    /**
     * How a dropless layer lays out its experts' rows (expert parallelism always sorts): SORTED packs the S*k
     * choices expert by expert; PADDED gives every expert the largest expert's count of rows (DeepSpeed's layout
     * with capacity = the largest load: nothing dropped, equal groups); AUTO pads where the backend prefers equal
     * groups ({@link Backend#prefersEqualGroups}) and the padding at most doubles the rows. The output is the same.
     */
    public enum DroplessLayout { AUTO, SORTED, PADDED }

    /** The validated configuration of one MoE layer (see {@link Builder} for each parameter). */
    public record Config(String name, int hiddenSize, int ffnSize, Activation activation, int numExperts, int epSize,
                         int k, double capacityFactor, double evalCapacityFactor, int minCapacity,
                         boolean useResidual, NoisyGatePolicy noisyGatePolicy, boolean dropTokens, boolean useRts,
                         boolean top2SecondExpertSampling, double zLossCoeff, boolean droplessMode,
                         int sharedExperts, int sharedFfnSize, boolean expertBias, double initStd, double outputInitStd,
                         boolean overlapAllToAll, DroplessLayout droplessLayout, boolean peerExchange) {
        /** True when the layer routes without capacity (dropless mode, or dropTokens = false). */
        public boolean dropless() { return droplessMode || !dropTokens; }
    }

    /**
     * Builds an {@link MoE}: {@code set*} are required, {@code opt*} optional with DeepSpeed's defaults.
     * {@link #build()} validates everything and names the offending parameter.
     */
    public static final class Builder {
        private ModelContext ctx;
        private int hiddenSize = -1, ffnSize = -1;
        private Activation activation = Activation.GELU;
        private int numExperts = 1, epSize = 1, k = 1, minCapacity = 4;
        private double capacityFactor = 1.0, evalCapacityFactor = 1.0;
        private boolean useResidual = false, dropTokens = true, useRts = true, top2SecondExpertSampling = true;
        private NoisyGatePolicy noisyGatePolicy = null;
        private String noisyGatePolicyText = null;
        private double zLossCoeff = 0;
        private boolean dropless = false;
        private int sharedExperts = 0, sharedFfnSize = -1;
        private boolean expertBias = true;
        private boolean overlapAllToAll;
        private boolean peerExchange = !"false".equals(System.getProperty("moe4j.ep.peerExchange"));
        private DroplessLayout droplessLayout = DroplessLayout.AUTO;
        private double initStd = 0.02, outputInitStd = Double.NaN;
        private String name = "moe";
        private Communicator epGroup;

        private Builder() {}

        /** Required: the model context (backend, dtype, parameters, training flag, RNG). */
        public Builder setContext(ModelContext ctx) { this.ctx = ctx; return this; }

        /** Required: the model width M (input and output width). */
        public Builder setHiddenSize(int hiddenSize) { this.hiddenSize = hiddenSize; return this; }

        /** Required: the expert FFN's inner width F. */
        public Builder setFfnSize(int ffnSize) { this.ffnSize = ffnSize; return this; }

        /** Expert activation (default GELU). GEGLU / SwiGLU make fc1 2F wide. */
        public Builder optActivation(Activation activation) { this.activation = activation; return this; }

        /** Total experts of the layer (default 1). */
        public Builder optNumExperts(int numExperts) { this.numExperts = numExperts; return this; }

        /**
         * Expert-parallel degree (default 1). With epSize &gt; 1 the layer holds numExperts / epSize experts and
         * needs its expert-parallel group ({@link #optExpertParallelGroup}). In capacity mode every rank of the group
         * must reach the same capacity (as in DeepSpeed: the same number of tokens per rank), since the ranks exchange
         * equal blocks of experts x capacity rows without telling each other their sizes; dropless layers exchange
         * their counts and take any number of tokens per rank.
         */
        public Builder optEpSize(int epSize) { this.epSize = epSize; return this; }

        /**
         * The expert-parallel group of epSize ranks (e.g. {@code ProcessGroups.expertParallel(epSize)}): the ranks
         * that exchange tokens by all-to-all; rank q of it holds experts [q * E/epSize, (q+1) * E/epSize).
         */
        public Builder optExpertParallelGroup(Communicator group) { this.epGroup = group; return this; }

        /** Experts per token (default 1). */
        public Builder optK(int k) { this.k = k; return this; }

        /** Training capacity factor (default 1.0). */
        public Builder optCapacityFactor(double f) { this.capacityFactor = f; return this; }

        /** Eval capacity factor (default 1.0). */
        public Builder optEvalCapacityFactor(double f) { this.evalCapacityFactor = f; return this; }

        /** Minimum capacity per expert (default 4). */
        public Builder optMinCapacity(int c) { this.minCapacity = c; return this; }

        /** Residual-MoE: output = moe(x) * c0 + mlp(x) * c1 (default false). */
        public Builder optUseResidual(boolean r) { this.useResidual = r; return this; }

        /** null (default), JITTER or RSAMPLE. */
        public Builder optNoisyGatePolicy(NoisyGatePolicy p) { this.noisyGatePolicy = p; this.noisyGatePolicyText = null; return this; }

        /** DeepSpeed's spelling: null, "None", "Jitter", "RSample"; anything else is rejected by build(). */
        public Builder optNoisyGatePolicy(String p) { this.noisyGatePolicyText = p; this.noisyGatePolicy = null; return this; }

        /** Drop tokens past capacity (default true); false routes dropless. */
        public Builder optDropTokens(boolean d) { this.dropTokens = d; return this; }

        /** Random token selection when dropping (default true; used for k = 1, as DeepSpeed). */
        public Builder optUseRts(boolean r) { this.useRts = r; return this; }

        /** Gumbel sampling of the second (and later) expert in training (default true). */
        public Builder optTop2SecondExpertSampling(boolean s) { this.top2SecondExpertSampling = s; return this; }

        /** ST-MoE router z-loss coefficient (default 0: off; ~1e-3 typical). */
        public Builder optZLossCoeff(double c) { this.zLossCoeff = c; return this; }

        /** Dropless routing: variable-size expert batches, never padded or dropped (default false). */
        public Builder optDropless(boolean d) { this.dropless = d; return this; }

        /** The row layout of dropless routing (default AUTO; see {@link DroplessLayout}). */
        public Builder optDroplessLayout(DroplessLayout layout) { this.droplessLayout = java.util.Objects.requireNonNull(layout, "droplessLayout"); return this; }

        /** DeepSeekMoE shared experts: {@code count} always-on experts of FFN width {@code ffnSize} (default none). */
        public Builder optSharedExperts(int count, int ffnSize) { this.sharedExperts = count; this.sharedFfnSize = ffnSize; return this; }

        /** Biases in the expert (and MLP) linears (default true, as Megatron's MLP). */
        public Builder optExpertBias(boolean bias) { this.expertBias = bias; return this; }

        /**
         * Expert parallelism: pipeline the exchanges with the experts in stages of local experts (each stage's
         * rows travel while the previous stage's experts run; {@code -Dmoe4j.ep.chunks}, default 2). Default
         * false: on two NVLink GPUs it measured no faster (docs/benchmarks.md, expert parallelism).
         */
        public Builder optOverlapAllToAll(boolean overlap) { this.overlapAllToAll = overlap; return this; }

        /**
         * Expert parallelism: where the group's communicator offers {@link dev.moe4j.core.comm.PeerWindow}s (ranks of
         * one node with peer access; in-process ranks) and the layer does not pipeline, its rows are stored straight
         * into the owners' and the sources' windows instead of traveling by all-to-all (default true; also
         * {@code -Dmoe4j.ep.peerExchange=false}).
         */
        public Builder optPeerExchange(boolean peer) { this.peerExchange = peer; return this; }

        /** Std of the normal init of the gate, fc1 and the residual coefficient (default 0.02). */
        public Builder optInitStd(double std) { this.initStd = std; return this; }

        /** Std of fc2's init (default initStd; GPT-2 scales it by 1/sqrt(2 * layers)). */
        public Builder optOutputInitStd(double std) { this.outputInitStd = std; return this; }

        /** Parameter name prefix (default "moe"); must be unique in the model. */
        public Builder optName(String name) { this.name = name; return this; }

        /** Validates the configuration (no context needed). */
        public Config config() {
            if (hiddenSize <= 0) throw new IllegalArgumentException("hiddenSize must be set and > 0, got " + hiddenSize);
            if (ffnSize <= 0) throw new IllegalArgumentException("ffnSize must be set and > 0, got " + ffnSize);
            if (activation == null) throw new IllegalArgumentException("activation must not be null (RELU, GELU, GEGLU or SWIGLU)");
            if (numExperts < 1) throw new IllegalArgumentException("numExperts must be >= 1, got " + numExperts);
            if (epSize < 1) throw new IllegalArgumentException("epSize must be >= 1, got " + epSize);
            if (numExperts % epSize != 0) throw new IllegalArgumentException("epSize (" + epSize + ") must divide numExperts (" + numExperts + ")");
            if (k < 1 || k > numExperts) throw new IllegalArgumentException("k must be in [1, numExperts = " + numExperts + "], got " + k);
            if (!(capacityFactor > 0) || Double.isInfinite(capacityFactor)) throw new IllegalArgumentException("capacityFactor must be a finite number > 0, got " + capacityFactor);
            if (!(evalCapacityFactor > 0) || Double.isInfinite(evalCapacityFactor)) throw new IllegalArgumentException("evalCapacityFactor must be a finite number > 0, got " + evalCapacityFactor);
            if (minCapacity < 0) throw new IllegalArgumentException("minCapacity must be >= 0, got " + minCapacity);
            NoisyGatePolicy policy = noisyGatePolicyText != null ? NoisyGatePolicy.parse(noisyGatePolicyText) : noisyGatePolicy;
            if (!(zLossCoeff >= 0) || Double.isInfinite(zLossCoeff)) throw new IllegalArgumentException("zLossCoeff must be a finite number >= 0, got " + zLossCoeff);
            if (sharedExperts < 0) throw new IllegalArgumentException("sharedExperts must be >= 0, got " + sharedExperts);
            if (sharedExperts > 0 && sharedFfnSize <= 0) throw new IllegalArgumentException("sharedFfnSize must be > 0 when sharedExperts > 0, got " + sharedFfnSize);
            if (!(initStd >= 0) || Double.isInfinite(initStd)) throw new IllegalArgumentException("initStd must be a finite number >= 0, got " + initStd);
            double outStd = Double.isNaN(outputInitStd) ? initStd : outputInitStd;
            if (!(outStd >= 0) || Double.isInfinite(outStd)) throw new IllegalArgumentException("outputInitStd must be a finite number >= 0, got " + outputInitStd);
            if (name == null || name.isEmpty()) throw new IllegalArgumentException("name must be a non-empty string");
            return new Config(name, hiddenSize, ffnSize, activation, numExperts, epSize, k, capacityFactor, evalCapacityFactor,
                    minCapacity, useResidual, policy, dropTokens, useRts, top2SecondExpertSampling, zLossCoeff, dropless,
                    sharedExperts, Math.max(sharedFfnSize, 0), expertBias, initStd, outStd, overlapAllToAll, droplessLayout, peerExchange);
        }

        /** Validates and builds the layer, declaring its parameters in the context. */
        public MoE build() {
            if (ctx == null) throw new IllegalArgumentException("context must be set (setContext)");
            Config c = config();
            if (ctx.params().isAllocated()) throw new IllegalStateException("MoE " + c.name() + ": the context's parameters are already allocated; build layers before allocateParameters()");
            if (c.epSize() > 1) {
                if (epGroup == null) throw new IllegalArgumentException("MoE " + c.name() + ": epSize = " + c.epSize() + " needs its expert-parallel group (optExpertParallelGroup)");
                if (epGroup.size() != c.epSize()) throw new IllegalArgumentException("MoE " + c.name() + ": the expert-parallel group has " + epGroup.size() + " ranks but epSize = " + c.epSize());
                if (epGroup.backend() != ctx.backend()) throw new IllegalArgumentException("MoE " + c.name() + ": the expert-parallel group moves tensors of backend " + epGroup.backend().name() + ", not the context's " + ctx.backend().name());
            } else if (epGroup != null && epGroup.size() != 1) {
                throw new IllegalArgumentException("MoE " + c.name() + ": an expert-parallel group of " + epGroup.size() + " ranks was given but epSize = 1 (set optEpSize)");
            }
            return new MoE(ctx, c, epGroup);
        }
    }
}
