// Causal multi-head self-attention, forward and backward (a correct fused kernel; not yet flash-style).
// Letters: B batch, T sequence, H heads, D head size, C = H*D. qkv [B,T,3C] holds q | k | v per token,
// head h at columns h*D..; out [B,T,C]; lse [B,H,T]. Scale 1/sqrt(D).
// Each block owns one (query or key) row of one (b, h) and keeps that row's T scores in shared memory.
#include "common.cuh"

#define QKV(b, t, part, h) (((i64)(b) * T + (t)) * 3 * C + (i64)(part) * C + (i64)(h) * D)
#define OUT(b, t, h) (((i64)(b) * T + (t)) * C + (i64)(h) * D)

extern "C" {

// grid (T, B*H): block = one query row i. shared: sc[T], q[D]
__global__ void k_attention(const void* qkv, int xdt, void* out, int odt, void* lse, int ldt, int T, int H, int D) {
    extern __shared__ float sh[];
    int C = H * D;
    float* sc = sh;
    float* q = sh + T;
    int i = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H;
    float scale = rsqrtf((float)D);
    for (int d = threadIdx.x; d < D; d += blockDim.x) q[d] = ld(qkv, xdt, QKV(b, i, 0, h) + d);
    __syncthreads();
    float m = -INFINITY;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) {
        i64 kb = QKV(b, j, 1, h);
        float dot = 0.f;
        for (int d = 0; d < D; d++) dot += q[d] * ld(qkv, xdt, kb + d);
        sc[j] = dot * scale;
        m = fmaxf(m, sc[j]);
    }
    m = blockMax(m);
    float s = 0.f;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) { float p = expf(sc[j] - m); sc[j] = p; s += p; }
    s = blockSum(s);  // also orders the sc writes before the reads below
    float inv = 1.f / s;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j <= i; j++) acc += sc[j] * ld(qkv, xdt, QKV(b, j, 2, h) + d);
        st(out, odt, OUT(b, i, h) + d, acc * inv);
    }
    if (threadIdx.x == 0) st(lse, ldt, ((i64)b * H + h) * T + i, m + logf(s));
}

// dq for one query row i (grid (T, B*H)): ds_j = p_ij (dout_i . v_j - dout_i . out_i) * scale, dq_i = sum_j ds_j k_j.
// shared: ds[T], q[D], g[D]
__global__ void k_attention_bwd_dq(const void* dout, int gdt, const void* qkv, int xdt, const void* out, int odt,
                                   const void* lse, int ldt, void* dqkv, int dxdt, int T, int H, int D) {
    extern __shared__ float sh[];
    int C = H * D;
    float* ds = sh;
    float* q = sh + T;
    float* g = q + D;
    int i = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H;
    float scale = rsqrtf((float)D);
    float part = 0.f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        q[d] = ld(qkv, xdt, QKV(b, i, 0, h) + d);
        g[d] = ld(dout, gdt, OUT(b, i, h) + d);
        part += g[d] * ld(out, odt, OUT(b, i, h) + d);
    }
    float delta = blockSum(part);  // syncs q and g too
    float lsei = ld(lse, ldt, ((i64)b * H + h) * T + i);
    for (int j = threadIdx.x; j <= i; j += blockDim.x) {
        i64 kb = QKV(b, j, 1, h), vb = QKV(b, j, 2, h);
        float dot = 0.f, dp = 0.f;
        for (int d = 0; d < D; d++) { dot += q[d] * ld(qkv, xdt, kb + d); dp += g[d] * ld(qkv, xdt, vb + d); }
        float p = expf(dot * scale - lsei);
        ds[j] = p * (dp - delta) * scale;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j <= i; j++) acc += ds[j] * ld(qkv, xdt, QKV(b, j, 1, h) + d);
        st(dqkv, dxdt, QKV(b, i, 0, h) + d, acc);
    }
}

// dk, dv for one key row j (grid (T, B*H)): over queries i >= j, dv_j = sum_i p_ij dout_i, dk_j = sum_i ds_ij q_i.
// shared: p[T], ds[T], k[D], v[D]
__global__ void k_attention_bwd_dkv(const void* dout, int gdt, const void* qkv, int xdt, const void* out, int odt,
                                    const void* lse, int ldt, void* dqkv, int dxdt, int T, int H, int D) {
    extern __shared__ float sh[];
    int C = H * D;
    float* p = sh;
    float* ds = sh + T;
    float* k = ds + T;
    float* v = k + D;
    int j = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H;
    float scale = rsqrtf((float)D);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        k[d] = ld(qkv, xdt, QKV(b, j, 1, h) + d);
        v[d] = ld(qkv, xdt, QKV(b, j, 2, h) + d);
    }
    __syncthreads();
    for (int i = j + threadIdx.x; i < T; i += blockDim.x) {
        i64 qb = QKV(b, i, 0, h), gb = OUT(b, i, h);
        float dot = 0.f, dp = 0.f, delta = 0.f;
        for (int d = 0; d < D; d++) {
            float gd = ld(dout, gdt, gb + d);
            dot += ld(qkv, xdt, qb + d) * k[d];
            dp += gd * v[d];
            delta += gd * ld(out, odt, gb + d);
        }
        float pij = expf(dot * scale - ld(lse, ldt, ((i64)b * H + h) * T + i));
        p[i] = pij;
        ds[i] = pij * (dp - delta) * scale;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float dk = 0.f, dv = 0.f;
        for (int i = j; i < T; i++) {
            dk += ds[i] * ld(qkv, xdt, QKV(b, i, 0, h) + d);
            dv += p[i] * ld(dout, gdt, OUT(b, i, h) + d);
        }
        st(dqkv, dxdt, QKV(b, j, 1, h) + d, dk);
        st(dqkv, dxdt, QKV(b, j, 2, h) + d, dv);
    }
}

// ------------------------------------------------------------------ tiled (flash-style) kernels, D <= 128
// FlashAttention-2 structure on CUDA cores: K/V (or Q/dO) tiles of 32 rows in shared memory, one warp per few
// rows, lane j <-> key (or query) j of the tile for the scores, lane <-> head dimension d = lane + 32 t for the
// accumulators; online softmax in the forward, recomputed probabilities from lse in the backward. No T x T
// matrix is ever stored. Rows padded to D+1 floats where lanes read different rows (no bank conflicts).
#define FA_MAXT 4   // accumulators per lane: D <= 32 * FA_MAXT

// grid (ceil(T/16), B*H), 128 threads: 4 warps x 4 query rows. shared: Q [16][D], K [32][D+1], V [32][D]
__global__ void k_flash_fwd(const void* qkv, int xdt, void* out, int odt, void* lse, int ldt, int T, int H, int D) {
    extern __shared__ float sh[];
    int C = H * D;
    float* Qs = sh;
    float* Ks = Qs + 16 * D;
    float* Vs = Ks + 32 * (D + 1);
    int bh = blockIdx.y, b = bh / H, h = bh % H, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int q0 = blockIdx.x * 16;
    float scale = rsqrtf((float)D);
    for (int x = threadIdx.x; x < 16 * D; x += blockDim.x) {
        int r = x / D, d = x % D, i = q0 + r;
        Qs[x] = i < T ? ld(qkv, xdt, QKV(b, i, 0, h) + d) : 0.f;
    }
    float m[4], l[4], o[4][FA_MAXT];
    for (int r = 0; r < 4; r++) { m[r] = -INFINITY; l[r] = 0.f; for (int t = 0; t < FA_MAXT; t++) o[r][t] = 0.f; }
    int qmax = min(T - 1, q0 + 15);
    for (int j0 = 0; j0 <= qmax; j0 += 32) {
        __syncthreads();  // the previous tile is no longer read (and Q is loaded, first time)
        for (int x = threadIdx.x; x < 32 * D; x += blockDim.x) {
            int r = x / D, d = x % D, j = j0 + r;
            Ks[r * (D + 1) + d] = j < T ? ld(qkv, xdt, QKV(b, j, 1, h) + d) : 0.f;
            Vs[r * D + d] = j < T ? ld(qkv, xdt, QKV(b, j, 2, h) + d) : 0.f;
        }
        __syncthreads();
        for (int r = 0; r < 4; r++) {
            int row = warp * 4 + r, i = q0 + row;
            if (i >= T || j0 > i) continue;  // warp-uniform
            int j = j0 + lane;
            float sc = -INFINITY;
            if (j <= i) {
                float acc = 0.f;
                const float* qr = Qs + row * D;
                const float* kr = Ks + lane * (D + 1);
                for (int d = 0; d < D; d++) acc += qr[d] * kr[d];
                sc = acc * scale;
            }
            float mn = fmaxf(m[r], warpMax(sc));
            float p = j <= i ? expf(sc - mn) : 0.f;
            float alpha = expf(m[r] - mn);  // m = -inf on the first tile: alpha = 0
            l[r] = l[r] * alpha + warpSum(p);
            m[r] = mn;
            for (int t = 0; t < FA_MAXT; t++) o[r][t] *= alpha;
            int jn = min(32, i - j0 + 1);
            for (int jj = 0; jj < jn; jj++) {
                float pj = __shfl_sync(0xffffffffu, p, jj);
                for (int t = 0; t < FA_MAXT; t++) {
                    int d = lane + 32 * t;
                    if (d < D) o[r][t] += pj * Vs[jj * D + d];
                }
            }
        }
    }
    for (int r = 0; r < 4; r++) {
        int i = q0 + warp * 4 + r;
        if (i >= T) continue;
        float inv = 1.f / l[r];
        for (int t = 0; t < FA_MAXT; t++) {
            int d = lane + 32 * t;
            if (d < D) st(out, odt, OUT(b, i, h) + d, o[r][t] * inv);
        }
        if (lane == 0) st(lse, ldt, ((i64)b * H + h) * T + i, m[r] + logf(l[r]));
    }
}

// delta[bh, i] = dout_i . out_i (the softmax-backward row term), one warp per row; grid-stride over B*H*T rows
__global__ void k_flash_delta(const void* dout, int gdt, const void* out, int odt, float* delta, int B, int T, int H, int D) {
    int C = H * D;
    i64 rows = (i64)B * H * T;
    int lane = threadIdx.x & 31;
    for (i64 w = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; w < rows; w += ((i64)gridDim.x * blockDim.x) >> 5) {
        int i = (int)(w % T), bh = (int)(w / T), b = bh / H, h = bh % H;
        float acc = 0.f;
        for (int d = lane; d < D; d += 32) acc += ld(dout, gdt, OUT(b, i, h) + d) * ld(out, odt, OUT(b, i, h) + d);
        acc = warpSum(acc);
        if (lane == 0) delta[w] = acc;
    }
}

// dk, dv: grid (ceil(T/8), B*H), 128 threads: 4 warps x 2 keys; lanes <-> 32 queries of a query tile.
// shared: K [8][D], V [8][D], Q [32][D+1], dO [32][D+1], lse [32], delta [32]
__global__ void k_flash_bwd_dkv(const void* dout, int gdt, const void* qkv, int xdt, const void* lse, int ldt,
                                const float* delta, void* dqkv, int dxdt, int T, int H, int D) {
    extern __shared__ float sh[];
    int C = H * D;
    float* Ks = sh;
    float* Vs = Ks + 8 * D;
    float* Qs = Vs + 8 * D;
    float* Gs = Qs + 32 * (D + 1);
    float* Ls = Gs + 32 * (D + 1);
    float* Ds = Ls + 32;
    int bh = blockIdx.y, b = bh / H, h = bh % H, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int k0 = blockIdx.x * 8;
    float scale = rsqrtf((float)D);
    for (int x = threadIdx.x; x < 8 * D; x += blockDim.x) {
        int r = x / D, d = x % D, j = k0 + r;
        Ks[x] = j < T ? ld(qkv, xdt, QKV(b, j, 1, h) + d) : 0.f;
        Vs[x] = j < T ? ld(qkv, xdt, QKV(b, j, 2, h) + d) : 0.f;
    }
    float dk[2][FA_MAXT], dv[2][FA_MAXT];
    for (int r = 0; r < 2; r++) for (int t = 0; t < FA_MAXT; t++) { dk[r][t] = 0.f; dv[r][t] = 0.f; }
    for (int i0 = (k0 / 32) * 32; i0 < T; i0 += 32) {
        __syncthreads();
        for (int x = threadIdx.x; x < 32 * D; x += blockDim.x) {
            int r = x / D, d = x % D, i = i0 + r;
            Qs[r * (D + 1) + d] = i < T ? ld(qkv, xdt, QKV(b, i, 0, h) + d) : 0.f;
            Gs[r * (D + 1) + d] = i < T ? ld(dout, gdt, OUT(b, i, h) + d) : 0.f;
        }
        if (threadIdx.x < 32) {
            int i = i0 + threadIdx.x;
            Ls[threadIdx.x] = i < T ? ld(lse, ldt, (i64)bh * T + i) : 0.f;
            Ds[threadIdx.x] = i < T ? delta[(i64)bh * T + i] : 0.f;
        }
        __syncthreads();
        for (int r = 0; r < 2; r++) {
            int key = warp * 2 + r, j = k0 + key;
            if (j >= T || i0 + 31 < j) continue;  // warp-uniform: every query of the tile is before key j
            int i = i0 + lane;
            float p = 0.f, ds = 0.f;
            if (i < T && i >= j) {
                const float* qr = Qs + lane * (D + 1);
                const float* gr = Gs + lane * (D + 1);
                const float* kr = Ks + key * D;
                const float* vr = Vs + key * D;
                float s = 0.f, dp = 0.f;
                for (int d = 0; d < D; d++) { s += qr[d] * kr[d]; dp += gr[d] * vr[d]; }
                p = expf(s * scale - Ls[lane]);
                ds = p * (dp - Ds[lane]) * scale;
            }
            for (int ii = 0; ii < 32; ii++) {
                float pi = __shfl_sync(0xffffffffu, p, ii), dsi = __shfl_sync(0xffffffffu, ds, ii);
                if (pi == 0.f && dsi == 0.f) continue;  // warp-uniform (shuffled values)
                for (int t = 0; t < FA_MAXT; t++) {
                    int d = lane + 32 * t;
                    if (d < D) { dv[r][t] += pi * Gs[ii * (D + 1) + d]; dk[r][t] += dsi * Qs[ii * (D + 1) + d]; }
                }
            }
        }
    }
    for (int r = 0; r < 2; r++) {
        int j = k0 + warp * 2 + r;
        if (j >= T) continue;
        for (int t = 0; t < FA_MAXT; t++) {
            int d = lane + 32 * t;
            if (d < D) { st(dqkv, dxdt, QKV(b, j, 1, h) + d, dk[r][t]); st(dqkv, dxdt, QKV(b, j, 2, h) + d, dv[r][t]); }
        }
    }
}

// dq: grid (ceil(T/8), B*H), 128 threads: 4 warps x 2 queries; lanes <-> 32 keys of a key tile.
// shared: Q [8][D], dO [8][D], K [32][D+1], V [32][D+1]
__global__ void k_flash_bwd_dq(const void* dout, int gdt, const void* qkv, int xdt, const void* lse, int ldt,
                               const float* delta, void* dqkv, int dxdt, int T, int H, int D) {
    extern __shared__ float sh[];
    int C = H * D;
    float* Qs = sh;
    float* Gs = Qs + 8 * D;
    float* Ks = Gs + 8 * D;
    float* Vs = Ks + 32 * (D + 1);
    int bh = blockIdx.y, b = bh / H, h = bh % H, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int q0 = blockIdx.x * 8;
    float scale = rsqrtf((float)D);
    for (int x = threadIdx.x; x < 8 * D; x += blockDim.x) {
        int r = x / D, d = x % D, i = q0 + r;
        Qs[x] = i < T ? ld(qkv, xdt, QKV(b, i, 0, h) + d) : 0.f;
        Gs[x] = i < T ? ld(dout, gdt, OUT(b, i, h) + d) : 0.f;
    }
    float dq[2][FA_MAXT], lsei[2], deli[2];
    for (int r = 0; r < 2; r++) {
        int i = q0 + warp * 2 + r;
        lsei[r] = i < T ? ld(lse, ldt, (i64)bh * T + i) : 0.f;
        deli[r] = i < T ? delta[(i64)bh * T + i] : 0.f;
        for (int t = 0; t < FA_MAXT; t++) dq[r][t] = 0.f;
    }
    int qmax = min(T - 1, q0 + 7);
    for (int j0 = 0; j0 <= qmax; j0 += 32) {
        __syncthreads();
        for (int x = threadIdx.x; x < 32 * D; x += blockDim.x) {
            int r = x / D, d = x % D, j = j0 + r;
            Ks[r * (D + 1) + d] = j < T ? ld(qkv, xdt, QKV(b, j, 1, h) + d) : 0.f;
            Vs[r * (D + 1) + d] = j < T ? ld(qkv, xdt, QKV(b, j, 2, h) + d) : 0.f;
        }
        __syncthreads();
        for (int r = 0; r < 2; r++) {
            int row = warp * 2 + r, i = q0 + row;
            if (i >= T || j0 > i) continue;
            int j = j0 + lane;
            float ds = 0.f;
            if (j <= i) {
                const float* qr = Qs + row * D;
                const float* gr = Gs + row * D;
                const float* kr = Ks + lane * (D + 1);
                const float* vr = Vs + lane * (D + 1);
                float s = 0.f, dp = 0.f;
                for (int d = 0; d < D; d++) { s += qr[d] * kr[d]; dp += gr[d] * vr[d]; }
                float p = expf(s * scale - lsei[r]);
                ds = p * (dp - deli[r]) * scale;
            }
            int jn = min(32, i - j0 + 1);
            for (int jj = 0; jj < jn; jj++) {
                float dsj = __shfl_sync(0xffffffffu, ds, jj);
                for (int t = 0; t < FA_MAXT; t++) {
                    int d = lane + 32 * t;
                    if (d < D) dq[r][t] += dsj * Ks[jj * (D + 1) + d];
                }
            }
        }
    }
    for (int r = 0; r < 2; r++) {
        int i = q0 + warp * 2 + r;
        if (i >= T) continue;
        for (int t = 0; t < FA_MAXT; t++) {
            int d = lane + 32 * t;
            if (d < D) st(dqkv, dxdt, QKV(b, i, 0, h) + d, dq[r][t]);
        }
    }
}

}  // extern "C"
