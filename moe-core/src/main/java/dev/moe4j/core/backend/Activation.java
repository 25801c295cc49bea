package dev.moe4j.core.backend;

/**
 * Expert / MLP activations. The gated ones (GEGLU, SWIGLU) read an input of width 2F laid out as
 * [a | b] per row and write width F: act(a) * b.
 */
public enum Activation {
    RELU(false),
    /** GELU, tanh approximation (GPT-2, Megatron's default "gelu" fused kernels). */
    GELU(false),
    /** gelu(a) * b. */
    GEGLU(true),
    /** silu(a) * b. */
    SWIGLU(true);

    private final boolean gated;

    Activation(boolean gated) { this.gated = gated; }

    /** True when the input is twice as wide as the output. */
    public boolean gated() { return gated; }

    /** Width of the input that produces an output of width {@code f}. */
    public int inputWidth(int f) { return gated ? 2 * f : f; }
}
