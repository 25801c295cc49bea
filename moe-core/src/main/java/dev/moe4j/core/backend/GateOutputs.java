package dev.moe4j.core.backend;

import dev.moe4j.core.tensor.Tensor;

/**
 * Outputs of {@link Backend#moeGate} for S tokens, E experts, k choices.
 *
 * @param gates    F32 [S,E] softmax of the logits (saved for the backward); F64 allowed on the CPU backend
 * @param experts  I32 [S,k] chosen expert per token and choice (choice 0 is the top one)
 * @param dest     I32 [S,k] row of the expert buffer the token goes to, -1 when dropped. With capacity C the
 *                 buffer is [E*C, M] and row = e*C + slot; dropless it is [S*k, M] sorted by expert and
 *                 row = offsets[e] + position within the expert
 * @param weights  F32 [S,k] combine weights (the gate values; renormalised over kept choices for k >= 2; 0 if dropped)
 * @param counts   I32 [E] choices routed to each expert, over all k choices, before dropping (DeepSpeed's exp_counts)
 * @param offsets  I32 [E+1] start row of each expert in the buffer (dropless: exclusive cumsum of kept counts)
 * @param losses   F32 [2]: l_aux and z-loss (mean logsumexp^2) of this gate (F64 allowed on the CPU backend)
 */
public record GateOutputs(Tensor gates, Tensor experts, Tensor dest, Tensor weights, Tensor counts, Tensor offsets, Tensor losses) {}
