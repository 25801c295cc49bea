package dev.moe4j.core.model;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.nn.GptConfig;

import java.util.LinkedHashMap;
import java.util.Map;

/**
 * Named models. The paper's family (DeepSpeed-MoE, Rajbhandari et al. 2022, Tables 1 and 3): 350M = 24 layers
 * x 1024, 1.3B = 24 x 2048, 6.7B = 32 x 4096 (GPT-2's vocabulary 50257 padded to 50304), with MoE-128 on every
 * other layer and the PR-MoE pyramids (10 MoE layers of 32 experts then 2 of 64, Residual-MoE on); 350M+MoE-16
 * (dropless top-1, the end-to-end training benchmark of SPEC.md); and tiny
 * byte-level ones that train in minutes on a CPU.
 */
public final class Presets {
    private Presets() {}

    private static final Map<String, ModelSpec> ALL = new LinkedHashMap<>();

    private static void dense(String name, GptConfig c) { ALL.put(name, new ModelSpec(name, c, null)); }

    private static void moe(String name, GptConfig c, MoESettings m) { ALL.put(name, new ModelSpec(name, c, m)); }

    static {
        GptConfig tiny = new GptConfig(256, 128, 4, 128, 4, 512, Activation.GELU);
        GptConfig micro = new GptConfig(256, 64, 2, 64, 4, 256, Activation.GELU);
        GptConfig m350 = new GptConfig(50304, 2048, 24, 1024, 16, 4096, Activation.GELU);
        GptConfig b13 = new GptConfig(50304, 2048, 24, 2048, 16, 8192, Activation.GELU);
        dense("tiny", tiny);
        dense("micro", micro);
        moe("tiny-moe", tiny, MoESettings.defaults(MoESettings.every(4, 2, 8)));
        moe("tiny-moe-top2", tiny, MoESettings.defaults(MoESettings.every(4, 2, 8)).withRouting(2, 1.0, false, false));
        moe("tiny-prmoe", tiny, MoESettings.defaults(MoESettings.pyramid(4, 2, "4x1,8x1")).withRouting(1, 1.0, true, false));
        moe("micro-moe", micro, MoESettings.defaults(MoESettings.every(2, 2, 4)));
        dense("350M", m350);
        dense("1.3B", b13);
        dense("6.7B", new GptConfig(50304, 2048, 32, 4096, 32, 16384, Activation.GELU));
        moe("350M+MoE-128", m350, MoESettings.defaults(MoESettings.every(24, 2, 128)));
        moe("1.3B+MoE-128", b13, MoESettings.defaults(MoESettings.every(24, 2, 128)));
        // SPEC.md's end-to-end training benchmark: 16 experts top-1 on every other layer, dropless (about 1.9B parameters)
        moe("350M+MoE-16", m350, MoESettings.defaults(MoESettings.every(24, 2, 16)).withRouting(1, 1.0, false, true));
        moe("350M+PR-MoE-32/64", m350, MoESettings.defaults(MoESettings.pyramid(24, 2, "32x10,64x2")).withRouting(1, 1.0, true, false));
        moe("1.3B+PR-MoE-64/128", b13, MoESettings.defaults(MoESettings.pyramid(24, 2, "64x10,128x2")).withRouting(1, 1.0, true, false));
    }

    /** The preset of that name, or an error listing the known names. */
    public static ModelSpec get(String name) {
        ModelSpec s = ALL.get(name);
        if (s == null) throw new IllegalArgumentException("unknown preset '" + name + "'; known: " + ALL.keySet());
        return s;
    }

    public static Iterable<String> names() { return ALL.keySet(); }
}
