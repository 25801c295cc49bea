package dev.moe4j.core.model;

import dev.moe4j.core.moe.MoE;
import dev.moe4j.core.nn.Gpt;
import dev.moe4j.core.nn.GptConfig;
import dev.moe4j.core.nn.Mlp;
import dev.moe4j.core.nn.ModelContext;

import java.util.ArrayList;
import java.util.Collections;
import java.util.List;

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
            if (m.noisyGatePolicy() != null) b.optNoisyGatePolicy(m.noisyGatePolicy());
            if (m.sharedExperts() > 0) b.optSharedExperts(m.sharedExperts(), cfg.ffnHidden());
            MoE moe = b.build();
            moes.add(new MoELayer(layer, moe));
            return moe.asFeedForward(m.auxLossCoeff());
        });
        return new Built(gpt, Collections.unmodifiableList(moes));
    }
}
