// LayerNorm over the last dimension, forward and backward. x [N, C], gamma/beta [C], mean/rstd [N].
#include "common.cuh"

extern "C" {

// One block per row: two passes over the row (mean, then variance about the mean: no cancellation).
__global__ void k_layernorm(const void* x, int xdt, const void* gamma, int gdt, const void* beta, int bdt, float eps,
                            void* out, int odt, void* mean, int mdt, void* rstd, int rdt, int C) {
    i64 r = blockIdx.x;
    i64 base = r * C;
    float s = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += ld(x, xdt, base + c);
    float mu = blockSum(s) / C;
    float v = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) { float d = ld(x, xdt, base + c) - mu; v += d * d; }
    float var = blockSum(v) / C;
    float rs = rsqrtf(var + eps);
    // Normalise with the statistics as their tensors store them (the backward reads those).
    mu = roundTo(mdt, mu);
    rs = roundTo(rdt, rs);
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        st(out, odt, base + c, (ld(x, xdt, base + c) - mu) * rs * ld(gamma, gdt, c) + ld(beta, bdt, c));
    }
    if (threadIdx.x == 0) { st(mean, mdt, r, mu); st(rstd, rdt, r, rs); }
}

// LayerNorm with a warp per row for bf16 x, gamma, beta and out, C = 256 v with v <= 8 (each lane keeps its C/32
// values in registers, loaded 8 at a time): the same two passes as k_layernorm (mean, then the variance about it),
// summed by the warp instead of the block, so no block synchronisation.
__global__ void k_layernorm_warp_bf16x8(const uint4* x, const uint4* gamma, const uint4* beta, float eps, uint4* out,
                                        void* mean, int mdt, void* rstd, int rdt, int N, int v) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= N) return;
    const uint4* xr = x + (i64)row * v * 32;
    float f[64];
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        if (i < v) {
            uint4 q = xr[i * 32 + lane];
            const __nv_bfloat162* h = (const __nv_bfloat162*)&q;
#pragma unroll
            for (int t = 0; t < 4; t++) {
                float2 a = __bfloat1622float2(h[t]);
                f[i * 8 + 2 * t] = a.x;
                f[i * 8 + 2 * t + 1] = a.y;
                s += a.x + a.y;
            }
        }
    }
    float C = 256.f * v;
    float mu = warpSum(s) / C;
    float var = 0.f;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        if (i < v) {
#pragma unroll
            for (int e = 0; e < 8; e++) { float d = f[i * 8 + e] - mu; var += d * d; }
        }
    }
    var = warpSum(var) / C;
    float rs = rsqrtf(var + eps);
    mu = roundTo(mdt, mu);   // normalise with the statistics as their tensors store them (the backward reads those)
    rs = roundTo(rdt, rs);
    uint4* orow = out + (i64)row * v * 32;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        if (i < v) {
            uint4 g = gamma[i * 32 + lane], b = beta[i * 32 + lane], r;
            const __nv_bfloat162* hg = (const __nv_bfloat162*)&g;
            const __nv_bfloat162* hb = (const __nv_bfloat162*)&b;
            __nv_bfloat162* hr = (__nv_bfloat162*)&r;
#pragma unroll
            for (int t = 0; t < 4; t++) {
                float2 gg = __bfloat1622float2(hg[t]), bb = __bfloat1622float2(hb[t]);
                hr[t] = __floats2bfloat162_rn((f[i * 8 + 2 * t] - mu) * rs * gg.x + bb.x, (f[i * 8 + 2 * t + 1] - mu) * rs * gg.y + bb.y);
            }
            orow[i * 32 + lane] = r;
        }
    }
    if (lane == 0) { st(mean, mdt, row, mu); st(rstd, rdt, row, rs); }
}

// The two passes of the warp-per-row bf16 backward over a lane's 8 columns of chunk i of a row (row offset base, in
// 16-byte chunks): lnBwdSums adds dout*gamma and dout*gamma*xhat into a and b; lnBwdDx writes dx (+ res where not null)
// from the row's means mdn, mdnx of those, and returns dout and xhat for column sums.
__device__ __forceinline__ void lnBwdSums(const uint4* dout, const uint4* x, const uint4* gamma, i64 base, int i, int lane,
                                          float mu, float rs, float& a, float& b) {
    uint4 qd = dout[base + i * 32 + lane], qx = x[base + i * 32 + lane], qg = gamma[i * 32 + lane];
    const __nv_bfloat162* hd = (const __nv_bfloat162*)&qd;
    const __nv_bfloat162* hx = (const __nv_bfloat162*)&qx;
    const __nv_bfloat162* hg = (const __nv_bfloat162*)&qg;
#pragma unroll
    for (int t = 0; t < 4; t++) {
        float2 d = __bfloat1622float2(hd[t]), xv = __bfloat1622float2(hx[t]), g = __bfloat1622float2(hg[t]);
        float dn0 = d.x * g.x, dn1 = d.y * g.y;
        a += dn0 + dn1;
        b += dn0 * ((xv.x - mu) * rs) + dn1 * ((xv.y - mu) * rs);
    }
}

__device__ __forceinline__ void lnBwdDx(const uint4* dout, const uint4* x, const uint4* gamma, const uint4* res, uint4* dx, i64 base,
                                        int i, int lane, float mu, float rs, float mdn, float mdnx, float (&dv)[8], float (&xh)[8]) {
    uint4 qd = dout[base + i * 32 + lane], qx = x[base + i * 32 + lane], qg = gamma[i * 32 + lane], r;
    uint4 qr = res ? res[base + i * 32 + lane] : make_uint4(0u, 0u, 0u, 0u);   // bf16 zeros
    const __nv_bfloat162* hd = (const __nv_bfloat162*)&qd;
    const __nv_bfloat162* hx = (const __nv_bfloat162*)&qx;
    const __nv_bfloat162* hg = (const __nv_bfloat162*)&qg;
    const __nv_bfloat162* hq = (const __nv_bfloat162*)&qr;
    __nv_bfloat162* hr = (__nv_bfloat162*)&r;
#pragma unroll
    for (int t = 0; t < 4; t++) {
        float2 d = __bfloat1622float2(hd[t]), xv = __bfloat1622float2(hx[t]), g = __bfloat1622float2(hg[t]), q = __bfloat1622float2(hq[t]);
        float xh0 = (xv.x - mu) * rs, xh1 = (xv.y - mu) * rs;
        hr[t] = __floats2bfloat162_rn((d.x * g.x - mdn - xh0 * mdnx) * rs + q.x, (d.y * g.y - mdn - xh1 * mdnx) * rs + q.y);
        dv[2 * t] = d.x; dv[2 * t + 1] = d.y;
        xh[2 * t] = xh0; xh[2 * t + 1] = xh1;
    }
    dx[base + i * 32 + lane] = r;
}

// k_layernorm_bwd_dx with a warp per row, bf16 dout, x, gamma, res and dx, C = 256 v (v <= 8): the same formula; the
// second pass reads the row again (from cache) rather than holding it.
__global__ void k_layernorm_bwd_dx_warp_bf16x8(const uint4* dout, const uint4* x, const uint4* gamma, const void* mean, int mdt,
                                               const void* rstd, int rdt, const uint4* res, uint4* dx, int N, int v) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= N) return;
    i64 base = (i64)row * v * 32;
    float mu = ld(mean, mdt, row), rs = ld(rstd, rdt, row);
    float a = 0.f, b = 0.f;
    for (int i = 0; i < v; i++) lnBwdSums(dout, x, gamma, base, i, lane, mu, rs, a, b);
    float C = 256.f * v;
    float mdn = warpSum(a) / C, mdnx = warpSum(b) / C;
    float dv[8], xh[8];
    for (int i = 0; i < v; i++) lnBwdDx(dout, x, gamma, res, dx, base, i, lane, mu, rs, mdn, mdnx, dv, xh);
}

// LayerNorm's whole backward for bf16 rows of C = 256 v, v <= 4: dx as k_layernorm_bwd_dx_warp_bf16x8 (a warp per row,
// + res where not null) and the block's share of dgamma and dbeta in the same pass over dout and x (the separate
// column-sum kernel read both again: 22 us of a 47 us [8192, 1024] backward). Warp w of block b takes rows
// b * 8 + w, then every 8 * gridDim.x-th; its lanes sum dout * xhat and dout over those rows for their columns,
// and the block adds its 8 warps' sums in order into partial [2, gridDim.x, C] (dgamma parts, then dbeta parts) for
// k_layernorm_bwd_dgb_final. 256 threads; 32 KB of static shared memory.
__global__ void __launch_bounds__(256) k_layernorm_bwd_fused_bf16x8(const uint4* dout, const uint4* x, const uint4* gamma,
        const void* mean, int mdt, const void* rstd, int rdt, const uint4* res, uint4* dx, float* partial, int N, int v) {
    __shared__ float red[8 * 1024];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, C = 256 * v;
    float dg[32], db[32];
#pragma unroll
    for (int j = 0; j < 32; j++) dg[j] = db[j] = 0.f;
    for (int row = blockIdx.x * 8 + warp; row < N; row += gridDim.x * 8) {
        i64 base = (i64)row * v * 32;
        float mu = ld(mean, mdt, row), rs = ld(rstd, rdt, row);
        float a = 0.f, b = 0.f;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if (i >= v) break;
            lnBwdSums(dout, x, gamma, base, i, lane, mu, rs, a, b);
        }
        float mdn = warpSum(a) / C, mdnx = warpSum(b) / C;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if (i >= v) break;
            float dv[8], xh[8];
            lnBwdDx(dout, x, gamma, res, dx, base, i, lane, mu, rs, mdn, mdnx, dv, xh);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                dg[i * 8 + e] += dv[e] * xh[e];
                db[i * 8 + e] += dv[e];
            }
        }
    }
    // the block's sums, warp by warp in order: dgamma's into partial[blockIdx.x], dbeta's into partial[gridDim.x + blockIdx.x]
#pragma unroll
    for (int which = 0; which < 2; which++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if (i >= v) break;
            float* o = red + warp * C + i * 256 + lane * 8;
#pragma unroll
            for (int e = 0; e < 8; e++) o[e] = which ? db[i * 8 + e] : dg[i * 8 + e];
        }
        __syncthreads();
        for (int c = threadIdx.x; c < C; c += 256) {
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < 8; w++) s += red[w * C + c];
            partial[((i64)which * gridDim.x + blockIdx.x) * C + c] = s;
        }
        __syncthreads();
    }
}

// dx (assigned), one block per row: dx = rstd * (dn - mean(dn) - xhat * mean(dn * xhat)) + res, dn = dout * gamma
// (res: the residual gradient, null for none)
__global__ void k_layernorm_bwd_dx(const void* dout, int ddt, const void* x, int xdt, const void* gamma, int gdt,
                                   const void* mean, int mdt, const void* rstd, int rdt, const void* res, int resdt,
                                   void* dx, int dxdt, int C) {
    i64 r = blockIdx.x;
    i64 base = r * C;
    float mu = ld(mean, mdt, r), rs = ld(rstd, rdt, r);
    float a = 0.f, b = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float xh = (ld(x, xdt, base + c) - mu) * rs;
        float dn = ld(dout, ddt, base + c) * ld(gamma, gdt, c);
        a += dn; b += dn * xh;
    }
    float mdn = blockSum(a) / C, mdnx = blockSum(b) / C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float xh = (ld(x, xdt, base + c) - mu) * rs;
        float dn = ld(dout, ddt, base + c) * ld(gamma, gdt, c);
        st(dx, dxdt, base + c, (dn - mdn - xh * mdnx) * rs + (res ? ld(res, resdt, base + c) : 0.f));
    }
}

// dgamma[c] += sum_r dout[r,c] * xhat[r,c]; dbeta[c] += sum_r dout[r,c]. One thread per column (coalesced rows).
__global__ void k_layernorm_bwd_dgb(const void* dout, int ddt, const void* x, int xdt, const void* mean, int mdt,
                                    const void* rstd, int rdt, void* dgamma, int dgdt, void* dbeta, int dbdt, int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float dg = 0.f, db = 0.f;
    for (int r = 0; r < N; r++) {
        float g = ld(dout, ddt, (i64)r * C + c);
        float xh = (ld(x, xdt, (i64)r * C + c) - ld(mean, mdt, r)) * ld(rstd, rdt, r);
        dg += g * xh; db += g;
    }
    st(dgamma, dgdt, c, ld(dgamma, dgdt, c) + dg);
    st(dbeta, dbdt, c, ld(dbeta, dbdt, c) + db);
}

// The same sums in two deterministic passes for tall inputs: grid (ceil(C/128), P), rows [y*chunk, ..) into
// partial [2, P, C] (dgamma parts, then dbeta parts); k_layernorm_bwd_dgb_final adds them in order.
__global__ void k_layernorm_bwd_dgb_partial(const void* dout, int ddt, const void* x, int xdt, const void* mean, int mdt,
                                            const void* rstd, int rdt, float* partial, int N, int C, int chunk) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    int r0 = blockIdx.y * chunk, r1 = min(N, r0 + chunk);
    float dg = 0.f, db = 0.f;
#pragma unroll 4
    for (int r = r0; r < r1; r++) {
        float g = ld(dout, ddt, (i64)r * C + c);
        float xh = (ld(x, xdt, (i64)r * C + c) - ld(mean, mdt, r)) * ld(rstd, rdt, r);
        dg += g * xh; db += g;
    }
    i64 P = gridDim.y;
    partial[(i64)blockIdx.y * C + c] = dg;
    partial[(P + blockIdx.y) * C + c] = db;
}

// k_layernorm_bwd_dgb_partial for bf16 dout and x, 8 columns a thread (16-byte loads; C % 8 == 0, c8 = C / 8):
// the same formula and row order per column, so the same partial sums.
__global__ void k_layernorm_bwd_dgb_partial_bf16x8(const uint4* dout, const uint4* x, const void* mean, int mdt,
                                                   const void* rstd, int rdt, float* partial, int N, int c8, int chunk) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c8) return;
    int r0 = blockIdx.y * chunk, r1 = min(N, r0 + chunk);
    float dg[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, db[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
    for (int r = r0; r < r1; r++) {
        uint4 vg = dout[(i64)r * c8 + j], vx = x[(i64)r * c8 + j];
        float mu = ld(mean, mdt, r), rs = ld(rstd, rdt, r);
        const __nv_bfloat162* hg = (const __nv_bfloat162*)&vg;
        const __nv_bfloat162* hx = (const __nv_bfloat162*)&vx;
#pragma unroll
        for (int q = 0; q < 4; q++) {
            float2 g = __bfloat1622float2(hg[q]), xv = __bfloat1622float2(hx[q]);
            float xh0 = (xv.x - mu) * rs, xh1 = (xv.y - mu) * rs;
            dg[2 * q] += g.x * xh0; db[2 * q] += g.x;
            dg[2 * q + 1] += g.y * xh1; db[2 * q + 1] += g.y;
        }
    }
    i64 C = (i64)c8 * 8, P = gridDim.y;
    float4* pg = (float4*)(partial + (i64)blockIdx.y * C + (i64)j * 8);
    float4* pb = (float4*)(partial + (P + blockIdx.y) * C + (i64)j * 8);
    pg[0] = make_float4(dg[0], dg[1], dg[2], dg[3]); pg[1] = make_float4(dg[4], dg[5], dg[6], dg[7]);
    pb[0] = make_float4(db[0], db[1], db[2], db[3]); pb[1] = make_float4(db[4], db[5], db[6], db[7]);
}

// 32 columns a block of 256 threads, as k_sum_rows_final: the 8 warps take every 8th partial, warp 0 adds in order.
__global__ void k_layernorm_bwd_dgb_final(const float* partial, int P, void* dgamma, int dgdt, void* dbeta, int dbdt, int C) {
    __shared__ float pg[8][33], pb[8][33];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, c = blockIdx.x * 32 + lane;
    float dg = 0.f, db = 0.f;
    if (c < C) for (int p = w; p < P; p += 8) { dg += partial[(i64)p * C + c]; db += partial[((i64)P + p) * C + c]; }
    pg[w][lane] = dg;
    pb[w][lane] = db;
    __syncthreads();
    if (w == 0 && c < C) {
        float g = 0.f, b = 0.f;
        for (int q = 0; q < 8; q++) { g += pg[q][lane]; b += pb[q][lane]; }
        st(dgamma, dgdt, c, ld(dgamma, dgdt, c) + g);
        st(dbeta, dbdt, c, ld(dbeta, dbdt, c) + b);
    }
}

}  // extern "C"
