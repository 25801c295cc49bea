package dev.moe4j.core.model;

import java.util.ArrayList;
import java.util.List;

/**
 * Where a GPT gets MoE layers and how they route (DeepSpeed-MoE's options; see {@code dev.moe4j.core.moe.MoE}).
 *
 * @param expertsPerLayer one entry per transformer block: 0 for a dense FFN, else that block's expert count
 *                        (different counts per layer give the PR-MoE pyramid)
 * @param k               experts per token
 * @param capacityFactor  training capacity factor
 * @param evalCapacityFactor evaluation capacity factor
 * @param minCapacity     smallest capacity per expert
 * @param useResidual     Residual-MoE: a dense MLP beside the experts, mixed by a learned coefficient
 * @param noisyGatePolicy null, "Jitter" or "RSample"
 * @param dropTokens      drop tokens over capacity (false: capacity = largest load, nothing dropped)
 * @param useRts          random token selection when dropping
 * @param dropless        never pad to capacity: variable-size expert batches through grouped GEMMs
 * @param auxLossCoeff    coefficient of each layer's load-balancing loss in the objective
 * @param zLossCoeff      coefficient of the router z-loss (0: off)
 * @param sharedExperts   always-on experts beside the routed ones (DeepSeekMoE style; 0: none)
 */
public record MoESettings(List<Integer> expertsPerLayer, int k, double capacityFactor, double evalCapacityFactor, int minCapacity,
                          boolean useResidual, String noisyGatePolicy, boolean dropTokens, boolean useRts, boolean dropless,
                          double auxLossCoeff, double zLossCoeff, int sharedExperts) {
    public MoESettings {
        expertsPerLayer = List.copyOf(expertsPerLayer);
        for (int i = 0; i < expertsPerLayer.size(); i++) {
            if (expertsPerLayer.get(i) < 0) throw new IllegalArgumentException("expert count of layer " + i + " must be >= 0, got " + expertsPerLayer.get(i));
        }
        if (!(auxLossCoeff >= 0)) throw new IllegalArgumentException("auxLossCoeff must be >= 0, got " + auxLossCoeff);
        if (!(zLossCoeff >= 0)) throw new IllegalArgumentException("zLossCoeff must be >= 0, got " + zLossCoeff);
        if (sharedExperts < 0) throw new IllegalArgumentException("sharedExperts must be >= 0, got " + sharedExperts);
    }

    /** DeepSpeed's defaults (top-1, capacity factor 1, min capacity 4, RTS, aux coefficient 0.01) for the given layout. */
    public static MoESettings defaults(List<Integer> expertsPerLayer) {
        return new MoESettings(expertsPerLayer, 1, 1.0, 1.0, 4, false, null, true, true, false, 0.01, 0.0, 0);
    }

    /**
     * MoE on every {@code every}-th block (blocks every-1, 2*every-1, ...: with every = 2 the odd ones, as
     * Megatron-DeepSpeed's expert interval 2), {@code experts} experts each.
     */
    public static List<Integer> every(int layers, int every, int experts) {
        if (every <= 0) throw new IllegalArgumentException("moeEvery must be > 0, got " + every);
        if (experts <= 0) throw new IllegalArgumentException("experts must be > 0, got " + experts);
        List<Integer> l = new ArrayList<>();
        for (int i = 0; i < layers; i++) l.add(i % every == every - 1 ? experts : 0);
        return l;
    }

    /** MoE on exactly the given blocks (0-based), {@code experts} experts each. */
    public static List<Integer> onLayers(int layers, List<Integer> moeLayers, int experts) {
        List<Integer> l = new ArrayList<>();
        for (int i = 0; i < layers; i++) l.add(0);
        for (int i : moeLayers) {
            if (i < 0 || i >= layers) throw new IllegalArgumentException("MoE layer " + i + " is outside [0, " + layers + ")");
            l.set(i, experts);
        }
        return l;
    }

    /**
     * The PR-MoE pyramid: MoE on every {@code every}-th block, the MoE blocks taking their expert counts in
     * order from {@code spec}, e.g. "32x10,64x2" = ten layers of 32 experts then two of 64. The counts must
     * cover exactly the MoE blocks.
     */
    public static List<Integer> pyramid(int layers, int every, String spec) {
        List<Integer> counts = new ArrayList<>();
        for (String part : spec.split(",")) {
            String[] p = part.trim().split("x");
            if (p.length != 2) throw new IllegalArgumentException("pyramid part '" + part + "' must look like EXPERTSxLAYERS, e.g. 32x10");
            int experts = Integer.parseInt(p[0].trim()), n = Integer.parseInt(p[1].trim());
            if (experts <= 0 || n <= 0) throw new IllegalArgumentException("pyramid part '" + part + "' needs positive numbers");
            for (int i = 0; i < n; i++) counts.add(experts);
        }
        List<Integer> l = every(layers, every, 1);
        int moe = (int) l.stream().filter(e -> e > 0).count();
        if (counts.size() != moe) throw new IllegalArgumentException("pyramid '" + spec + "' gives " + counts.size() + " MoE layers but the model has " + moe);
        int j = 0;
        for (int i = 0; i < layers; i++) if (l.get(i) > 0) l.set(i, counts.get(j++));
        return l;
    }

    /** A copy with another expert layout (experts per block). */
    public MoESettings withLayout(List<Integer> layout) {
        return new MoESettings(layout, k, capacityFactor, evalCapacityFactor, minCapacity, useResidual, noisyGatePolicy,
                dropTokens, useRts, dropless, auxLossCoeff, zLossCoeff, sharedExperts);
    }

    /** A copy with other routing options (used by presets and the command line). */
    public MoESettings withRouting(int k, double capacityFactor, boolean useResidual, boolean dropless) {
        return new MoESettings(expertsPerLayer, k, capacityFactor, evalCapacityFactor, minCapacity, useResidual, noisyGatePolicy,
                dropTokens, useRts, dropless, auxLossCoeff, zLossCoeff, sharedExperts);
    }
}
