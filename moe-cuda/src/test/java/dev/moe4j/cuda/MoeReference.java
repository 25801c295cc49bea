package dev.moe4j.cuda;

/**
 * A small float64 host model of the documented gate semantics (GateSpec / GateOutputs; DeepSpeed top1gating /
 * top2gating generalised to top-k, no noise, no RTS), written from the javadoc for the GPU tests, independent
 * of the kernels. Choice j's slots at an expert follow all slots of choices &lt; j, tokens in order.
 */
final class MoeReference {
    final int s, e, k, capacity;
    final double[] gates, weights, losses = new double[2], lse;
    final int[] experts, dest, counts, offsets;

    MoeReference(double[] logits, int s, int e, int k, int capacity) {
        this.s = s; this.e = e; this.k = k; this.capacity = capacity;
        gates = new double[s * e]; lse = new double[s];
        experts = new int[s * k]; dest = new int[s * k]; weights = new double[s * k];
        counts = new int[e]; offsets = new int[e + 1];
        for (int t = 0; t < s; t++) {
            double m = Double.NEGATIVE_INFINITY;
            for (int x = 0; x < e; x++) m = Math.max(m, logits[t * e + x]);
            double sum = 0;
            for (int x = 0; x < e; x++) sum += Math.exp(logits[t * e + x] - m);
            lse[t] = m + Math.log(sum);
            for (int x = 0; x < e; x++) gates[t * e + x] = Math.exp(logits[t * e + x] - lse[t]);
            for (int j = 0; j < k; j++) {
                int best = -1;
                for (int x = 0; x < e; x++) {
                    boolean taken = false;
                    for (int jj = 0; jj < j; jj++) taken |= experts[t * k + jj] == x;
                    if (!taken && (best < 0 || logits[t * e + x] > logits[t * e + best])) best = x;
                }
                experts[t * k + j] = best;
            }
        }
        int[] total = counts, first = new int[e];  // counts: every choice before dropping; l_aux uses first choices
        for (int j = 0; j < k; j++) for (int t = 0; t < s; t++) { total[experts[t * k + j]]++; if (j == 0) first[experts[t * k + j]]++; }
        int acc = 0;
        for (int x = 0; x < e; x++) { offsets[x] = capacity > 0 ? x * capacity : acc; acc += total[x]; }
        offsets[e] = capacity > 0 ? e * capacity : acc;
        int[] cnt = new int[e];
        for (int j = 0; j < k; j++) {
            for (int t = 0; t < s; t++) {
                int x = experts[t * k + j], loc = cnt[x]++;
                dest[t * k + j] = capacity > 0 ? (loc < capacity ? x * capacity + loc : -1) : offsets[x] + loc;
            }
        }
        for (int t = 0; t < s; t++) {
            double denom = 0;
            for (int j = 0; j < k; j++) if (dest[t * k + j] >= 0) denom += gates[t * e + experts[t * k + j]];
            denom = Math.max(denom, 0x1.0p-23);
            for (int j = 0; j < k; j++) {
                double g = dest[t * k + j] >= 0 ? gates[t * e + experts[t * k + j]] : 0;
                weights[t * k + j] = k == 1 ? g : g / denom;
            }
        }
        double laux = 0, z = 0;
        for (int x = 0; x < e; x++) {
            double me = 0;
            for (int t = 0; t < s; t++) me += gates[t * e + x];
            laux += (me / s) * ((double) first[x] / s);
        }
        for (int t = 0; t < s; t++) z += lse[t] * lse[t];
        losses[0] = laux * e;
        losses[1] = z / s;
    }

    /** The scalar whose gradient moeGateBackward returns: sum(dw * weights) + lauxCoeff l_aux + zlossCoeff z. */
    double objective(double[] dw, double lauxCoeff, double zlossCoeff) {
        double o = lauxCoeff * losses[0] + zlossCoeff * losses[1];
        for (int i = 0; i < dw.length; i++) o += dw[i] * weights[i];
        return o;
    }
}
