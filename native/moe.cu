// MoE routing: the fused gate (softmax + top-k + slot assignment + l_aux / z-loss) and its backward, and the
// index-based permute (dispatch) / unpermute (weighted combine) with its backward.
// Letters: S tokens, E experts, k choices per token, M hidden width, C capacity (slots per expert).
// Semantics follow DeepSpeed's top1gating / top2gating generalised to top-k (see GateSpec / GateOutputs):
// choice j's slots at an expert come after all slots of choices < j, in token order within a choice;
// l_aux = E * sum_e mean_s(gates[s,e]) * mean_s(first-choice mask[s,e]); z-loss = mean_s logsumexp(logits[s])^2.
#include "common.cuh"
#include <float.h>

extern "C" {

// Gumbel(0,1) noise of logits[s,e] (GateSpec): u = ((w0 >> 8) + 0.5) * 2^-24 from Philox(seed, offset + s*E + e), fp64.
__device__ __forceinline__ double gumbel(unsigned long long seed, unsigned long long counter) {
    uint4 b = philox(seed, counter);
    double u = ((double)(b.x >> 8) + 0.5) * 0x1.0p-24;
    return -log(-log(u));
}

// Per token (one warp each, its lanes over the experts so that rows are read coalesced): gates[s,:] =
// softmax(logits[s,:]); experts[s,j] = argmax over experts not yet chosen of logits (+ Gumbel noise: choice 0 with
// rsample, later ones with secondSampling); ties: lowest index (exact, whatever the reduction order). lse[s] saved
// for the z-loss. logits, gates [S,E]; experts [S,k].
__global__ void k_gate_topk(const void* logits, int ldt, void* gates, int gdt, int* experts, float* lse, int S, int E, int k,
                            int rsample, int secondSampling, unsigned long long seed, unsigned long long offset) {
    int s = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (s >= S) return;   // the whole warp
    i64 base = (i64)s * E;
    float m = -INFINITY;
    for (int e = lane; e < E; e += 32) m = fmaxf(m, ld(logits, ldt, base + e));
    m = warpMax(m);
    float sum = 0.f;
    for (int e = lane; e < E; e += 32) sum += expf(ld(logits, ldt, base + e) - m);
    float l = m + logf(warpSum(sum));
    if (lane == 0) lse[s] = l;
    for (int e = lane; e < E; e += 32) st(gates, gdt, base + e, expf(ld(logits, ldt, base + e) - l));
    for (int j = 0; j < k; j++) {
        bool noisy = j == 0 ? rsample != 0 : secondSampling != 0;
        int best = -1;
        double bv = 0.0;
        for (int e = lane; e < E; e += 32) {
            bool taken = false;
            for (int jj = 0; jj < j; jj++) taken |= experts[(i64)s * k + jj] == e;
            if (taken) continue;
            double v = (double)ld(logits, ldt, base + e) + (noisy ? gumbel(seed, offset + (unsigned long long)base + e) : 0.0);
            if (best < 0 || v > bv) { best = e; bv = v; }
        }
        for (int o = 16; o > 0; o >>= 1) {
            int oe = __shfl_xor_sync(0xffffffffu, best, o);
            double ov = __shfl_xor_sync(0xffffffffu, bv, o);
            if (oe >= 0 && (best < 0 || ov > bv || (ov == bv && oe < best))) { best = oe; bv = ov; }
        }
        if (lane == 0) experts[(i64)s * k + j] = best;
        __syncwarp();   // the next choice reads this one
    }
}

// One block per expert e (grid E): per choice rank j, cnt[j*E+e] = tokens whose choice j is e, and
// rankBase[j*E+e] = choices of ranks < j sent to e (before dropping); counts[e] over all ranks;
// lauxPart[e] = mean_s(gates[s,e]) * first-choice count / S. Block reductions in a fixed order: deterministic.
__global__ void k_gate_counts(const int* experts, const void* gates, int gdt, int S, int E, int k,
                              int* rankBase, int* counts, float* lauxPart) {
    int e = blockIdx.x;
    int total = 0, first = 0;
    for (int j = 0; j < k; j++) {
        float c = 0.f;
        for (int s = threadIdx.x; s < S; s += blockDim.x) c += experts[(i64)s * k + j] == e ? 1.f : 0.f;
        int cj = (int)(blockSum(c) + 0.5f);
        if (threadIdx.x == 0) rankBase[j * E + e] = total;
        if (j == 0) first = cj;
        total += cj;
    }
    float me = 0.f;
    for (int s = threadIdx.x; s < S; s += blockDim.x) me += ld(gates, gdt, (i64)s * E + e);
    me = blockSum(me);
    if (threadIdx.x == 0) {
        counts[e] = total;
        lauxPart[e] = (me / S) * ((float)first / S);
    }
}

// One block: offsets (capacity: e*C; dropless: exclusive cumsum of counts), l_aux = E * sum_e lauxPart[e],
// z-loss = mean_s lse[s]^2.
__global__ void k_gate_finish(const int* counts, const float* lauxPart, const float* lse, int S, int E, int capacity,
                              int* offsets, void* losses, int lodt) {
    float laux = 0.f;
    for (int e = threadIdx.x; e < E; e += blockDim.x) laux += lauxPart[e];
    laux = blockSum(laux) * E;
    float z = 0.f;
    for (int s = threadIdx.x; s < S; s += blockDim.x) z += lse[s] * lse[s];
    z = blockSum(z) / S;
    if (threadIdx.x == 0) {
        int acc = 0;
        for (int e = 0; e < E; e++) {
            offsets[e] = capacity > 0 ? e * capacity : acc;
            acc += counts[e];
        }
        offsets[E] = capacity > 0 ? E * capacity : acc;
        st(losses, lodt, 0, laux);
        st(losses, lodt, 1, z);
    }
}

// Position-order slots (no RTS), grid (E, k), 1024 threads: block (e, j) walks the tokens in order in chunks
// of blockDim and gives each rank-j token sent to e the next slot (a block-wide exclusive scan of the flags).
__global__ void k_gate_slots_scan(const int* experts, const int* rankBase, const int* offsets, int S, int E, int k,
                                  int capacity, int* dest) {
    __shared__ int warpCount[32];
    __shared__ int running;
    int e = blockIdx.x, j = blockIdx.y;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (threadIdx.x == 0) running = rankBase[j * E + e];
    __syncthreads();
    for (int base = 0; base < S; base += blockDim.x) {
        int s = base + threadIdx.x;
        bool flag = s < S && experts[(i64)s * k + j] == e;
        unsigned ballot = __ballot_sync(0xffffffffu, flag);
        if (lane == 0) warpCount[warp] = __popc(ballot);
        __syncthreads();
        int before = running;
        for (int w = 0; w < warp; w++) before += warpCount[w];
        before += __popc(ballot & ((1u << lane) - 1u));
        if (flag) {
            int slot = before;
            dest[(i64)s * k + j] = capacity > 0 ? (slot < capacity ? e * capacity + slot : -1) : offsets[e] + slot;
        }
        __syncthreads();
        if (threadIdx.x == 0) { int t = 0; for (int w = 0; w < nw; w++) t += warpCount[w]; running += t; }
        __syncthreads();
    }
}

// RTS priorities, one thread per (s, j): prio[s*k + j] = uniform(seed, offset + S*E + s*k + j) (GateSpec's counters)
__global__ void k_gate_priorities(int S, int E, int k, unsigned long long seed, unsigned long long offset, float* prio) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)S * k) return;
    prio[i] = (float)(philox(seed, offset + (unsigned long long)S * E + (unsigned long long)i).x >> 8) * 0x1.0p-24f;
}

// RTS slots. One thread per (s, j): slot = rankBase[j][e] + the rank of s among the rank-j tokens sent to e in
// descending priority, ties by position. Kept iff dropless or slot < capacity. O(S) per thread; the warp's
// threads read the same token at each step (broadcast loads).
__global__ void k_gate_slots(const int* experts, const int* rankBase, const int* offsets, const float* prio, int S, int E, int k,
                             int capacity, int* dest) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)S * k) return;
    int s = (int)(i / k), j = (int)(i % k), e = experts[i];
    float ps = prio[i];
    int r = 0;
    for (int t = 0; t < S; t++) {
        if (experts[(i64)t * k + j] != e || t == s) continue;
        float pt = prio[(i64)t * k + j];
        r += pt > ps || (pt == ps && t < s);
    }
    int slot = rankBase[j * E + e] + r;
    dest[i] = capacity > 0 ? (slot < capacity ? e * capacity + slot : -1) : offsets[e] + slot;
}

// first[e] = number of tokens whose first choice is e (the l_aux statistic); one block per expert
__global__ void k_gate_first_counts(const int* experts, int S, int E, int k, int* first) {
    int e = blockIdx.x;
    float c = 0.f;
    for (int s = threadIdx.x; s < S; s += blockDim.x) c += experts[(i64)s * k] == e ? 1.f : 0.f;
    c = blockSum(c);
    if (threadIdx.x == 0) first[e] = (int)(c + 0.5f);
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

// Backward of the gate, one warp per token: dlogits [S,E] (assigned) from dweights [S,k], the l_aux term
// (d l_aux / d gates[s,e] = E * first[e] / S^2, first = first-choice counts) and the z-loss term (2 * lse * softmax / S).
__global__ void k_gate_bwd(const void* logits, int ldt, const void* gates, int gdt, const int* experts, const int* dest,
                           const void* dweights, int dwdt, const int* first, float lauxCoeff, float zlossCoeff,
                           void* dlogits, int dldt, int S, int E, int k) {
    // one warp per token, its lanes over the experts: the [S, E] rows are read coalesced (a thread per token
    // strided through them E elements apart); the sums over experts are warp reductions
    int s = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (s >= S) return;   // the whole warp
    i64 base = (i64)s * E, kb = (i64)s * k;
    // renormalisation of the kept gate values (k >= 2); k is small, every lane computes it
    float denomRaw = 0.f, wsum = 0.f;
    for (int j = 0; j < k; j++)
        if (dest[kb + j] >= 0) {
            float g = ld(gates, gdt, base + experts[kb + j]);
            denomRaw += g;
            wsum += ld(dweights, dwdt, kb + j) * g;
        }
    float denom = fmaxf(denomRaw, FLT_EPSILON);
    bool clamped = denomRaw < FLT_EPSILON;
    float m = -INFINITY;
    for (int e = lane; e < E; e += 32) m = fmaxf(m, ld(logits, ldt, base + e));
    m = warpMax(m);
    float sum = 0.f;
    for (int e = lane; e < E; e += 32) sum += expf(ld(logits, ldt, base + e) - m);
    float lse = m + logf(warpSum(sum));
    float lauxScale = lauxCoeff * (float)E / ((float)S * (float)S);
    // dg_e = d loss / d gates[s,e]; two passes: the softmax backward needs sum_e g_e dg_e first
    float dot = 0.f;
    for (int pass = 0; pass < 2; pass++) {
        for (int e = lane; e < E; e += 32) {
            float dg = lauxScale * (float)first[e];
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
        if (pass == 0) dot = warpSum(dot);
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

// k_moe_permute on bf16 x and buf with M % 8 == 0, 8 columns per thread (16-byte copies); n8 = S * k * M / 8 (< 2^31).
__global__ void k_moe_permute_bf16x8(const uint4* x, const int* dest, uint4* buf, int n8, int k, int m8) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += gridDim.x * blockDim.x) {
        int sk = i / m8, c = i - sk * m8;
        int d = dest[sk];
        if (d >= 0) buf[(i64)d * m8 + c] = x[(i64)(sk / k) * m8 + c];
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

// k_moe_unpermute on bf16 buf and out with M % 8 == 0, 8 columns per thread (16-byte loads and stores); the same
// fp32 sum in the same order. n8 = S * M / 8 (< 2^31: 32-bit index math), m8 = M / 8.
__global__ void k_moe_unpermute_bf16x8(const uint4* buf, const int* dest, const void* w, int wdt, uint4* out, int n8, int k, int m8) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += gridDim.x * blockDim.x) {
        int s = i / m8, c = i - s * m8;
        float acc[8] = {};
        for (int j = 0; j < k; j++) {
            int d = dest[s * k + j];
            if (d < 0) continue;
            float wj = w == nullptr ? 1.f : ld(w, wdt, (i64)s * k + j);
            uint4 v = buf[(i64)d * m8 + c];
            const __nv_bfloat162* h = (const __nv_bfloat162*)&v;
#pragma unroll
            for (int q = 0; q < 4; q++) {
                float2 f = __bfloat1622float2(h[q]);
                acc[2 * q] += wj * f.x;
                acc[2 * q + 1] += wj * f.y;
            }
        }
        uint4 r;
        __nv_bfloat162* h = (__nv_bfloat162*)&r;
#pragma unroll
        for (int q = 0; q < 4; q++) h[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
        out[i] = r;
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

// k_moe_unpermute_bwd_dbuf on bf16 dout and dbuf with M % 8 == 0, 8 columns per thread; n8 = S * k * M / 8 (< 2^31).
__global__ void k_moe_unpermute_bwd_dbuf_bf16x8(const uint4* dout, const int* dest, const void* w, int wdt, uint4* dbuf, int n8, int k, int m8) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += gridDim.x * blockDim.x) {
        int sk = i / m8, c = i - sk * m8;
        int d = dest[sk];
        if (d < 0) continue;
        float wj = w == nullptr ? 1.f : ld(w, wdt, sk);
        uint4 v = dout[(i64)(sk / k) * m8 + c];
        __nv_bfloat162* h = (__nv_bfloat162*)&v;
#pragma unroll
        for (int q = 0; q < 4; q++) {
            float2 f = __bfloat1622float2(h[q]);
            h[q] = __floats2bfloat162_rn(wj * f.x, wj * f.y);
        }
        dbuf[(i64)d * m8 + c] = v;
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


// k_moe_unpermute_bwd_dw on bf16 dout and buf with M % 8 == 0: a warp per (s, j), 16-byte loads, a warp sum.
__global__ void k_moe_unpermute_bwd_dw_bf16x8(const uint4* dout, const uint4* buf, const int* dest, void* dw, int dwdt, int SK, int k, int m8) {
    int sk = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (sk >= SK) return;   // the whole warp
    int d = dest[sk];
    float acc = 0.f;
    if (d >= 0) {
        const uint4* a = dout + (i64)(sk / k) * m8;
        const uint4* b = buf + (i64)d * m8;
        for (int c = lane; c < m8; c += 32) {
            uint4 va = a[c], vb = b[c];
            const __nv_bfloat162* ha = (const __nv_bfloat162*)&va;
            const __nv_bfloat162* hb = (const __nv_bfloat162*)&vb;
#pragma unroll
            for (int q = 0; q < 4; q++) {
                float2 x = __bfloat1622float2(ha[q]), y = __bfloat1622float2(hb[q]);
                acc += x.x * y.x + x.y * y.y;
            }
        }
    }
    acc = warpSum(acc);
    if (lane == 0) st(dw, dwdt, sk, acc);
}

}  // extern "C"
