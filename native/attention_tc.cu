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
