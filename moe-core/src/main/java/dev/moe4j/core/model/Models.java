package dev.moe4j.core.model;

import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.comm.ProcessGroups;
import dev.moe4j.core.moe.MoE;
import dev.moe4j.core.nn.Gpt;
import dev.moe4j.core.nn.GptConfig;
import dev.moe4j.core.nn.Mlp;
import dev.moe4j.core.nn.ModelContext;

import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.function.IntFunction;
import java.util.function.IntUnaryOperator;

/** Builds a (GPT or GPT-MoE) model from a {@link ModelSpec}. */
public final class Models {
    private Models() {}

    /** One MoE layer of a built model and the block it sits in. */
    public record MoELayer(int block, MoE moe) {}

    /** The model and handles to its MoE layers (for logging expert load and dropped tokens). */
    public record Built(Gpt gpt, List<MoELayer> moeLayers) {}

    /**
     * Declares the model's parameters in {@code ctx} (call {@link ModelContext#allocateParameters()} after).
     * Dense blocks get GPT-2's MLP; MoE blocks a DeepSpeed-style MoE layer with the spec's routing.
     */
    public static Built build(ModelContext ctx, ModelSpec spec) {
        return build(ctx, spec, (IntUnaryOperator) experts -> 1, (IntFunction<Communicator>) null);
    }

    /**
     * A GPT-MoE with expert parallelism: every MoE layer of E experts gets expert-parallel degree
     * {@code min(epSize, E)} and its group from {@code groups} (collective: every rank builds the same model).
     * Data parallelism over the rest of the world comes from the trainer's gradient synchronisation.
     */
    public static Built build(ModelContext ctx, ModelSpec spec, ProcessGroups groups, int epSize) {
        if (epSize < 1) throw new IllegalArgumentException("epSize must be >= 1, got " + epSize);
        return build(ctx, spec, groups, experts -> Math.min(epSize, experts));
    }

    /**
     * As {@link #build(ModelContext, ModelSpec)}, each MoE layer of E experts with expert-parallel degree
     * {@code epSizeOfLayer.applyAsInt(E)} (PR-MoE layers may differ; it must divide E and the world size), its
     * expert-parallel group taken from {@code groups} (may be null when every degree is 1).
     */
    public static Built build(ModelContext ctx, ModelSpec spec, ProcessGroups groups, IntUnaryOperator epSizeOfLayer) {
        return build(ctx, spec, epSizeOfLayer, groups == null ? null : groups::expertParallel);
    }

    /**
     * The general form: {@code expertGroup.apply(epSize)} gives the communicator a layer of that degree dispatches
     * through, e.g. {@code ep -> new HierarchicalCommunicator(groups.expertParallel(ep), nodeSize)} for the
     * hierarchical all-to-all (the caller owns and closes what it creates; the function is called once per MoE
     * layer, in layer order, on every rank, so it may create groups collectively and should cache them per degree).
     */
    public static Built build(ModelContext ctx, ModelSpec spec, IntUnaryOperator epSizeOfLayer, IntFunction<Communicator> expertGroup) {
        GptConfig cfg = spec.gpt();
        MoESettings m = spec.moe();
        double std = 0.02, residualStd = 0.02 / Math.sqrt(2.0 * cfg.layers());
        List<MoELayer> moes = new ArrayList<>();
        Gpt gpt = new Gpt(ctx, cfg, (c, layer, name) -> {
            int experts = m == null ? 0 : m.expertsPerLayer().get(layer);
            if (experts == 0) return new Mlp(c, name, cfg.hidden(), cfg.ffnHidden(), cfg.activation(), std, residualStd);
            MoE.Builder b = MoE.builder().setContext(c).setHiddenSize(cfg.hidden()).setFfnSize(cfg.ffnHidden())
                    .optName(name).optActivation(cfg.activation()).optNumExperts(experts).optK(m.k())
                    .optCapacityFactor(m.capacityFactor()).optEvalCapacityFactor(m.evalCapacityFactor())
                    .optMinCapacity(m.minCapacity()).optUseResidual(m.useResidual()).optDropTokens(m.dropTokens())
                    .optUseRts(m.useRts()).optDropless(m.dropless()).optZLossCoeff(m.zLossCoeff())
                    .optInitStd(std).optOutputInitStd(residualStd);
            int ep = epSizeOfLayer.applyAsInt(experts);
            if (ep > 1) {
                if (expertGroup == null) throw new IllegalArgumentException("MoE layer " + layer + ": epSize " + ep + " needs process groups");
                b.optEpSize(ep).optExpertParallelGroup(expertGroup.apply(ep));
            }
            if (m.noisyGatePolicy() != null) b.optNoisyGatePolicy(m.noisyGatePolicy());
            if (m.sharedExperts() > 0) b.optSharedExperts(m.sharedExperts(), cfg.ffnHidden());
            MoE moe = b.build();
            moes.add(new MoELayer(layer, moe));
            return moe.asFeedForward(m.auxLossCoeff());
        });
        return new Built(gpt, Collections.unmodifiableList(moes));
    }
}
