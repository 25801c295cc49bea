package dev.moe4j.core.train;

/**
 * One MoE layer's routing in the last micro-batch of a step.
 *
 * @param block          the transformer block holding the layer
 * @param tokensPerExpert tokens routed to each expert (all k choices, before dropping)
 * @param droppedFraction fraction of the token choices dropped for capacity
 * @param lAux           the layer's load-balancing loss (unscaled)
 */
public record RoutingStats(int block, int[] tokensPerExpert, double droppedFraction, double lAux) {}
