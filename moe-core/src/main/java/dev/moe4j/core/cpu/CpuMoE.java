package dev.moe4j.core.cpu;

import dev.moe4j.core.backend.Checks;
import dev.moe4j.core.backend.GateOutputs;
import dev.moe4j.core.backend.GateSpec;
import dev.moe4j.core.backend.Philox;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;

import java.util.Arrays;

import static dev.moe4j.core.cpu.CpuBackend.data;
import static dev.moe4j.core.cpu.CpuBackend.off;
import static dev.moe4j.core.cpu.CpuBackend.round;

/**
 * MoE routing on the CPU: the reference for the fused gate and the index-based permute / unpermute.
 *
 * <p>The gate, for S tokens, E experts and k choices (all arithmetic in float64 here; see {@link GateSpec}
 * for the random-number counters):
 * <ol>
 *   <li>gates[s] = softmax(logits[s]); lse[s] = logsumexp(logits[s]).</li>
 *   <li>Choice 0 = argmax_e of logits[s,e] (+ gumbel[s,e] when {@code rsample}); choice j &gt;= 1 = argmax over
 *       the experts not chosen yet of logits[s,e] (+ gumbel[s,e] when {@code secondSampling}). Ties go to the
 *       lowest expert index (torch.argmax). argmax of the logits equals argmax of the softmax.</li>
 *   <li>counts[e] = number of (s, j) with experts[s,j] = e, before dropping (DeepSpeed's exp_counts).</li>
 *   <li>Slots: choice ranks are served in order j = 0, 1, ..; within rank j the tokens sent to e are ordered
 *       by position s, or with {@code useRts} by descending priority u[s,j] (ties by position).
 *       slot(s,j) = (number of choices of ranks &lt; j sent to e, before dropping) + rank of s in that order.
 *       So every second-choice slot comes after all first-choice slots (DeepSpeed top-2), and with RTS the
 *       tokens kept are the C of highest priority (DeepSpeed top-1 RTS).</li>
 *   <li>Capacity C &gt; 0: kept iff slot &lt; C, dest = e*C + slot, offsets[e] = e*C. Dropless (C &lt;= 0):
 *       all kept, offsets = exclusive cumsum of counts, dest = offsets[e] + slot.</li>
 *   <li>weights: k = 1: gates[s,e] if kept else 0. k &gt;= 2: gates[s,e_j] / max(sum over kept choices of
 *       gates, eps) for kept choices, 0 for dropped ones (eps = 2^-23, float32 epsilon).</li>
 *   <li>l_aux = E * sum_e mean_s(gates[s,e]) * (first-choice count of e / S) (top-1 and top-2 formulas of
 *       DeepSpeed coincide; we use it for every k). z-loss = mean_s lse[s]^2.</li>
 * </ol>
 */
final class CpuMoE {
    private CpuMoE() {}

    /** float32 epsilon (torch.finfo(torch.float32).eps): the clamp of the top-k renormalisation denominator. */
    static final double EPS = 0x1.0p-23;

    /**
     * Gumbel(0, 1) noise for counter c: u = ((w0 &gt;&gt;&gt; 8) + 0.5) * 2^-24 with w0 the first word of
     * Philox(seed, c), so u is in (0, 1); g = -log(-log(u)) in float64.
     */
    static double gumbel(long seed, long counter) {
        int w0 = Philox.block(seed, counter)[0];
        double u = ((w0 >>> 8) + 0.5) * 0x1.0p-24;
        return -Math.log(-Math.log(u));
    }

    private static void checkGate(String op, GateSpec spec, Tensor logits, GateOutputs o) {
        Checks.open(op, "logits", logits);
        Checks.floating(op, "logits", logits);
        Checks.rank(op, "logits", logits, 2);
        int s = logits.dim(0), e = logits.dim(1), k = spec.k();
        if (k > e) throw new IllegalArgumentException(op + ": spec.k = " + k + " exceeds the " + e + " experts (logits columns)");
        Checks.gateOutputs(op, o, s, e, k);
        if (s == 0) throw new IllegalArgumentException(op + ": logits has no rows (S = 0 tokens)");
    }

    static void gate(GateSpec spec, Tensor logits, GateOutputs out) {
        String op = "moeGate";
        checkGate(op, spec, logits, out);
        final int S = logits.dim(0), E = logits.dim(1), k = spec.k(), C = spec.capacity();
        final boolean dropless = spec.dropless();
        double[] L = data(logits);
        int lo = off(logits);
        double[] G = data(out.gates()), W = data(out.weights());
        double[] EX = data(out.experts()), DS = data(out.dest());
        int go = off(out.gates()), wo = off(out.weights()), exo = off(out.experts()), dso = off(out.dest());

        // 1-2. softmax, logsumexp, top-k choices (per token, independent)
        double[] lse = new double[S];
        int[] choice = new int[S * k];
        Parallel.range(S, 16, (a, b) -> {
            double[] score = new double[E];
            double[] noise = new double[E];
            boolean[] taken = new boolean[E];
            for (int s = a; s < b; s++) {
                lse[s] = CpuMath.logSumExp(L, lo + s * E, E, 1.0);
                for (int e = 0; e < E; e++) G[go + s * E + e] = Math.exp(L[lo + s * E + e] - lse[s]);
                if (spec.rsample() || (k > 1 && spec.secondSampling())) {
                    for (int e = 0; e < E; e++) noise[e] = gumbel(spec.seed(), spec.offset() + (long) s * E + e);
                }
                Arrays.fill(taken, false);
                for (int j = 0; j < k; j++) {
                    boolean noisy = j == 0 ? spec.rsample() : spec.secondSampling();
                    for (int e = 0; e < E; e++) score[e] = L[lo + s * E + e] + (noisy ? noise[e] : 0);
                    int best = -1;
                    for (int e = 0; e < E; e++) {
                        if (taken[e]) continue;
                        if (best < 0 || score[e] > score[best]) best = e;
                    }
                    taken[best] = true;
                    choice[s * k + j] = best;
                }
            }
        });

        // 3. counts before dropping; first-choice counts for l_aux
        int[] counts = new int[E], first = new int[E];
        for (int s = 0; s < S; s++) {
            first[choice[s * k]]++;
            for (int j = 0; j < k; j++) counts[choice[s * k + j]]++;
        }

        // 4. slots: rank by rank, position order or RTS priority order
        int[] slot = new int[S * k];
        int[] base = new int[E];   // choices of earlier ranks sent to each expert
        Integer[] order = new Integer[S];
        double[] prio = spec.useRts() ? new double[S] : null;
        for (int j = 0; j < k; j++) {
            for (int s = 0; s < S; s++) order[s] = s;
            if (spec.useRts()) {
                for (int s = 0; s < S; s++) prio[s] = Philox.uniform(spec.seed(), spec.offset() + (long) S * E + (long) s * k + j);
                final double[] p = prio;
                Arrays.sort(order, (x, y) -> p[x] != p[y] ? Double.compare(p[y], p[x]) : Integer.compare(x, y));
            }
            int[] next = base.clone();
            for (int idx = 0; idx < S; idx++) {
                int s = order[idx], e = choice[s * k + j];
                slot[s * k + j] = next[e]++;
            }
            for (int s = 0; s < S; s++) base[choice[s * k + j]]++;
        }

        // 5. dest and offsets
        int[] offsets = new int[E + 1];
        for (int e = 0; e < E; e++) offsets[e + 1] = dropless ? offsets[e] + counts[e] : (e + 1) * C;
        boolean[] kept = new boolean[S * k];
        for (int i = 0; i < S * k; i++) {
            int e = choice[i];
            kept[i] = dropless || slot[i] < C;
            EX[exo + i] = e;
            DS[dso + i] = !kept[i] ? -1 : dropless ? offsets[e] + slot[i] : (long) e * C + slot[i];
        }

        // 6. combine weights
        for (int s = 0; s < S; s++) {
            if (k == 1) {
                W[wo + s] = kept[s] ? G[go + s * E + choice[s]] : 0;
                continue;
            }
            double denom = 0;
            for (int j = 0; j < k; j++) if (kept[s * k + j]) denom += G[go + s * E + choice[s * k + j]];
            denom = Math.max(denom, EPS);
            for (int j = 0; j < k; j++) {
                int i = s * k + j;
                W[wo + i] = kept[i] ? G[go + s * E + choice[i]] / denom : 0;
            }
        }

        // 7. l_aux and z-loss
        double laux = 0, z = 0;
        for (int e = 0; e < E; e++) {
            double me = 0;
            for (int s = 0; s < S; s++) me += G[go + s * E + e];
            laux += (me / S) * ((double) first[e] / S);
        }
        laux *= E;
        for (int s = 0; s < S; s++) z += lse[s] * lse[s];
        z /= S;

        double[] CT = data(out.counts()), OF = data(out.offsets()), LS = data(out.losses());
        for (int e = 0; e < E; e++) CT[off(out.counts()) + e] = counts[e];
        for (int e = 0; e <= E; e++) OF[off(out.offsets()) + e] = offsets[e];
        LS[off(out.losses())] = laux;
        LS[off(out.losses()) + 1] = z;
        round(out.gates());
        round(out.weights());
        round(out.losses());
    }

    /**
     * dlogits = softmax-backward(dgates) + zlossCoeff * 2 * lse[s] * gates[s,e] / S, where
     * dgates[s,e] = lauxCoeff * E * first[e] / S^2 (the l_aux term; the mask is not differentiable)
     * plus the combine-weight term: k = 1: dweights[s,0] at the kept expert; k &gt;= 2, kept set K,
     * D = sum_K gates: (dweights_i - sum_K dweights_j * weights_j) / D for i in K (D clamped at eps: dweights_i / eps).
     */
    static void gateBackward(GateSpec spec, Tensor logits, GateOutputs saved, Tensor dweights,
                             float lauxCoeff, float zlossCoeff, Tensor dlogits) {
        String op = "moeGateBackward";
        checkGate(op, spec, logits, saved);
        final int S = logits.dim(0), E = logits.dim(1), k = spec.k();
        Checks.open(op, "dweights", dweights);
        Checks.floating(op, "dweights", dweights);
        Checks.matrix(op, "dweights", dweights, S, k);
        Checks.open(op, "dlogits", dlogits);
        Checks.floating(op, "dlogits", dlogits);
        Checks.matrix(op, "dlogits", dlogits, S, E);
        double[] L = data(logits), G = data(saved.gates()), W = data(saved.weights());
        double[] EX = data(saved.experts()), DS = data(saved.dest()), DW = data(dweights), DL = data(dlogits);
        int lo = off(logits), go = off(saved.gates()), wo = off(saved.weights()), exo = off(saved.experts());
        int dso = off(saved.dest()), dwo = off(dweights), dlo = off(dlogits);
        int[] first = new int[E];
        for (int s = 0; s < S; s++) first[(int) EX[exo + s * k]]++;
        Parallel.range(S, 16, (a, b) -> {
            double[] dg = new double[E];
            for (int s = a; s < b; s++) {
                for (int e = 0; e < E; e++) dg[e] = (double) lauxCoeff * E * first[e] / ((double) S * S);
                if (k == 1) {
                    if ((int) DS[dso + s] >= 0) dg[(int) EX[exo + s]] += DW[dwo + s];
                } else {
                    double denom = 0, dot = 0;
                    for (int j = 0; j < k; j++) {
                        int i = s * k + j;
                        if ((int) DS[dso + i] < 0) continue;
                        denom += G[go + s * E + (int) EX[exo + i]];
                        dot += DW[dwo + i] * W[wo + i];
                    }
                    boolean clamped = denom < EPS;
                    double d = Math.max(denom, EPS);
                    for (int j = 0; j < k; j++) {
                        int i = s * k + j;
                        if ((int) DS[dso + i] < 0) continue;
                        dg[(int) EX[exo + i]] += clamped ? DW[dwo + i] / d : (DW[dwo + i] - dot) / d;
                    }
                }
                double dot = 0;
                for (int e = 0; e < E; e++) dot += G[go + s * E + e] * dg[e];
                double zs = zlossCoeff == 0 ? 0 : 2.0 * zlossCoeff * CpuMath.logSumExp(L, lo + s * E, E, 1.0) / S;
                for (int e = 0; e < E; e++) {
                    double g = G[go + s * E + e];
                    DL[dlo + s * E + e] = g * (dg[e] - dot) + zs * g;
                }
            }
        });
        round(dlogits);
    }

    /** Checks dest (I32 [S,k]) against a buffer of {@code rows} rows; returns k. */
    private static int checkDest(String op, Tensor dest, int tokens, int rows) {
        Checks.open(op, "dest", dest);
        Checks.dtype(op, "dest", dest, DType.I32);
        if (dest.rows() != tokens) throw new IllegalArgumentException(op + ": dest is " + dest.shape() + ", expected " + tokens + " rows (one per token)");
        double[] D = data(dest);
        int o = off(dest), n = Math.toIntExact(dest.numel());
        for (int i = 0; i < n; i++) {
            int r = (int) D[o + i];
            if (r >= rows) throw new IllegalArgumentException(op + ": dest[" + i + "] = " + r + " but the buffer has " + rows + " rows");
        }
        return dest.cols();
    }

    /**
     * The rows of buf that the counts forms of moePermute and moeUnpermuteBackward set to 0 (Backend#moePermute):
     * capacity C &gt; 0: e*C + c for min(counts[e], C) &lt;= c &lt; C; C &lt;= 0: none. Checks that dest addresses every
     * other row exactly once and none of these, i.e. that dest, counts and capacity are one moeGate call's.
     */
    static boolean[] freeSlots(String op, Tensor dest, Tensor counts, int capacity, String bufName, Tensor buf) {
        Checks.open(op, "dest", dest);
        Checks.dtype(op, "dest", dest, DType.I32);
        Checks.open(op, "counts", counts);
        Checks.dtype(op, "counts", counts, DType.I32);
        Checks.open(op, bufName, buf);
        int R = buf.rows(), n = Math.toIntExact(dest.numel());
        boolean[] free = new boolean[R];
        if (capacity > 0) {
            int E = Math.toIntExact(counts.numel());
            if ((long) E * capacity != R) throw new IllegalArgumentException(op + ": " + bufName + " has " + R + " rows, expected " + E + " experts x capacity " + capacity);
            double[] CT = data(counts);
            int co = off(counts);
            for (int e = 0; e < E; e++) {
                int used = (int) Math.min(CT[co + e], capacity);
                for (int c = used; c < capacity; c++) free[e * capacity + c] = true;
            }
        } else if (R != n) {
            throw new IllegalArgumentException(op + ": " + bufName + " has " + R + " rows, expected S*k = " + n + " (dropless)");
        }
        boolean[] hit = new boolean[R];
        double[] D = data(dest);
        int o = off(dest);
        for (int i = 0; i < n; i++) {
            int r = (int) D[o + i];
            if (r < 0) continue;
            if (r >= R || free[r] || hit[r]) {
                throw new IllegalArgumentException(op + ": dest[" + i + "] = " + r + " is not a row the counts leave to one choice (dest and counts of different gate calls?)");
            }
            hit[r] = true;
        }
        for (int r = 0; r < R; r++) {
            if (!free[r] && !hit[r]) throw new IllegalArgumentException(op + ": no choice takes buffer row " + r + ", which the counts say is used (dest and counts of different gate calls?)");
        }
        return free;
    }

    /** buf's rows where free is set = 0. */
    static void zeroRows(Tensor buf, boolean[] free) {
        double[] B = data(buf);
        int bo = off(buf), M = buf.cols();
        for (int r = 0; r < free.length; r++) if (free[r]) Arrays.fill(B, bo + r * M, bo + (r + 1) * M, 0);
    }

    static void permute(Tensor x, Tensor dest, Tensor buf) {
        String op = "moePermute";
        Checks.open(op, "x", x);
        Checks.open(op, "buf", buf);
        int S = x.rows(), M = x.cols();
        Checks.cols(op, "buf", buf, M);
        int k = checkDest(op, dest, S, buf.rows());
        double[] X = data(x), D = data(dest), B = data(buf);
        int xo = off(x), dso = off(dest), bo = off(buf);
        Parallel.range(S, 16, (a, b) -> {
            for (int s = a; s < b; s++) {
                for (int j = 0; j < k; j++) {
                    int r = (int) D[dso + s * k + j];
                    if (r >= 0) System.arraycopy(X, xo + s * M, B, bo + r * M, M);
                }
            }
        });
        round(buf);
    }

    static void unpermute(Tensor buf, Tensor dest, Tensor w, Tensor out) {
        String op = "moeUnpermute";
        Checks.open(op, "buf", buf);
        Checks.open(op, "out", out);
        int S = out.rows(), M = out.cols();
        Checks.cols(op, "buf", buf, M);
        int k = checkDest(op, dest, S, buf.rows());
        if (w != null) Checks.matrix(op, "w", w, S, k);
        double[] B = data(buf), D = data(dest), O = data(out);
        double[] Wt = w == null ? null : data(w);
        int bo = off(buf), dso = off(dest), oo = off(out), wo = w == null ? 0 : off(w);
        Parallel.range(S, 16, (a, b) -> {
            double[] acc = new double[M];
            for (int s = a; s < b; s++) {
                Arrays.fill(acc, 0);
                for (int j = 0; j < k; j++) {
                    int r = (int) D[dso + s * k + j];
                    if (r < 0) continue;
                    double wj = Wt == null ? 1 : Wt[wo + s * k + j];
                    for (int c = 0; c < M; c++) acc[c] += wj * B[bo + r * M + c];
                }
                System.arraycopy(acc, 0, O, oo + s * M, M);
            }
        });
        round(out);
    }

    static void unpermuteBackward(Tensor dout, Tensor buf, Tensor dest, Tensor w, Tensor dbuf, Tensor dw) {
        String op = "moeUnpermuteBackward";
        Checks.open(op, "dout", dout);
        Checks.open(op, "dbuf", dbuf);
        int S = dout.rows(), M = dout.cols();
        Checks.cols(op, "dbuf", dbuf, M);
        int k = checkDest(op, dest, S, dbuf.rows());
        if (w != null) Checks.matrix(op, "w", w, S, k);
        if (dw != null) {
            Checks.open(op, "buf", buf);
            Checks.matrix(op, "buf", buf, dbuf.rows(), M);
            Checks.matrix(op, "dw", dw, S, k);
        }
        double[] DO = data(dout), D = data(dest), DB = data(dbuf);
        double[] Wt = w == null ? null : data(w), B = dw == null ? null : data(buf), DWt = dw == null ? null : data(dw);
        int doo = off(dout), dso = off(dest), dbo = off(dbuf), wo = w == null ? 0 : off(w);
        int bo = dw == null ? 0 : off(buf), dwo = dw == null ? 0 : off(dw);
        Parallel.range(S, 16, (a, b) -> {
            for (int s = a; s < b; s++) {
                for (int j = 0; j < k; j++) {
                    int r = (int) D[dso + s * k + j];
                    if (DWt != null) {
                        double dot = 0;
                        if (r >= 0) for (int c = 0; c < M; c++) dot += DO[doo + s * M + c] * B[bo + r * M + c];
                        DWt[dwo + s * k + j] = dot;
                    }
                    if (r < 0) continue;
                    double wj = Wt == null ? 1 : Wt[wo + s * k + j];
                    for (int c = 0; c < M; c++) DB[dbo + r * M + c] = wj * DO[doo + s * M + c];
                }
            }
        });
        round(dbuf);
        if (dw != null) round(dw);
    }
}
