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

// dx (assigned), one block per row: dx = rstd * (dn - mean(dn) - xhat * mean(dn * xhat)), dn = dout * gamma
__global__ void k_layernorm_bwd_dx(const void* dout, int ddt, const void* x, int xdt, const void* gamma, int gdt,
                                   const void* mean, int mdt, const void* rstd, int rdt, void* dx, int dxdt, int C) {
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
        st(dx, dxdt, base + c, (dn - mdn - xh * mdnx) * rs);
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
