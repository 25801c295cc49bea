// Causal attention forward on tensor cores (bf16 qkv, head size 64 or 128): FlashAttention-style tiles with
// WMMA bf16 x bf16 -> fp32 products. Letters as in attention.cu; qkv [B,T,3C], out [B,T,C], lse [B,H,T].
// Block = 4 warps x 16 query rows (64 queries), key tiles of 32. Two passes over the keys: the first finds
// each row's maximum scaled score, the second accumulates P V with that fixed maximum, so the output
// accumulators stay in WMMA fragments (their element layout is opaque: no per-row rescaling needed).
// P is rounded to bf16 for the P V product (as FlashAttention does); the row sums and lse use fp32 P.
#include "common.cuh"
#include <mma.h>

using namespace nvcuda;

#define TC_QKV(b, t, part, h) (((i64)(b) * T + (t)) * 3 * C + (i64)(part) * C + (i64)(h) * D)
#define TC_OUT(b, t, h) (((i64)(b) * T + (t)) * C + (i64)(h) * D)

template <int D>
__device__ void flash_fwd_tc(const __nv_bfloat16* qkv, void* out, int odt, void* lse, int ldt, int T, int H, char* smem) {
    constexpr int LD = D + 8;          // bf16 row stride of the Q/K/V tiles
    constexpr int SLD = 36;            // fp32 row stride of a warp's 16 x 32 score tile
    constexpr int PLD = 40;            // bf16 row stride of a warp's 16 x 32 probability tile
    constexpr int NF = D / 16;
    int C = H * D;
    __nv_bfloat16* Kt = (__nv_bfloat16*)smem;        // [32][LD]
    __nv_bfloat16* Vt = Kt + 32 * LD;                 // [32][LD]
    __nv_bfloat16* Qt = Kt;                           // [64][LD], only while loading Q fragments
    float* Ss = (float*)(smem + 64 * LD * 2);         // [4][16][SLD]
    __nv_bfloat16* Ps = (__nv_bfloat16*)(Ss + 4 * 16 * SLD);  // [4][16][PLD]
    int bh = blockIdx.y, b = bh / H, h = bh % H, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int q0 = blockIdx.x * 64, w0 = q0 + warp * 16;
    float* S = Ss + warp * 16 * SLD;
    __nv_bfloat16* P = Ps + warp * 16 * PLD;
    const float scale = rsqrtf((float)D);
    const __nv_bfloat16 zero = __float2bfloat16(0.f);

    for (int x = threadIdx.x; x < 64 * D; x += blockDim.x) {
        int r = x / D, d = x % D, i = q0 + r;
        Qt[r * LD + d] = i < T ? qkv[TC_QKV(b, i, 0, h) + d] : zero;
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> qf[NF];
#pragma unroll
    for (int f = 0; f < NF; f++) wmma::load_matrix_sync(qf[f], Qt + warp * 16 * LD + f * 16, LD);

    int row = lane >> 1, half = lane & 1, i = w0 + row;   // this lane's row and half of the 32 columns
    int kmax = min(T - 1, q0 + 63);
    float m = -INFINITY, l = 0.f;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> of[NF];
#pragma unroll
    for (int f = 0; f < NF; f++) wmma::fill_fragment(of[f], 0.f);

    for (int pass = 0; pass < 2; pass++) {
        for (int j0 = 0; j0 <= kmax; j0 += 32) {
            __syncthreads();  // Q fragments loaded / previous tile consumed
            for (int x = threadIdx.x; x < 32 * D; x += blockDim.x) {
                int r = x / D, d = x % D, j = j0 + r;
                Kt[r * LD + d] = j < T ? qkv[TC_QKV(b, j, 1, h) + d] : zero;
                if (pass == 1) Vt[r * LD + d] = j < T ? qkv[TC_QKV(b, j, 2, h) + d] : zero;
            }
            __syncthreads();
            if (j0 > w0 + 15) continue;  // every key of the tile is after this warp's rows (warp-uniform)
#pragma unroll
            for (int n = 0; n < 2; n++) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
                wmma::fill_fragment(sf, 0.f);
#pragma unroll
                for (int f = 0; f < NF; f++) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> kf;
                    wmma::load_matrix_sync(kf, Kt + n * 16 * LD + f * 16, LD);
                    wmma::mma_sync(sf, qf[f], kf, sf);
                }
                wmma::store_matrix_sync(S + n * 16, sf, SLD, wmma::mem_row_major);
            }
            __syncwarp();
            if (pass == 0) {
                for (int c = half * 16; c < half * 16 + 16; c++) {
                    int j = j0 + c;
                    if (j <= i && j < T) m = fmaxf(m, S[row * SLD + c] * scale);
                }
            } else {
                for (int c = half * 16; c < half * 16 + 16; c++) {
                    int j = j0 + c;
                    __nv_bfloat16 pb = zero;
                    if (j <= i && j < T) {
                        float p = expf(S[row * SLD + c] * scale - m);
                        pb = __float2bfloat16(p);
                        l += p;  // fp32 row sums (as FlashAttention): lse stays exact for the backward
                    }
                    P[row * PLD + c] = pb;
                }
                __syncwarp();
#pragma unroll
                for (int f = 0; f < NF; f++) {
#pragma unroll
                    for (int kk = 0; kk < 2; kk++) {
                        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> pf;
                        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> vf;
                        wmma::load_matrix_sync(pf, P + kk * 16, PLD);
                        wmma::load_matrix_sync(vf, Vt + kk * 16 * LD + f * 16, LD);
                        wmma::mma_sync(of[f], pf, vf, of[f]);
                    }
                }
            }
            __syncwarp();
        }
        if (pass == 0) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));  // the two halves of a row
    }
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    float inv = 1.f / l;
#pragma unroll
    for (int f = 0; f < NF; f += 2) {
        __syncwarp();
        wmma::store_matrix_sync(S, of[f], SLD, wmma::mem_row_major);
        if (f + 1 < NF) wmma::store_matrix_sync(S + 16, of[f + 1], SLD, wmma::mem_row_major);
        __syncwarp();
        if (i < T) {
            for (int c = half * 16; c < half * 16 + 16; c++) {
                int d = f * 16 + c;
                if (d < D) st(out, odt, TC_OUT(b, i, h) + d, S[row * SLD + c] * inv);
            }
        }
    }
    if (i < T && half == 0) st(lse, ldt, ((i64)b * H + h) * T + i, m + logf(l));
}

// ------------------------------------------------------------------ backward on tensor cores, head size 64 / 128
// Recomputes P = exp(S * scale - lse) and dS = P (dP - delta) * scale from the forward's lse and
// delta = rowsum(dO * O) (k_flash_delta). Two kernels, no atomics: dK/dV per key block, dQ per query block.
// Each warp works on 16 x 16 tiles; lane l owns row l/2, columns (l%2)*8 .. +8 of a tile for the elementwise part.
// dK, dV: grid (ceil(T/64), B*H), 128 threads; warp w owns keys k0 + 16w .. +16; query tiles of 16.
// shared: K, V [64][BLD] bf16; Q, dO [16][BLD] bf16; lse, delta [16]; per warp S, dP [16][20] f32, P, dS [16][24] bf16
template <int D>
__device__ void flash_bwd_dkv_tc(const void* dout, int gdt, const __nv_bfloat16* qkv, const void* lse, int ldt,
                                 const float* delta, void* dqkv, int dxdt, int T, int H, char* smem) {
    constexpr int BLD = D + 8, NF = D / 16;
    int C = H * D;
    __nv_bfloat16* Ks = (__nv_bfloat16*)smem;
    __nv_bfloat16* Vs = Ks + 64 * BLD;
    __nv_bfloat16* Qs = Vs + 64 * BLD;
    __nv_bfloat16* Gs = Qs + 16 * BLD;
    float* Ls = (float*)(Gs + 16 * BLD);
    float* Dl = Ls + 16;
    float* Sw = Dl + 16;                              // [4][2][16][20]
    __nv_bfloat16* Pw = (__nv_bfloat16*)(Sw + 4 * 2 * 16 * 20);  // [4][2][16][24]
    int bh = blockIdx.y, b = bh / H, h = bh % H, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int k0 = blockIdx.x * 64, wk = k0 + warp * 16;
    const float scale = rsqrtf((float)D);
    const __nv_bfloat16 zero = __float2bfloat16(0.f);
    for (int x = threadIdx.x; x < 64 * D; x += blockDim.x) {
        int r = x / D, d = x % D, j = k0 + r;
        Ks[r * BLD + d] = j < T ? qkv[TC_QKV(b, j, 1, h) + d] : zero;
        Vs[r * BLD + d] = j < T ? qkv[TC_QKV(b, j, 2, h) + d] : zero;
    }
    float* S = Sw + warp * 2 * 16 * 20;
    float* dP = S + 16 * 20;
    __nv_bfloat16* P = Pw + warp * 2 * 16 * 24;
    __nv_bfloat16* dS = P + 16 * 24;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk[NF], dv[NF];
#pragma unroll
    for (int f = 0; f < NF; f++) { wmma::fill_fragment(dk[f], 0.f); wmma::fill_fragment(dv[f], 0.f); }
    int row = lane >> 1, c0 = (lane & 1) * 8, j = wk + row;   // this lane: key j, queries i0 + c0 .. +8
    for (int i0 = (k0 / 16) * 16; i0 < T; i0 += 16) {
        __syncthreads();
        for (int x = threadIdx.x; x < 16 * D; x += blockDim.x) {
            int r = x / D, d = x % D, i = i0 + r;
            Qs[r * BLD + d] = i < T ? qkv[TC_QKV(b, i, 0, h) + d] : zero;
            Gs[r * BLD + d] = i < T ? __float2bfloat16(ld(dout, gdt, TC_OUT(b, i, h) + d)) : zero;
        }
        if (threadIdx.x < 16) {
            int i = i0 + threadIdx.x;
            Ls[threadIdx.x] = i < T ? ld(lse, ldt, (i64)bh * T + i) : 0.f;
            Dl[threadIdx.x] = i < T ? delta[(i64)bh * T + i] : 0.f;
        }
        __syncthreads();
        if (i0 + 15 < wk || wk >= T) continue;  // all queries before this warp's keys (warp-uniform)
        // S^T = K Q^T and dP^T = V dO^T: [16 keys][16 queries]
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf, pf;
        wmma::fill_fragment(sf, 0.f);
        wmma::fill_fragment(pf, 0.f);
#pragma unroll
        for (int f = 0; f < NF; f++) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> ka, va;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> qb, gb;
            wmma::load_matrix_sync(ka, Ks + warp * 16 * BLD + f * 16, BLD);
            wmma::load_matrix_sync(va, Vs + warp * 16 * BLD + f * 16, BLD);
            wmma::load_matrix_sync(qb, Qs + f * 16, BLD);
            wmma::load_matrix_sync(gb, Gs + f * 16, BLD);
            wmma::mma_sync(sf, ka, qb, sf);
            wmma::mma_sync(pf, va, gb, pf);
        }
        wmma::store_matrix_sync(S, sf, 20, wmma::mem_row_major);
        wmma::store_matrix_sync(dP, pf, 20, wmma::mem_row_major);
        __syncwarp();
        for (int c = c0; c < c0 + 8; c++) {
            int i = i0 + c;
            float p = 0.f, ds = 0.f;
            if (i < T && j < T && i >= j) {
                p = expf(S[row * 20 + c] * scale - Ls[c]);
                ds = p * (dP[row * 20 + c] - Dl[c]) * scale;
            }
            P[row * 24 + c] = __float2bfloat16(p);
            dS[row * 24 + c] = __float2bfloat16(ds);
        }
        __syncwarp();
        // dV += P^T dO, dK += dS^T Q: [16 keys][D]
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> pa, dsa;
        wmma::load_matrix_sync(pa, P, 24);
        wmma::load_matrix_sync(dsa, dS, 24);
#pragma unroll
        for (int f = 0; f < NF; f++) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> gb, qb;
            wmma::load_matrix_sync(gb, Gs + f * 16, BLD);
            wmma::load_matrix_sync(qb, Qs + f * 16, BLD);
            wmma::mma_sync(dv[f], pa, gb, dv[f]);
            wmma::mma_sync(dk[f], dsa, qb, dk[f]);
        }
    }
    // write dK, dV through the warp's f32 scratch (16 x 16 per fragment)
#pragma unroll
    for (int f = 0; f < NF; f++) {
        __syncwarp();
        wmma::store_matrix_sync(S, dk[f], 20, wmma::mem_row_major);
        wmma::store_matrix_sync(dP, dv[f], 20, wmma::mem_row_major);
        __syncwarp();
        if (j < T) {
            for (int c = c0; c < c0 + 8; c++) {
                st(dqkv, dxdt, TC_QKV(b, j, 1, h) + f * 16 + c, S[row * 20 + c]);
                st(dqkv, dxdt, TC_QKV(b, j, 2, h) + f * 16 + c, dP[row * 20 + c]);
            }
        }
    }
}

// dQ: grid (ceil(T/64), B*H), 128 threads; warp w owns queries q0 + 16w .. +16; key tiles of 16.
// shared: Q, dO [64][BLD] bf16; K, V [16][BLD] bf16; per warp S, dP [16][20] f32, dS [16][24] bf16
template <int D>
__device__ void flash_bwd_dq_tc(const void* dout, int gdt, const __nv_bfloat16* qkv, const void* lse, int ldt,
                                const float* delta, void* dqkv, int dxdt, int T, int H, char* smem) {
    constexpr int BLD = D + 8, NF = D / 16;
    int C = H * D;
    __nv_bfloat16* Qs = (__nv_bfloat16*)smem;
    __nv_bfloat16* Gs = Qs + 64 * BLD;
    __nv_bfloat16* Ks = Gs + 64 * BLD;
    __nv_bfloat16* Vs = Ks + 16 * BLD;
    float* Sw = (float*)(Vs + 16 * BLD);               // [4][2][16][20]
    __nv_bfloat16* Pw = (__nv_bfloat16*)(Sw + 4 * 2 * 16 * 20);  // [4][16][24]
    int bh = blockIdx.y, b = bh / H, h = bh % H, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int q0 = blockIdx.x * 64, wq = q0 + warp * 16;
    const float scale = rsqrtf((float)D);
    const __nv_bfloat16 zero = __float2bfloat16(0.f);
    for (int x = threadIdx.x; x < 64 * D; x += blockDim.x) {
        int r = x / D, d = x % D, i = q0 + r;
        Qs[r * BLD + d] = i < T ? qkv[TC_QKV(b, i, 0, h) + d] : zero;
        Gs[r * BLD + d] = i < T ? __float2bfloat16(ld(dout, gdt, TC_OUT(b, i, h) + d)) : zero;
    }
    float* S = Sw + warp * 2 * 16 * 20;
    float* dP = S + 16 * 20;
    __nv_bfloat16* dS = Pw + warp * 16 * 24;
    int row = lane >> 1, c0 = (lane & 1) * 8, i = wq + row;   // this lane: query i, keys j0 + c0 .. +8
    float lsei = i < T ? ld(lse, ldt, (i64)bh * T + i) : 0.f, deli = i < T ? delta[(i64)bh * T + i] : 0.f;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> dq[NF];
#pragma unroll
    for (int f = 0; f < NF; f++) wmma::fill_fragment(dq[f], 0.f);
    int kmax = min(T - 1, q0 + 63);
    for (int j0 = 0; j0 <= kmax; j0 += 16) {
        __syncthreads();
        for (int x = threadIdx.x; x < 16 * D; x += blockDim.x) {
            int r = x / D, d = x % D, j = j0 + r;
            Ks[r * BLD + d] = j < T ? qkv[TC_QKV(b, j, 1, h) + d] : zero;
            Vs[r * BLD + d] = j < T ? qkv[TC_QKV(b, j, 2, h) + d] : zero;
        }
        __syncthreads();
        if (j0 > wq + 15 || wq >= T) continue;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf, pf;
        wmma::fill_fragment(sf, 0.f);
        wmma::fill_fragment(pf, 0.f);
#pragma unroll
        for (int f = 0; f < NF; f++) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> qa, ga;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> kb, vb;
            wmma::load_matrix_sync(qa, Qs + warp * 16 * BLD + f * 16, BLD);
            wmma::load_matrix_sync(ga, Gs + warp * 16 * BLD + f * 16, BLD);
            wmma::load_matrix_sync(kb, Ks + f * 16, BLD);
            wmma::load_matrix_sync(vb, Vs + f * 16, BLD);
            wmma::mma_sync(sf, qa, kb, sf);
            wmma::mma_sync(pf, ga, vb, pf);
        }
        wmma::store_matrix_sync(S, sf, 20, wmma::mem_row_major);
        wmma::store_matrix_sync(dP, pf, 20, wmma::mem_row_major);
        __syncwarp();
        for (int c = c0; c < c0 + 8; c++) {
            int j = j0 + c;
            float ds = 0.f;
            if (i < T && j <= i) {
                float p = expf(S[row * 20 + c] * scale - lsei);
                ds = p * (dP[row * 20 + c] - deli) * scale;
            }
            dS[row * 24 + c] = __float2bfloat16(ds);
        }
        __syncwarp();
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> dsa;
        wmma::load_matrix_sync(dsa, dS, 24);
#pragma unroll
        for (int f = 0; f < NF; f++) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> kb;
            wmma::load_matrix_sync(kb, Ks + f * 16, BLD);
            wmma::mma_sync(dq[f], dsa, kb, dq[f]);
        }
    }
#pragma unroll
    for (int f = 0; f < NF; f++) {
        __syncwarp();
        wmma::store_matrix_sync(S, dq[f], 20, wmma::mem_row_major);
        __syncwarp();
        if (i < T) for (int c = c0; c < c0 + 8; c++) st(dqkv, dxdt, TC_QKV(b, i, 0, h) + f * 16 + c, S[row * 20 + c]);
    }
}

extern "C" {

// dynamic shared: dkv (2*64 + 2*16)*(D+8)*2 + 128 + 10240 + 6144 bytes; dq (2*64 + 2*16)*(D+8)*2 + 10240 + 3072
__global__ void k_flash_bwd_dkv_tc64(const void* dout, int gdt, const __nv_bfloat16* qkv, const void* lse, int ldt,
                                     const float* delta, void* dqkv, int dxdt, int T, int H) {
    extern __shared__ __align__(16) char smem[];
    flash_bwd_dkv_tc<64>(dout, gdt, qkv, lse, ldt, delta, dqkv, dxdt, T, H, smem);
}

__global__ void k_flash_bwd_dkv_tc128(const void* dout, int gdt, const __nv_bfloat16* qkv, const void* lse, int ldt,
                                      const float* delta, void* dqkv, int dxdt, int T, int H) {
    extern __shared__ __align__(16) char smem[];
    flash_bwd_dkv_tc<128>(dout, gdt, qkv, lse, ldt, delta, dqkv, dxdt, T, H, smem);
}

__global__ void k_flash_bwd_dq_tc64(const void* dout, int gdt, const __nv_bfloat16* qkv, const void* lse, int ldt,
                                    const float* delta, void* dqkv, int dxdt, int T, int H) {
    extern __shared__ __align__(16) char smem[];
    flash_bwd_dq_tc<64>(dout, gdt, qkv, lse, ldt, delta, dqkv, dxdt, T, H, smem);
}

__global__ void k_flash_bwd_dq_tc128(const void* dout, int gdt, const __nv_bfloat16* qkv, const void* lse, int ldt,
                                     const float* delta, void* dqkv, int dxdt, int T, int H) {
    extern __shared__ __align__(16) char smem[];
    flash_bwd_dq_tc<128>(dout, gdt, qkv, lse, ldt, delta, dqkv, dxdt, T, H, smem);
}

}  // extern "C"

extern "C" {

// grid (ceil(T/64), B*H), 128 threads, dynamic shared (64*(D+8)*2 + 4*16*36*4 + 4*16*40*2) bytes
__global__ void k_flash_fwd_tc64(const __nv_bfloat16* qkv, void* out, int odt, void* lse, int ldt, int T, int H) {
    extern __shared__ __align__(16) char smem[];
    flash_fwd_tc<64>(qkv, out, odt, lse, ldt, T, H, smem);
}

__global__ void k_flash_fwd_tc128(const __nv_bfloat16* qkv, void* out, int odt, void* lse, int ldt, int T, int H) {
    extern __shared__ __align__(16) char smem[];
    flash_fwd_tc<128>(qkv, out, odt, lse, ldt, T, H, smem);
}

}  // extern "C"
