package dev.moe4j.core.backend;

/**
 * What the fused gate computes (DeepSpeed top-1 / top-2 gating, generalised to top-k):
 *
 * @param k              experts per token (1, 2, ... numExperts)
 * @param capacity       slots per expert; tokens past it are dropped. {@code <= 0}: no limit (dropless)
 * @param useRts         random token selection: drop by random priority instead of position
 * @param rsample        RSample policy: Gumbel noise on the logits when choosing the first expert (training)
 * @param secondSampling Gumbel noise when choosing the second and later experts (training)
 * @param seed           counter-based RNG seed for RTS and Gumbel noise
 * @param offset         RNG counter offset (advance it every call by {@link #randomCount} so each step draws new numbers)
 *
 * <p>Random numbers (S tokens, E experts), all from {@link Philox} with key {@code seed}:
 * <ul>
 *   <li>Gumbel noise for logits[s,e]: counter {@code offset + s*E + e}; with w0 the first 32-bit word of the
 *       block, u = ((w0 &gt;&gt;&gt; 8) + 0.5) * 2^-24 (in (0,1)) and g = -log(-log(u)), in float64. The same
 *       g[s,e] serves the first choice (rsample) and the later ones (secondSampling).</li>
 *   <li>RTS priority of token s for choice j: {@code Philox.uniform(seed, offset + S*E + s*k + j)}; higher
 *       priority gets the lower slot, ties by position.</li>
 * </ul>
 * A call uses counters offset .. offset + randomCount(S, E) - 1 whether or not noise or RTS is on.
 *
 * <p>Semantics (the CPU backend's {@code CpuMoE} is the reference):
 * <ol>
 *   <li>gates[s] = softmax(logits[s]). Choice 0 = argmax_e logits[s,e] (+ g[s,e] with rsample); choice j &gt;= 1 =
 *       argmax over experts not yet chosen of logits[s,e] (+ g[s,e] with secondSampling). Ties: lowest index.</li>
 *   <li>Slots per expert are filled choice rank by rank (all choice-0 tokens, then choice 1, ...); within a rank in
 *       token order, or with useRts in descending RTS priority. slot = (choices of earlier ranks routed to e,
 *       counted before dropping) + rank within this rank's order. Kept iff dropless or slot &lt; capacity.</li>
 *   <li>weights: k = 1: gates[s,e] if kept; k &gt;= 2: gates[s,e_j] / max(sum of kept gates of s, 2^-23) if kept;
 *       0 if dropped.</li>
 *   <li>l_aux = E * sum_e mean_s(gates[s,e]) * (choice-0 count of e) / S (before dropping); z-loss = mean_s lse_s^2.</li>
 * </ol>
 */
public record GateSpec(int k, int capacity, boolean useRts, boolean rsample, boolean secondSampling, long seed, long offset) {
    public GateSpec {
        if (k < 1) throw new IllegalArgumentException("k must be >= 1, got " + k);
    }

    public boolean dropless() { return capacity <= 0; }

    /** Counters one gate call on S tokens and E experts reserves: S*E (Gumbel) + S*k (RTS priorities). */
    public long randomCount(int tokens, int experts) { return (long) tokens * experts + (long) tokens * k; }
}
