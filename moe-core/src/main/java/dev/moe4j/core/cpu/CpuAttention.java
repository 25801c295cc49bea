package dev.moe4j.core.cpu;

import dev.moe4j.core.backend.Checks;
import dev.moe4j.core.tensor.Tensor;

import static dev.moe4j.core.cpu.CpuBackend.data;
import static dev.moe4j.core.cpu.CpuBackend.off;
import static dev.moe4j.core.cpu.CpuBackend.round;

/**
 * Causal multi-head attention, one (batch, head) pair per task. Letters: B batch, T sequence, C = H*D
 * channels, H heads, D head size. qkv [B,T,3C] holds q at columns 0..C, k at C..2C, v at 2C..3C.
 */
final class CpuAttention {
    private CpuAttention() {}


    static void forward(Tensor qkv, int heads, Tensor out, Tensor lse) {
        int[] d = Checks.attention("attention", qkv, heads, out, lse);
        int b = d[0], t = d[1], c = d[2], hd = d[3];
        double[] X = data(qkv), O = data(out), L = data(lse);
        int xo = off(qkv), oo = off(out), lo = off(lse);
        double scale = 1.0 / Math.sqrt(hd);
        Parallel.range(b * heads, 1, (s, e) -> {
            double[] p = new double[t];
            for (int bh = s; bh < e; bh++) {
                int bb = bh / heads, h = bh % heads;
                for (int i = 0; i < t; i++) {
                    int q = xo + (bb * t + i) * 3 * c + h * hd;
                    double max = Double.NEGATIVE_INFINITY;
                    for (int j = 0; j <= i; j++) {
                        int k = xo + (bb * t + j) * 3 * c + c + h * hd;
                        double dot = 0;
                        for (int x = 0; x < hd; x++) dot += X[q + x] * X[k + x];
                        p[j] = dot * scale;
                        max = Math.max(max, p[j]);
                    }
                    double sum = 0;
                    for (int j = 0; j <= i; j++) { p[j] = Math.exp(p[j] - max); sum += p[j]; }
                    int o = oo + (bb * t + i) * c + h * hd;
                    for (int x = 0; x < hd; x++) O[o + x] = 0;
                    for (int j = 0; j <= i; j++) {
                        double w = p[j] / sum;
                        int v = xo + (bb * t + j) * 3 * c + 2 * c + h * hd;
                        for (int x = 0; x < hd; x++) O[o + x] += w * X[v + x];
                    }
                    L[lo + (bb * heads + h) * t + i] = max + Math.log(sum);
                }
            }
        });
        round(out);
        round(lse);
    }

    static void backward(Tensor dout, Tensor qkv, Tensor out, Tensor lse, int heads, Tensor dqkv) {
        int[] d = Checks.attention("attentionBackward", qkv, heads, out, lse);
        int b = d[0], t = d[1], c = d[2], hd = d[3];
        Checks.matrix("attentionBackward", "dout", dout, (long) b * t, c);
        Checks.matrix("attentionBackward", "dqkv", dqkv, (long) b * t, 3L * c);
        double[] X = data(qkv), O = data(out), L = data(lse), DO = data(dout), DX = data(dqkv);
        int xo = off(qkv), oo = off(out), lo = off(lse), doo = off(dout), dxo = off(dqkv);
        double scale = 1.0 / Math.sqrt(hd);
        Parallel.range(b * heads, 1, (s, e) -> {
            double[] p = new double[t];
            for (int bh = s; bh < e; bh++) {
                int bb = bh / heads, h = bh % heads;
                // Zero this head's slice of dq, dk, dv: the loops below accumulate into them.
                for (int i = 0; i < t; i++) {
                    int r = dxo + (bb * t + i) * 3 * c + h * hd;
                    for (int x = 0; x < hd; x++) { DX[r + x] = 0; DX[r + c + x] = 0; DX[r + 2 * c + x] = 0; }
                }
                for (int i = 0; i < t; i++) {
                    int q = xo + (bb * t + i) * 3 * c + h * hd;
                    int go = doo + (bb * t + i) * c + h * hd;
                    int o = oo + (bb * t + i) * c + h * hd;
                    double lseI = L[lo + (bb * heads + h) * t + i];
                    double delta = 0;  // sum_j p_j * dp_j = dout_i . out_i
                    for (int x = 0; x < hd; x++) delta += DO[go + x] * O[o + x];
                    for (int j = 0; j <= i; j++) {
                        int k = xo + (bb * t + j) * 3 * c + c + h * hd;
                        double dot = 0;
                        for (int x = 0; x < hd; x++) dot += X[q + x] * X[k + x];
                        p[j] = Math.exp(dot * scale - lseI);
                    }
                    int dq = dxo + (bb * t + i) * 3 * c + h * hd;
                    for (int j = 0; j <= i; j++) {
                        int k = xo + (bb * t + j) * 3 * c + c + h * hd;
                        int v = k + c;
                        int dk = dxo + (bb * t + j) * 3 * c + c + h * hd;
                        int dv = dk + c;
                        double dp = 0;
                        for (int x = 0; x < hd; x++) { dp += DO[go + x] * X[v + x]; DX[dv + x] += p[j] * DO[go + x]; }
                        double ds = p[j] * (dp - delta) * scale;
                        for (int x = 0; x < hd; x++) { DX[dq + x] += ds * X[k + x]; DX[dk + x] += ds * X[q + x]; }
                    }
                }
            }
        });
        round(dqkv);
    }
}
