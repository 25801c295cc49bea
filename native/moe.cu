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

// The warp's (value, expert) maximum; ties to the lower expert; best < 0: none.
__device__ __forceinline__ void warpArgmax(int& best, double& bv) {
    for (int o = 16; o > 0; o >>= 1) {
        int oe = __shfl_xor_sync(0xffffffffu, best, o);
        double ov = __shfl_xor_sync(0xffffffffu, bv, o);
        if (oe >= 0 && (best < 0 || ov > bv || (ov == bv && oe < best))) { best = oe; bv = ov; }
    }
}

// Per token (one warp each, its lanes over the experts so that rows are read coalesced): gates[s,:] =
// softmax(logits[s,:]); experts[s,j] = argmax over experts not yet chosen of logits (+ Gumbel noise: choice 0 with
// rsample, later ones with secondSampling); ties: lowest index (exact, whatever the reduction order). lse[s] saved
// for the z-loss. logits, gates [S,E]; experts [S,k]. With pieces (fp32 [S][npieces][E], the partial products of an
// fp32 gate weight's bf16 pieces: f32_split.cu) the logits (fp32) are their sum, added in k_sum_pieces' order and
// written here: the product's own pass that would sum them saved.
__global__ void k_gate_topk(void* logits, int ldt, const float* pieces, int npieces, void* gates, int gdt, int* experts, float* lse,
                            int S, int E, int k, int rsample, int secondSampling, unsigned long long seed, unsigned long long offset) {
    int s = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (s >= S) return;   // the whole warp
    i64 base = (i64)s * E;
    float m = -INFINITY;
    if (pieces != nullptr) {   // each lane reads back only what it wrote itself below
        const float* row = pieces + (i64)s * npieces * E;
        for (int e = lane; e < E; e += 32) {
            float v = 0.f;
            for (int p = 0; p < npieces; p++) v += row[(i64)p * E + e];
            ((float*)logits)[base + e] = v;
            m = fmaxf(m, v);
        }
    } else {
        for (int e = lane; e < E; e += 32) m = fmaxf(m, ld(logits, ldt, base + e));
    }
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
        warpArgmax(best, bv);
        if (lane == 0) experts[(i64)s * k + j] = best;
        __syncwarp();   // the next choice reads this one
    }
}

// Slots, counts, offsets and losses take three kernels after k_gate_topk: k_gate_tile (per tile of T tokens),
// k_gate_scan (per expert, across tiles) and k_gate_dest (per token). All sums are in fixed orders, so every
// result is deterministic and the integer results do not depend on the tile size.

// sum_{i < n} p[i0 + i * stride] in order; the dtype test sits outside the loop so that the loads can go out together.
__device__ __forceinline__ float stridedSum(const void* p, int dt, i64 i0, i64 stride, int n) {
    float v = 0.f;
    if (dt == DT_F32) {
        const float* f = (const float*)p + i0;
#pragma unroll 8
        for (int i = 0; i < n; i++) v += f[i * stride];
    } else {
#pragma unroll 8
        for (int i = 0; i < n; i++) v += ld(p, dt, i0 + i * stride);
    }
    return v;
}

// Routing 1/3, one block per tile of T tokens (T a multiple of 32 that divides blockDim <= 256). The threads form
// G = blockDim / T groups of T, one token each; group g takes the choices j = g, g + G, ... For each (s, j): the
// rank of s among the tile's tokens whose choice j is the same expert, in token order (__match_any_sync in the
// warp plus the counts of the group's earlier warps), parked in dest[s,j] for k_gate_dest; cnt[tile][j][e] =
// the tile's tokens whose choice j is e. gsum[tile][e] = sum of gates[s,e] over the tile's rows (rows read
// coalesced; fixed order). Dynamic shared memory: (blockDim / 32) * E ints. Also zeroes k_gate_scan's ticket (it
// runs next on the stream), which saves a memset.
__global__ void k_gate_tile(const int* __restrict__ experts, const void* __restrict__ gates, int gdt, int S, int E, int k, int T,
                            int* __restrict__ dest, int* __restrict__ cnt, float* __restrict__ gsum, int* __restrict__ scanTicket) {
    extern __shared__ int gateWarpCount[];   // [warp][e]: the warp's tokens sent to e at its group's current choice
    __shared__ float colPart[256];
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nt = blockDim.x, nw = nt >> 5;
    int tile = blockIdx.x, s0 = tile * T, rows = min(T, S - s0);
    if (tile == 0 && tid == 0) *scanTicket = 0;
    if (E <= nt) {   // R = nt / E row groups of E threads, then the R partial sums in order
        int R = nt / E, r = tid / E, e = tid - r * E;
        colPart[tid] = r < R && r < rows ? stridedSum(gates, gdt, (i64)(s0 + r) * E + e, (i64)R * E, (rows - r + R - 1) / R) : 0.f;
        __syncthreads();
        if (tid < E) {
            float t = 0.f;
            for (int q = 0; q < R; q++) t += colPart[q * E + tid];
            gsum[(i64)tile * E + tid] = t;
        }
    } else {
        for (int e = tid; e < E; e += nt) gsum[(i64)tile * E + e] = stridedSum(gates, gdt, (i64)s0 * E + e, E, rows);
    }
    for (int i = tid; i < nw * E; i += nt) gateWarpCount[i] = 0;
    __syncthreads();
    int G = nt / T, g = tid / T, wpg = T >> 5, w0 = g * wpg;   // w0: the group's first warp
    int s = s0 + (tid - g * T);
    for (int j0 = 0; j0 < k; j0 += G) {   // the same trip count in every thread: the barriers below are block-wide
        int j = j0 + g;
        int e = j < k && s < S ? experts[(i64)s * k + j] : -1;
        unsigned peers = __match_any_sync(0xffffffffu, e);
        int rank = __popc(peers & ((1u << lane) - 1u));
        if (e >= 0 && rank == 0) gateWarpCount[warp * E + e] = __popc(peers);
        __syncthreads();
        if (e >= 0) {
            for (int w = w0; w < warp; w++) rank += gateWarpCount[w * E + e];
            dest[(i64)s * k + j] = rank;
        }
        __syncthreads();   // every rank read before the counts are summed and cleared
        for (int i = tid; i < G * E; i += nt) {
            int gg = i / E, ee = i - gg * E, t = 0;
            for (int w = gg * wpg; w < (gg + 1) * wpg; w++) {
                t += gateWarpCount[w * E + ee];
                gateWarpCount[w * E + ee] = 0;
            }
            if (j0 + gg < k) cnt[((i64)tile * k + j0 + gg) * E + ee] = t;
        }
        __syncthreads();
    }
}

// Routing 2/3, a warp per expert e (8 per block of 256 threads), its lanes over contiguous ranges of tiles,
// choice by choice: base[tile][j][e] = rankBase[j][e] + the choice-j tokens sent to e by earlier tiles, rankBase[j][e]
// = choices of ranks < j sent to e (before dropping; base[0] is the [k][E] rankBase that k_gate_slots reads);
// counts[e] over all ranks; laux[e] = mean_s(gates[s,e]) * first-choice count[e] / S from the tiles' column sums.
// Every block also sums lse^2 over its share of the tokens into zpart[block]. The last block to finish (ticket,
// zeroed by k_gate_tile) adds them up: l_aux = E * sum_e laux[e], z-loss = sum zpart / S, and writes the offsets
// (capacity: e*C; dropless: exclusive cumsum of counts, a block scan). All sums in fixed orders: deterministic.
__global__ void k_gate_scan(const int* __restrict__ cnt, const float* __restrict__ gsum, const float* __restrict__ lse,
                            int S, int E, int k, int nTiles, int capacity, int* __restrict__ base, int* counts, int* offsets,
                            void* losses, int lodt, float* laux, float* zpart, int* ticket) {
    __shared__ int warpTotal[32];
    __shared__ bool last;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nt = blockDim.x, nw = nt >> 5;
    int e = blockIdx.x * nw + warp;
    if (e < E) {   // the whole warp
        int per = (nTiles + 31) / 32, c0 = min(nTiles, lane * per), c1 = min(nTiles, c0 + per);
        int total = 0, first = 0;
        for (int j = 0; j < k; j++) {
            int part = 0;
            for (int c = c0; c < c1; c++) part += cnt[((i64)c * k + j) * E + e];
            int inc = part;   // inclusive scan over the lanes
            for (int o = 1; o < 32; o <<= 1) {
                int v = __shfl_up_sync(0xffffffffu, inc, o);
                if (lane >= o) inc += v;
            }
            int b = total + inc - part;
            for (int c = c0; c < c1; c++) {
                i64 i = ((i64)c * k + j) * E + e;
                base[i] = b;
                b += cnt[i];
            }
            int tj = __shfl_sync(0xffffffffu, inc, 31);
            if (j == 0) first = tj;
            total += tj;
        }
        float me = 0.f;
        for (int c = c0; c < c1; c++) me += gsum[(i64)c * E + e];
        me = warpSum(me);
        if (lane == 0) {
            counts[e] = total;
            laux[e] = (me / S) * ((float)first / S);
        }
    }
    float z = 0.f;
    for (int s = blockIdx.x * nt + tid; s < S; s += gridDim.x * nt) z += lse[s] * lse[s];
    z = blockSum(z);
    if (tid == 0) zpart[blockIdx.x] = z;
    __threadfence();   // this block's counts, laux and zpart visible before its ticket
    __syncthreads();
    if (tid == 0) last = atomicAdd(ticket, 1) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    // the last block: every other block's results are in L2 (read past L1 with __ldcg)
    float l = 0.f;
    for (int i = tid; i < E; i += nt) l += __ldcg(laux + i);
    l = blockSum(l) * E;
    z = 0.f;
    for (int i = tid; i < gridDim.x; i += nt) z += __ldcg(zpart + i);
    z = blockSum(z) / S;
    if (tid == 0) {
        st(losses, lodt, 0, l);
        st(losses, lodt, 1, z);
    }
    if (capacity > 0) {
        for (int i = tid; i <= E; i += nt) offsets[i] = i * capacity;
        return;
    }
    int run = 0;   // counts of the earlier pieces, the same in every thread
    for (int e0 = 0; e0 < E; e0 += nt) {
        int i = e0 + tid, v = i < E ? __ldcg(counts + i) : 0, inc = v;
        for (int o = 1; o < 32; o <<= 1) {
            int u = __shfl_up_sync(0xffffffffu, inc, o);
            if (lane >= o) inc += u;
        }
        if (lane == 31) warpTotal[warp] = inc;
        __syncthreads();
        int before = run, piece = 0;
        for (int w = 0; w < nw; w++) {
            if (w == warp) before += piece;
            piece += warpTotal[w];
        }
        if (i < E) offsets[i] = before + inc - v;
        run += piece;
        __syncthreads();   // warpTotal is rewritten by the next piece
    }
    if (tid == 0) offsets[E] = run;
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

// Routing 3/3, one thread per token. Unless ranked (RTS: k_gate_slots wrote dest): slot = base[tile][j][e] + the
// rank k_gate_tile parked in dest[s,j]; dest = e*C + slot if slot < C else -1 (capacity C), offsets[e] + slot
// (dropless). Then the combine weights: k = 1: the gate value if kept, else 0; k >= 2: renormalised over the
// kept choices, denominator clamped at FLT_EPSILON (DeepSpeed clamps at the dtype's eps). weights [S,k].
__global__ void k_gate_dest(const void* gates, int gdt, const int* experts, const int* base, const int* offsets, int* dest,
                            void* weights, int wdt, int S, int E, int k, int T, int capacity, int ranked) {
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= S) return;
    i64 kb = (i64)s * k;
    if (!ranked) {
        i64 tb = (i64)(s / T) * k;
        for (int j = 0; j < k; j++) {
            int e = experts[kb + j], slot = base[(tb + j) * E + e] + dest[kb + j];
            dest[kb + j] = capacity > 0 ? (slot < capacity ? e * capacity + slot : -1) : offsets[e] + slot;
        }
    }
    float denom = 0.f;
    for (int j = 0; j < k; j++)
        if (dest[kb + j] >= 0) denom += ld(gates, gdt, (i64)s * E + experts[kb + j]);
    denom = fmaxf(denom, FLT_EPSILON);
    for (int j = 0; j < k; j++) {
        float g = dest[kb + j] >= 0 ? ld(gates, gdt, (i64)s * E + experts[kb + j]) : 0.f;
        st(weights, wdt, kb + j, k == 1 ? g : g / denom);
    }
}

// A dropless routing in the capacity layout with capacity C (at least the largest count): dest = e*C + (dest -
// offsets[e]), offsets[e] = e*C (Backend.moeGatePad). A thread per choice and one per offset.
__global__ void k_gate_pad(const int* experts, const int* dest, const int* offsets, i64 n, int E, int capacity,
                           int* destOut, int* offsetsOut) {
    FOR_N(i, n) {
        int e = experts[i];
        destOut[i] = e * capacity + dest[i] - offsets[e];
    }
    FOR_N(e, (i64)E + 1) offsetsOut[e] = (int)e * capacity;
}

// first[e] = number of tokens whose first choice is e (the l_aux statistic; for k = 1 the backward uses counts
// instead). One block: a shared histogram, each warp's tokens of one expert added at once by their lowest lane
// (integer adds: the result is exact in any order). Dynamic shared memory: E ints.
__global__ void k_gate_first_counts(const int* experts, int S, int E, int k, int* first) {
    extern __shared__ int gateHist[];
    int lane = threadIdx.x & 31;
    for (int e = threadIdx.x; e < E; e += blockDim.x) gateHist[e] = 0;
    __syncthreads();
    for (int s0 = 0; s0 < S; s0 += blockDim.x) {   // whole warps: __match_any_sync
        int s = s0 + threadIdx.x, e = s < S ? experts[(i64)s * k] : -1;
        unsigned peers = __match_any_sync(0xffffffffu, e);
        if (e >= 0 && (peers & ((1u << lane) - 1u)) == 0) atomicAdd(&gateHist[e], __popc(peers));
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) first[e] = gateHist[e];
}

// Up to GATE_VPL * 32 experts (every config measured: E <= 128) k_gate_bwd holds its lane's row values in registers:
// the rows read once instead of once per pass (18.3 -> 15.1 us at S = 8192, E = 128 on an H100; the same for
// k_gate_topk measured 9.1 -> 10.8 us, so it keeps its loops). Same arithmetic in the same order as the general
// loops, so the same results.
constexpr int GATE_VPL = 8;

// The lane's values of a gate row (experts lane, lane + 32, ...), pad past E.
__device__ __forceinline__ void gateRow(const void* p, int dt, i64 base, int E, int lane, float pad, float (&v)[GATE_VPL]) {
#pragma unroll
    for (int t = 0; t < GATE_VPL; t++) {
        int e = lane + 32 * t;
        v[t] = e < E ? ld(p, dt, base + e) : pad;
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
    float lauxScale = lauxCoeff * (float)E / ((float)S * (float)S);
    if (E <= 32 * GATE_VPL) {   // the row in registers (see GATE_VPL); the same sums in the same order as below
        float lv[GATE_VPL], g[GATE_VPL], dg[GATE_VPL];
        gateRow(logits, ldt, base, E, lane, -INFINITY, lv);
        gateRow(gates, gdt, base, E, lane, 0.f, g);
        float m = -INFINITY, sum = 0.f, dot = 0.f;
#pragma unroll
        for (int t = 0; t < GATE_VPL; t++) m = fmaxf(m, lv[t]);
        m = warpMax(m);
#pragma unroll
        for (int t = 0; t < GATE_VPL; t++) {
            bool in = lane + 32 * t < E;
            if (in) sum += expf(lv[t] - m);
            dg[t] = in ? lauxScale * (float)first[lane + 32 * t] : 0.f;
        }
        float lse = m + logf(warpSum(sum));
        for (int j = 0; j < k; j++) {
            if (dest[kb + j] < 0) continue;
            int ej = experts[kb + j];
            float dw = ld(dweights, dwdt, kb + j);
            float add = k == 1 ? dw : dw / denom - (clamped ? 0.f : wsum / (denom * denom));
#pragma unroll
            for (int t = 0; t < GATE_VPL; t++) if (ej == lane + 32 * t) dg[t] += add;
        }
#pragma unroll
        for (int t = 0; t < GATE_VPL; t++) if (lane + 32 * t < E) dot += g[t] * dg[t];
        dot = warpSum(dot);
#pragma unroll
        for (int t = 0; t < GATE_VPL; t++) {
            if (lane + 32 * t < E) st(dlogits, dldt, base + lane + 32 * t, g[t] * (dg[t] - dot) + zlossCoeff * 2.f * lse * g[t] / (float)S);
        }
        return;
    }
    float m = -INFINITY;
    for (int e = lane; e < E; e += 32) m = fmaxf(m, ld(logits, ldt, base + e));
    m = warpMax(m);
    float sum = 0.f;
    for (int e = lane; e < E; e += 32) sum += expf(ld(logits, ldt, base + e) - m);
    float lse = m + logf(warpSum(sum));
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

}  // extern "C" (a template follows)

// The rows of buf [E*C, rowLen units] that no choice took: e*C + c for c >= min(counts[e], C), as the gate gives
// expert e's choices the slots 0 .. counts[e] - 1 (counts before dropping). Zeroed so that a dispatch writes every
// row of the buffer (the expert GEMMs read them; no zero fill of the whole buffer first). A warp per row, over
// blocks b of nb of the launch; the rows the choices took are left to the dispatch's own copy. Rows: LocalRows or
// PeerRows (the buffer's rows stored straight into the ranks' peer windows).
template <typename Rows>
__device__ __forceinline__ void zeroFreeSlots(Rows buf, int rowLen, const int* counts, int C, int R, int b, int nb) {
    int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
    for (int r = b * wpb + (threadIdx.x >> 5); r < R; r += nb * wpb) {
        int e = r / C;
        if (r - e * C < min(counts[e], C)) continue;   // the whole warp
        auto* row = buf.row(r);
        if (row == nullptr) continue;
        for (int c = lane; c < rowLen; c += 32) row[c] = {};
    }
}

// The bodies of k_moe_permute_bf16x8 and k_moe_unpermute_bwd_bf16x8 (below), over LocalRows (one buffer) or PeerRows.
template <typename Rows>
__device__ __forceinline__ void permuteBf16x8(const uint4* x, const int* dest, Rows buf, int n8, int k, int m8, int copyBlocks,
                                              const int* counts, int C, int R) {
    if ((int)blockIdx.x >= copyBlocks) {
        zeroFreeSlots(buf, m8, counts, C, R, blockIdx.x - copyBlocks, gridDim.x - copyBlocks);
        return;
    }
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += copyBlocks * blockDim.x) {
        int sk = i / m8, c = i - sk * m8;
        int d = dest[sk];
        if (d < 0) continue;
        uint4* row = buf.row(d);
        if (row != nullptr) row[c] = x[(i64)(sk / k) * m8 + c];
    }
}

template <typename Rows>
__device__ __forceinline__ void unpermuteBwdBf16x8(const uint4* dout, const uint4* buf, const int* dest, const void* w, int wdt,
                                                   Rows dbuf, void* dw, int dwdt, int SK, int k, int m8, int workBlocks,
                                                   const int* counts, int C, int R) {
    if ((int)blockIdx.x >= workBlocks) {
        zeroFreeSlots(dbuf, m8, counts, C, R, blockIdx.x - workBlocks, gridDim.x - workBlocks);
        return;
    }
    int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
    for (int sk = blockIdx.x * wpb + (threadIdx.x >> 5); sk < SK; sk += workBlocks * wpb) {   // the whole warp
        int d = dest[sk];
        float acc = 0.f;
        if (d >= 0) {
            float wj = w == nullptr ? 1.f : ld(w, wdt, sk);
            const uint4* a = dout + (i64)(sk / k) * m8;
            const uint4* b = buf + (i64)d * m8;
            uint4* o = dbuf.row(d);
#pragma unroll 4
            for (int c = lane; c < m8; c += 32) {
                uint4 va = a[c];
                __nv_bfloat162* ha = (__nv_bfloat162*)&va;
                if (dw != nullptr) {
                    uint4 vb = b[c];
                    const __nv_bfloat162* hb = (const __nv_bfloat162*)&vb;
#pragma unroll
                    for (int q = 0; q < 4; q++) {
                        float2 x = __bfloat1622float2(ha[q]), y = __bfloat1622float2(hb[q]);
                        acc += x.x * y.x + x.y * y.y;
                    }
                }
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    float2 f = __bfloat1622float2(ha[q]);
                    ha[q] = __floats2bfloat162_rn(wj * f.x, wj * f.y);
                }
                if (o != nullptr) o[c] = va;
            }
        }
        if (dw != nullptr) {
            acc = warpSum(acc);
            if (lane == 0) st(dw, dwdt, sk, acc);
        }
    }
}

extern "C" {

// zeroFreeSlots for the dtype-generic dispatch paths: rows of rowLen 16-bit units (any F32 or BF16 row).
__global__ void k_moe_zero_free_slots(unsigned short* buf, int rowLen, const int* counts, int C, int R) {
    zeroFreeSlots(LocalRows<unsigned short>{buf, rowLen}, rowLen, counts, C, R, blockIdx.x, gridDim.x);
}

// buf[dest[s,j], c] = x[s, c] for dest >= 0; x [S,M], dest [S,k], buf [R,M]; n = S*k*M
__global__ void k_moe_permute(const void* x, int xdt, const int* dest, void* buf, int bdt, i64 n, int k, int M) {
    FOR_N(i, n) {
        i64 sk = i / M; int c = (int)(i % M);
        int d = dest[sk];
        if (d >= 0) st(buf, bdt, (i64)d * M + c, ld(x, xdt, (sk / k) * M + c));
    }
}

// k_moe_permute on bf16 x and buf with M % 8 == 0, 8 columns per thread (16-byte copies) in the first copyBlocks
// blocks; n8 = S * k * M / 8 (< 2^31). The launch's further blocks (counts not null) zero the free slots of buf
// [R = E*C, M] (zeroFreeSlots), so that every row is written.
__global__ void k_moe_permute_bf16x8(const uint4* x, const int* dest, uint4* buf, int n8, int k, int m8, int copyBlocks,
                                     const int* counts, int C, int R) {
    permuteBf16x8(x, dest, LocalRows<uint4>{buf, m8}, n8, k, m8, copyBlocks, counts, C, R);
}

// k_moe_permute_bf16x8 with buf's rows in the ranks' peer windows (PeerRows: row r at row rowDest[r].y of d<rowDest[r].x>),
// the expert-parallel dispatch storing each row straight at its place in its owner's input.
__global__ void k_moe_permute_to_bf16x8(const uint4* x, const int* dest, const int* rowDest, uint4* d0, uint4* d1, uint4* d2,
                                        uint4* d3, uint4* d4, uint4* d5, uint4* d6, uint4* d7, int n8, int k, int m8,
                                        int copyBlocks, const int* counts, int C, int R) {
    permuteBf16x8(x, dest, PeerRows{rowDest, d0, d1, d2, d3, d4, d5, d6, d7, m8}, n8, k, m8, copyBlocks, counts, C, R);
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


// The combine's backward on bf16 dout, buf and dbuf with M % 8 == 0: a warp per (s, j) in the first workBlocks
// blocks reads dout's row once for both outputs, dbuf[dest[s,j]] = w[s,j] * dout[s] (w nullable: 1) and dw[s,j] =
// dot(dout[s], buf[dest[s,j]]) (fp32, a warp sum; 0 where dest < 0; dw null: not computed, buf not read), 16-byte
// loads and stores. SK = S * k. The launch's further blocks (counts not null) zero the free slots of dbuf [R = E*C, M]
// as k_moe_permute_bf16x8 does.
__global__ void k_moe_unpermute_bwd_bf16x8(const uint4* dout, const uint4* buf, const int* dest, const void* w, int wdt,
                                           uint4* dbuf, void* dw, int dwdt, int SK, int k, int m8, int workBlocks,
                                           const int* counts, int C, int R) {
    unpermuteBwdBf16x8(dout, buf, dest, w, wdt, LocalRows<uint4>{dbuf, m8}, dw, dwdt, SK, k, m8, workBlocks, counts, C, R);
}

// k_moe_unpermute_bwd_bf16x8 with dbuf's rows in the ranks' peer windows (PeerRows, as k_moe_permute_to_bf16x8): the
// expert-parallel backward storing each output-gradient row straight at its place in its owner's input.
__global__ void k_moe_unpermute_bwd_to_bf16x8(const uint4* dout, const uint4* buf, const int* dest, const void* w, int wdt,
                                              const int* rowDest, uint4* d0, uint4* d1, uint4* d2, uint4* d3, uint4* d4,
                                              uint4* d5, uint4* d6, uint4* d7, void* dw, int dwdt, int SK, int k, int m8,
                                              int workBlocks, const int* counts, int C, int R) {
    unpermuteBwdBf16x8(dout, buf, dest, w, wdt, PeerRows{rowDest, d0, d1, d2, d3, d4, d5, d6, d7, m8}, dw, dwdt, SK, k, m8,
                       workBlocks, counts, C, R);
}

}  // extern "C" (a template follows)

// An owner's input layout (ExpertLayout): its El experts, expert j starting at j * most when the owner pads (El * most
// <= maxPadding * rows), else after the experts before it. col: each expert's rows from all sources. Calls
// f(j, start) for j = 0 .. El (j = El: the end).
template <typename F>
__device__ __forceinline__ void forExpertStarts(const int* col, int El, float maxPadding, F f) {
    int most = 0, rows = 0;
    for (int j = 0; j < El; j++) { most = max(most, col[j]); rows += col[j]; }
    bool padded = rows > 0 && (float)El * (float)most <= maxPadding * (float)rows;
    for (int j = 0, at = 0; j <= El; j++) {
        f(j, padded ? j * most : at);
        if (j < El) at += col[j];
    }
}

extern "C" {

// The expert-parallel dispatch's destinations, ExpertLayout.dispatch on the device (no host read of the counts):
// counts [P * E] (rank p's rows for expert e at p * E + e), rank me's dispatch buffer rows sorted by expert (R of
// them); out [R, 2] = (owner, row in the owner's input), owner -1 for rows at or beyond windowRows. The owner's input:
// its El = E / P experts in order, each expert's rows by source rank, each expert at j * most when the owner pads
// (El * most <= maxPadding * rows). Every block builds the per-expert tables in shared memory (3 * (E + 1) ints).
__global__ void k_ep_dispatch_dest(const int* counts, int me, int P, int E, float maxPadding, int windowRows, int* out, int R) {
    extern __shared__ __align__(16) unsigned char smem[];
    int* sh = (int*)smem;
    int* col = sh;            // [E] rows of expert e from all sources
    int* base = sh + E;       // [E] where rank me's rows for expert e start in the owner's input
    int* mine = sh + 2 * E;   // [E + 1] where rank me's rows for expert e start in its buffer
    int El = E / P;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int c = 0, before = 0;
        for (int p = 0; p < P; p++) {
            int v = counts[p * E + e];
            c += v;
            if (p < me) before += v;
        }
        col[e] = c;
        base[e] = before;
    }
    __syncthreads();
    for (int q = threadIdx.x; q < P; q += blockDim.x) {   // an owner per thread: its experts' starts
        forExpertStarts(col + q * El, El, maxPadding, [&](int j, int start) { if (j < El) base[q * El + j] += start; });
    }
    if (threadIdx.x == blockDim.x - 1) {
        int at = 0;
        for (int e = 0; e < E; e++) { mine[e] = at; at += counts[me * E + e]; }
        mine[E] = at;
    }
    __syncthreads();
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < R; r += gridDim.x * blockDim.x) {
        int lo = 0, hi = E - 1;   // the last expert e with mine[e] <= r: the one holding row r (empty ones skipped)
        while (lo < hi) {
            int mid = (lo + hi + 1) >> 1;
            if (mine[mid] <= r) lo = mid;
            else hi = mid - 1;
        }
        int row = base[lo] + (r - mine[lo]);
        out[2 * r] = row < windowRows ? lo / El : -1;
        out[2 * r + 1] = row;
    }
}

// Owner me's input rows -> (source rank, row in the source's dispatch buffer), ExpertLayout.combine on the device: the
// input holds expert j's rows by source, expert j at j * most when me pads (as k_ep_dispatch_dest decides), else
// after the experts before it; padding rows, rows past the input and rows whose place in the source's buffer is at or
// beyond bufRows (the sources' windows must grow first) get (-1, 0). local (nullable) [2 * El + 1]: the
// rows of each local expert, then the El + 1 expert offsets in the input, none past rows (GEMMs over out's rows stay
// inside them when the input is larger). Shared: (P + 2) * El + 1 ints.
__global__ void k_ep_combine_dest(const int* counts, int me, int P, int E, float maxPadding, int bufRows, int* out, int rows, int* local) {
    extern __shared__ __align__(16) unsigned char smem[];
    int El = E / P;
    int* col = (int*)smem;       // [El] rows of my expert j from all sources
    int* start = col + El;       // [El + 1] where my expert j starts in my input
    int* bufStart = start + El + 1;   // [P * El] where source p's rows for my expert j start in p's buffer
    for (int j = threadIdx.x; j < El; j += blockDim.x) {
        int c = 0;
        for (int p = 0; p < P; p++) c += counts[p * E + me * El + j];
        col[j] = c;
    }
    for (int p = threadIdx.x; p < P; p += blockDim.x) {   // a source per thread: the prefix of its buffer
        int at = 0;
        for (int e = 0; e < me * El + El; e++) {
            if (e >= me * El) bufStart[p * El + e - me * El] = at;
            at += counts[p * E + e];
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        forExpertStarts(col, El, maxPadding, [&](int j, int s) { start[j] = s; });
        if (local != nullptr && blockIdx.x == 0) {
            for (int j = 0; j < El; j++) local[j] = col[j];
            for (int j = 0; j <= El; j++) local[El + j] = min(start[j], rows);
        }
    }
    __syncthreads();
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x) {
        int lo = 0, hi = El - 1;   // the last expert starting at or before r
        while (lo < hi) {
            int mid = (lo + hi + 1) >> 1;
            if (start[mid] <= r) lo = mid;
            else hi = mid - 1;
        }
        int i = r - start[lo], p = 0;
        if (i >= col[lo]) {   // padding
            out[2 * r] = -1;
            out[2 * r + 1] = 0;
            continue;
        }
        for (; p < P; p++) {
            int c = counts[p * E + me * El + lo];
            if (i < c) break;
            i -= c;
        }
        int row = bufStart[p * El + lo] + i;
        out[2 * r] = row < bufRows ? p : -1;
        out[2 * r + 1] = row < bufRows ? row : 0;
    }
}

}  // extern "C"
