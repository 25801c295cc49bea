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

__global__ void k_layernorm_bwd_dgb_final(const float* partial, int P, void* dgamma, int dgdt, void* dbeta, int dbdt, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float dg = 0.f, db = 0.f;
    for (int p = 0; p < P; p++) { dg += partial[(i64)p * C + c]; db += partial[((i64)P + p) * C + c]; }
    st(dgamma, dgdt, c, ld(dgamma, dgdt, c) + dg);
    st(dbeta, dbdt, c, ld(dbeta, dbdt, c) + db);
}

}  // extern "C"
