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

}  // extern "C"
