package dev.moe4j.core.cpu;

import dev.moe4j.core.backend.GateOutputs;
import dev.moe4j.core.backend.GateSpec;
import dev.moe4j.core.tensor.Tensor;

/** MoE routing on the CPU: the reference for the fused gate and the index-based permute / unpermute. */
final class CpuMoE {
    private CpuMoE() {}

    static void gate(GateSpec spec, Tensor logits, GateOutputs out) {
        throw new UnsupportedOperationException("moeGate: not implemented yet on the CPU backend");
    }

    static void gateBackward(GateSpec spec, Tensor logits, GateOutputs saved, Tensor dweights,
                             float lauxCoeff, float zlossCoeff, Tensor dlogits) {
        throw new UnsupportedOperationException("moeGateBackward: not implemented yet on the CPU backend");
    }

    static void permute(Tensor x, Tensor dest, Tensor buf) {
        throw new UnsupportedOperationException("moePermute: not implemented yet on the CPU backend");
    }

    static void unpermute(Tensor buf, Tensor dest, Tensor w, Tensor out) {
        throw new UnsupportedOperationException("moeUnpermute: not implemented yet on the CPU backend");
    }

    static void unpermuteBackward(Tensor dout, Tensor buf, Tensor dest, Tensor w, Tensor dbuf, Tensor dw) {
        throw new UnsupportedOperationException("moeUnpermuteBackward: not implemented yet on the CPU backend");
    }
}
