// MoE routing: the fused gate (softmax + top-k + slot assignment + l_aux / z-loss) and its backward, and the
// index-based permute (dispatch) / unpermute (weighted combine) with its backward.
// Letters: S tokens, E experts, k choices per token, M hidden width, C capacity (slots per expert).
// Semantics follow DeepSpeed's top1gating / top2gating generalised to top-k (see GateSpec / GateOutputs):
// choice j's slots at an expert come after all slots of choices < j, in token order within a choice;
// l_aux = E * sum_e mean_s(gates[s,e]) * mean_s(first-choice mask[s,e]); z-loss = mean_s logsumexp(logits[s])^2.
#include "common.cuh"
#include <float.h>

extern "C" {

// Per token (one thread each): gates[s,:] = softmax(logits[s,:]); experts[s,j] = j-th largest logit
// (ties: lowest index, like torch.argmax); lse[s] saved for the z-loss. logits, gates [S,E]; experts [S,k].
__global__ void k_gate_topk(const void* logits, int ldt, void* gates, int gdt, int* experts, float* lse, int S, int E, int k) {
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= S) return;
    i64 base = (i64)s * E;
    float m = -INFINITY;
    for (int e = 0; e < E; e++) m = fmaxf(m, ld(logits, ldt, base + e));
    float sum = 0.f;
    for (int e = 0; e < E; e++) sum += expf(ld(logits, ldt, base + e) - m);
    float l = m + logf(sum);
    lse[s] = l;
    for (int e = 0; e < E; e++) st(gates, gdt, base + e, expf(ld(logits, ldt, base + e) - l));
    for (int j = 0; j < k; j++) {
        int best = -1;
        float bv = -INFINITY;
        for (int e = 0; e < E; e++) {
            bool taken = false;
            for (int jj = 0; jj < j; jj++) taken |= experts[(i64)s * k + jj] == e;
            float v = ld(logits, ldt, base + e);
            if (!taken && (best < 0 || v > bv)) { best = e; bv = v; }
        }
        experts[(i64)s * k + j] = best;
    }
}

// One block: per expert e (threads stride over E) counts its tokens, assigns slots in (choice, token) order
// and writes dest, counts, offsets and the two losses. Fixed loop orders: deterministic.
// shared: total[E], first[E] ints. capacity <= 0: dropless (buffer sorted by expert, offsets = cumsum).
__global__ void k_gate_assign(const int* experts, const void* gates, int gdt, const float* lse, int S, int E, int k,
                              int capacity, int* dest, int* counts, int* offsets, void* losses, int lodt) {
    extern __shared__ int shi[];
    int* total = shi;
    int* first = shi + E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int t = 0, f = 0;
        for (int j = 0; j < k; j++)
            for (int s = 0; s < S; s++)
                if (experts[(i64)s * k + j] == e) { t++; if (j == 0) f++; }
        total[e] = t;
        first[e] = f;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int acc = 0;
        for (int e = 0; e < E; e++) {
            offsets[e] = capacity > 0 ? e * capacity : acc;
            acc += total[e];
        }
        offsets[E] = capacity > 0 ? E * capacity : acc;
    }
    __syncthreads();
    float laux = 0.f;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int cnt = 0, start = offsets[e];
        for (int j = 0; j < k; j++)
            for (int s = 0; s < S; s++)
                if (experts[(i64)s * k + j] == e) {
                    int loc = cnt++;
                    dest[(i64)s * k + j] = capacity > 0 ? (loc < capacity ? e * capacity + loc : -1) : start + loc;
                }
        counts[e] = first[e];
        float me = 0.f;
        for (int s = 0; s < S; s++) me += ld(gates, gdt, (i64)s * E + e);
        laux += (me / S) * ((float)first[e] / S);
    }
    laux = blockSum(laux) * E;
    float z = 0.f;
    for (int s = threadIdx.x; s < S; s += blockDim.x) z += lse[s] * lse[s];
    z = blockSum(z) / S;
    if (threadIdx.x == 0) { st(losses, lodt, 0, laux); st(losses, lodt, 1, z); }
}

// Combine weights per token: k = 1: the gate value if kept, else 0; k >= 2: renormalised over the kept
// choices, denominator clamped at FLT_EPSILON (DeepSpeed clamps at the dtype's eps). weights [S,k].
__global__ void k_gate_weights(const void* gates, int gdt, const int* experts, const int* dest, void* weights, int wdt, int S, int E, int k) {
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= S) return;
    float denom = 0.f;
    for (int j = 0; j < k; j++)
        if (dest[(i64)s * k + j] >= 0) denom += ld(gates, gdt, (i64)s * E + experts[(i64)s * k + j]);
    denom = fmaxf(denom, FLT_EPSILON);
    for (int j = 0; j < k; j++) {
        float g = dest[(i64)s * k + j] >= 0 ? ld(gates, gdt, (i64)s * E + experts[(i64)s * k + j]) : 0.f;
        st(weights, wdt, (i64)s * k + j, k == 1 ? g : g / denom);
    }
}

// Backward of the gate, one thread per token: dlogits [S,E] (assigned) from dweights [S,k], the l_aux term
// (d l_aux / d gates[s,e] = E * counts[e] / S^2) and the z-loss term (2 * lse * softmax / S).
__global__ void k_gate_bwd(const void* logits, int ldt, const void* gates, int gdt, const int* experts, const int* dest,
                           const void* dweights, int dwdt, const int* counts, float lauxCoeff, float zlossCoeff,
                           void* dlogits, int dldt, int S, int E, int k) {
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= S) return;
    i64 base = (i64)s * E, kb = (i64)s * k;
    // renormalisation of the kept gate values (k >= 2)
    float denomRaw = 0.f, wsum = 0.f;
    for (int j = 0; j < k; j++)
        if (dest[kb + j] >= 0) {
            float g = ld(gates, gdt, base + experts[kb + j]);
            denomRaw += g;
            wsum += ld(dweights, dwdt, kb + j) * g;
        }
    float denom = fmaxf(denomRaw, FLT_EPSILON);
    bool clamped = !(denomRaw > FLT_EPSILON);
    float m = -INFINITY;
    for (int e = 0; e < E; e++) m = fmaxf(m, ld(logits, ldt, base + e));
    float sum = 0.f;
    for (int e = 0; e < E; e++) sum += expf(ld(logits, ldt, base + e) - m);
    float lse = m + logf(sum);
    float lauxScale = lauxCoeff * (float)E / ((float)S * (float)S);
    // dg_e = d loss / d gates[s,e]; two passes: the softmax backward needs sum_e g_e dg_e first
    float dot = 0.f;
    for (int pass = 0; pass < 2; pass++) {
        for (int e = 0; e < E; e++) {
            float dg = lauxScale * (float)counts[e];
            for (int j = 0; j < k; j++) {
                if (experts[kb + j] != e || dest[kb + j] < 0) continue;
                float dw = ld(dweights, dwdt, kb + j);
                if (k == 1) dg += dw;
                else dg += dw / denom - (clamped ? 0.f : wsum / (denom * denom));
            }
            float g = ld(gates, gdt, base + e);
            if (pass == 0) dot += g * dg;
            else st(dlogits, dldt, base + e, g * (dg - dot) + zlossCoeff * 2.f * lse * g / (float)S);
        }
    }
}

// buf[dest[s,j], c] = x[s, c] for dest >= 0; x [S,M], dest [S,k], buf [R,M]; n = S*k*M
__global__ void k_moe_permute(const void* x, int xdt, const int* dest, void* buf, int bdt, i64 n, int k, int M) {
    FOR_N(i, n) {
        i64 sk = i / M; int c = (int)(i % M);
        int d = dest[sk];
        if (d >= 0) st(buf, bdt, (i64)d * M + c, ld(x, xdt, (sk / k) * M + c));
    }
}

// out[s, c] = sum_j w[s,j] * buf[dest[s,j], c] over dest >= 0 (w nullable: 1); n = S*M
__global__ void k_moe_unpermute(const void* buf, int bdt, const int* dest, const void* w, int wdt, void* out, int odt, i64 n, int k, int M) {
    FOR_N(i, n) {
        i64 s = i / M; int c = (int)(i % M);
        float acc = 0.f;
        for (int j = 0; j < k; j++) {
            int d = dest[s * k + j];
            if (d < 0) continue;
            acc += (w == nullptr ? 1.f : ld(w, wdt, s * k + j)) * ld(buf, bdt, (i64)d * M + c);
        }
        st(out, odt, i, acc);
    }
}

// dbuf[dest[s,j], c] = w[s,j] * dout[s, c] (w nullable: 1); n = S*k*M
__global__ void k_moe_unpermute_bwd_dbuf(const void* dout, int gdt, const int* dest, const void* w, int wdt, void* dbuf, int bdt, i64 n, int k, int M) {
    FOR_N(i, n) {
        i64 sk = i / M; int c = (int)(i % M);
        int d = dest[sk];
        if (d >= 0) st(dbuf, bdt, (i64)d * M + c, (w == nullptr ? 1.f : ld(w, wdt, sk)) * ld(dout, gdt, (sk / k) * M + c));
    }
}

// dw[s,j] = dot(dout[s], buf[dest[s,j]]), 0 where dest < 0; one block per (s, j)
__global__ void k_moe_unpermute_bwd_dw(const void* dout, int gdt, const void* buf, int bdt, const int* dest, void* dw, int dwdt, int k, int M) {
    i64 sk = blockIdx.x;
    int d = dest[sk];
    float acc = 0.f;
    if (d >= 0)
        for (int c = threadIdx.x; c < M; c += blockDim.x) acc += ld(dout, gdt, (sk / k) * M + c) * ld(buf, bdt, (i64)d * M + c);
    acc = blockSum(acc);
    if (threadIdx.x == 0) st(dw, dwdt, sk, acc);
}

}  // extern "C"
