package dev.moe4j.core.moe;

import dev.moe4j.core.tensor.Tensor;

/**
 * What {@link MoE#forward} returns (DeepSpeed's {@code (output, l_aux, exp_counts)} plus the z-loss).
 * All on the device, so a training step needs no host transfer; read them with {@code toFloats()} for logging.
 *
 * @param output [S, M] model dtype (owned by the caller, or by the enclosing Scope)
 * @param lAux   1 element (fp32): the load-balancing loss of this layer; the model adds auxLossCoeff * l_aux
 * @param zLoss  1 element (fp32): mean_s logsumexp(logits[s])^2 (its coefficient is the layer's zLossCoeff)
 * @param counts I32 [E]: tokens routed to each expert over all k choices, before dropping
 * lAux, zLoss and counts are views of the layer's saved state: valid until its next forward or close.
 */
public record MoEOutput(Tensor output, Tensor lAux, Tensor zLoss, Tensor counts) {}
