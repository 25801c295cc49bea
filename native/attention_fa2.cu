// Causal attention in the FlashAttention-2 form on bf16 tensor cores: mma.sync m16n8k16 (bf16 x bf16 -> fp32),
// operands through ldmatrix from padded shared tiles filled by cp.async, softmax statistics in registers.
// Semantics as attention.cu: qkv [B,T,3C] bf16 (q | k | v, head h at columns h*D..), out [B,T,C],
// lse [B,H,T] = m + log(l) of each query row's scaled scores (scale 1/sqrt(D)); the backward assigns dqkv [B,T,3C].
// out, lse, dout, dqkv may be F32 or BF16 (dtype code per argument). Head size D = 64 or 128.
// CudaBackend runs these for bf16 qkv with D = 64 / 128 (the CUDA-core tiled kernels of attention.cu otherwise).
//
// Uses the PTX wrappers of grouped_gemm.cu (gg::ldmatrix4, ldmatrix4T, mma16816; all.cu includes grouped_gemm.cu
// first) and common.cuh's cp.async ones. Requirements the launcher checks: qkv, dout (bf16 or f32) 16-byte aligned (16-byte
// cp.async chunks / float4 loads of whole 8-element chunks: every row and head offset is a multiple of D >= 64
// elements), out and dqkv 8-byte aligned (pairs of adjacent columns are stored together).
//
// ---------------------------------------------------------------------------------------------- fragment layouts
// All products are m16n8k16 (row.col). g = lane / 4, t = lane % 4 ("quad" = the 4 lanes of one g).
//   Accumulator C/D (16 x 8, fp32 c[4]): c[0], c[1] = row g,   columns 2t, 2t+1;  c[2], c[3] = row g+8, same columns.
//   A (16 x 16, a[4] = 4 x bf16x2): a[0] = row g, k 2t..2t+1;   a[1] = row g+8, k 2t..2t+1;
//                                   a[2] = row g, k 2t+8..2t+9; a[3] = row g+8, k 2t+8..2t+9.
//   B (16 x 8, b0, b1):             b0 = k 2t..2t+1, column n = g;  b1 = k 2t+8..2t+9, column n = g.
//   In every bf16x2 register the element of the lower column / k index sits in the low 16 bits (pack() below,
//   ldmatrix: the lower address lands in the low half).
// ldmatrix address patterns (the ones of gg::mmaStage, verified on a GPU), r = lane & 7, j = lane >> 3:
//   A from a [rows][k] tile (k contiguous):        ldmatrix4 (row0 + (lane & 15), k0 + (lane >> 4) * 8)
//       -> a[0..3] of the 16 x 16 block (row0.., k0..).
//   B from a [n][k] tile (k contiguous):           ldmatrix4 (n0 + r + (j >> 1) * 8, k0 + (j & 1) * 8)
//       -> {q0, q1} = b0, b1 of the n8 tile n0..n0+7, {q2, q3} = b0, b1 of n0+8..n0+15 (k0..k0+15).
//   B from a [k][n] tile (n contiguous):           ldmatrix4T(k0 + r + (j & 1) * 8, n0 + (j >> 1) * 8)
//       -> the same {q0, q1} / {q2, q3} assignment.
// The FA2 register trick: a score accumulator tile S (16 rows x 64 columns = 8 n8 tiles s[0..7][4]) becomes the
// A operand of a product whose reduction index is S's column index: for the k16 chunk kc (columns 16kc..16kc+15)
//   a[0] = pack(s[2kc][0],   s[2kc][1])     row g,   columns 16kc + 2t, +1      (C layout of n8 tile 2kc, row g)
//   a[1] = pack(s[2kc][2],   s[2kc][3])     row g+8, columns 16kc + 2t, +1
//   a[2] = pack(s[2kc+1][0], s[2kc+1][1])   row g,   columns 16kc + 8 + 2t, +1  (n8 tile 2kc+1)
//   a[3] = pack(s[2kc+1][2], s[2kc+1][3])   row g+8, columns 16kc + 8 + 2t, +1
// which is exactly the A layout above with k = column - 16kc: the same lane already holds the elements it needs.
//
// ---------------------------------------------------------------------------------------------- kernels
// Forward k_fa2_fwd<D>: grid (ceil(T / BM), B*H), WARPS warps (D 64: 4 warps, BM 64; D 128: 8 warps, BM 128); warp
//   w owns query rows q0 + 16w .. +15 with its Q fragments in registers. Key/value tiles of 64 rows double-buffered
//   through cp.async (tile kt+1 loads while kt is multiplied). Per tile: S = Q K^T (K tile [keys][D]: B from [n][k]),
//   the causal mask only where the tile reaches past the warp's first row, online softmax (row max over the quad,
//   O and l rescaled by exp(m_old - m_new)), P rounded to bf16 and used in registers as the A operand of P V (V tile
//   [keys][D]: B from [k][n], ldmatrix.trans). l sums the fp32 P (P is rounded to bf16 only for the P V product). Tiles entirely above a warp's
//   rows are skipped by that warp; tiles above the block's rows are never loaded.
//   shared: Q [BM][D+8], K [2][64][D+8], V [2][64][D+8] bf16.
// Backward (P = exp(S * scale - lse), dS = P (dP - delta)), three launches:
//   k_fa2_bwd_prep: delta = rowsum(dO * O) per query row, and the fp32 dQ accumulator [B][T][H][D] zeroed.
//   k_fa2_bwd<D>: grid (ceil(T / 64), B*H), 4 warps; warp w owns keys k0 + 16w .. +15 and accumulates
//     dV += P^T dO and dK += dS^T Q (times scale at the end) over query tiles of BQ (D 64: 64, D 128: 32) from the
//     diagonal on. S^T = K Q^T and dP^T = V dO^T put the keys on the accumulator rows, so P^T / dS^T feed the next
//     products straight from registers (reduction over the queries); Q and dO tiles [queries][D] are B from [n][k]
//     for S^T / dP^T and B from [k][n] (ldmatrix.trans) for dK / dV. Each tile's dS^T also goes to shared memory
//     (bf16, [keys][queries]); after a barrier the warps compute that tile's dQ share dS K over the block's 64 keys
//     (A = dS through ldmatrix.trans, B = the K tile) and add it to the accumulator with fp32 atomics. One kernel
//     computes S and dP once for all three gradients (the earlier separate dQ kernel recomputed both). The atomics'
//     order varies, so dQ's last bits differ from run to run (as in FlashAttention-2's default backward).
//     Query tiles double-buffered. shared: K [64][D+8], V [64][D+8], Q [2][BQ][D+8], dO [2][BQ][D+8],
//     dS [64][BQ+8] bf16, lse * log2(e) [2][BQ], delta [2][BQ] f32.
//   k_fa2_bwd_dq: the q part of dqkv = scale * the accumulator.
// Rows past T are zero-filled on load (cp.async with source size 0), masked out of every softmax / gradient term, and
// never written. CudaBackend computes the same shared sizes (attention section).
#include "common.cuh"

namespace fa2 {

using gg::ldmatrix4;
using gg::ldmatrix4T;
using gg::mma16816;

typedef __nv_bfloat16 bf16;
constexpr int BN = 64;                       // keys per K/V tile (forward, dQ) and per block (dK/dV)
constexpr float LOG2E = 1.4426950408889634f;

// bf16x2 with lo (the lower column / k index) in the low 16 bits.
__device__ __forceinline__ unsigned pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// 2^x (ex2.approx.ftz: 2^-inf = 0, the masked scores' probability).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// out[i], out[i + 1] = a, b (i even; F32 or BF16).
__device__ __forceinline__ void st2(void* p, int dt, i64 i, float a, float b) {
    if (dt == DT_F32) *reinterpret_cast<float2*>((float*)p + i) = make_float2(a, b);
    else *reinterpret_cast<__nv_bfloat162*>((bf16*)p + i) = __floats2bfloat162_rn(a, b);
}

// Copies rows row0 .. row0+R-1 of a D-wide bf16 slice into s [R][D+8] (cp.async, 16-byte chunks); g points at row 0
// of the slice, rows stride elements apart. Rows >= T are zero-filled.
template <int R, int D, int THREADS>
__device__ __forceinline__ void loadRows(bf16* s, const bf16* g, i64 stride, int row0, int T) {
    constexpr int CPR = D / 8;   // chunks per row
#pragma unroll
    for (int c = threadIdx.x; c < R * CPR; c += THREADS) {
        int r = c / CPR, col = (c % CPR) * 8, i = row0 + r;
        bool valid = i < T;
        cpAsync16(s + r * (D + 8) + col, valid ? g + (i64)i * stride + col : g, valid);
    }
}

// As loadRows for dO (dtype gdt, row stride C elements, slice offset base): bf16 through cp.async, f32 converted to
// bf16 through registers (float4 loads; plain shared stores, visible after the same __syncthreads).
template <int R, int D, int THREADS>
__device__ __forceinline__ void loadDout(bf16* s, const void* dout, int gdt, i64 base, int C, int row0, int T) {
    if (gdt == DT_BF16) {
        loadRows<R, D, THREADS>(s, (const bf16*)dout + base, C, row0, T);
        return;
    }
    constexpr int CPR = D / 8;
    const float* g = (const float*)dout + base;
#pragma unroll
    for (int c = threadIdx.x; c < R * CPR; c += THREADS) {
        int r = c / CPR, col = (c % CPR) * 8, i = row0 + r;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (i < T) {
            float4 x = *reinterpret_cast<const float4*>(g + (i64)i * C + col);
            float4 y = *reinterpret_cast<const float4*>(g + (i64)i * C + col + 4);
            v = make_uint4(pack(x.x, x.y), pack(x.z, x.w), pack(y.x, y.y), pack(y.z, y.w));
        }
        *reinterpret_cast<uint4*>(s + r * (D + 8) + col) = v;
    }
}

// acc[2*np], acc[2*np+1] (n8 tiles 2np, 2np+1) += A(16 x 16) * B where B's 16 x 16 block comes from a [n][k] tile
// (k contiguous) at n rows n0.., k columns k0.. (ld = row stride in elements).
template <int LD>
__device__ __forceinline__ void mmaBnk(float (&c0)[4], float (&c1)[4], const unsigned (&a)[4], const bf16* sB, int n0, int k0) {
    int lane = threadIdx.x & 31;
    unsigned q[4];
    ldmatrix4(q, sB + (n0 + (lane & 7) + (lane >> 4) * 8) * LD + k0 + ((lane >> 3) & 1) * 8);
    mma16816(c0, a, q[0], q[1]);
    mma16816(c1, a, q[2], q[3]);
}

// The same with B's block from a [k][n] tile (n contiguous) at k rows k0.., n columns n0.. (ldmatrix.trans).
template <int LD>
__device__ __forceinline__ void mmaBkn(float (&c0)[4], float (&c1)[4], const unsigned (&a)[4], const bf16* sB, int k0, int n0) {
    int lane = threadIdx.x & 31;
    unsigned q[4];
    ldmatrix4T(q, sB + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + n0 + (lane >> 4) * 8);
    mma16816(c0, a, q[0], q[1]);
    mma16816(c1, a, q[2], q[3]);
}

// A fragment of rows row0..row0+15, k columns k0..k0+15 of a [rows][k] tile.
template <int LD>
__device__ __forceinline__ void loadA(unsigned (&a)[4], const bf16* sA, int row0, int k0) {
    int lane = threadIdx.x & 31;
    ldmatrix4(a, sA + (row0 + (lane & 15)) * LD + k0 + (lane >> 4) * 8);
}

// The two products each backward tile starts with, for one warp's 16 rows: s = A1 B1^T and p = A2 B2^T, A1 / A2
// rows row0.. of [rows][D] tiles, B1 / B2 the [N][D] tiles (N = 8 * NT columns): S and dP (dQ kernel, queries
// against keys) or S^T and dP^T (dK/dV kernel, keys against queries).
template <int NT, int KD, int LD>
__device__ __forceinline__ void twoProducts(float (&s)[NT][4], float (&p)[NT][4], const bf16* a1, const bf16* a2, int row0,
                                            const bf16* b1, const bf16* b2) {
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) s[n][e] = p[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; kk++) {
        unsigned x[4], y[4];
        loadA<LD>(x, a1, row0, kk * 16);
        loadA<LD>(y, a2, row0, kk * 16);
#pragma unroll
        for (int np = 0; np < NT / 2; np++) {
            mmaBnk<LD>(s[2 * np], s[2 * np + 1], x, b1, np * 16, kk * 16);
            mmaBnk<LD>(p[2 * np], p[2 * np + 1], y, b2, np * 16, kk * 16);
        }
    }
}

// The register trick: the A fragment of columns 16kc..16kc+15 of a 16 x (8 * n8 tiles) accumulator (header comment).
template <int NT>
__device__ __forceinline__ void accToA(unsigned (&a)[4], const float (&s)[NT][4], int kc) {
    a[0] = pack(s[2 * kc][0], s[2 * kc][1]);
    a[1] = pack(s[2 * kc][2], s[2 * kc][3]);
    a[2] = pack(s[2 * kc + 1][0], s[2 * kc + 1][1]);
    a[3] = pack(s[2 * kc + 1][2], s[2 * kc + 1][3]);
}

// ------------------------------------------------------------------------------------------------ forward
template <int D, int WARPS>
__device__ __forceinline__ void forward(const bf16* qkv, void* out, int odt, void* lse, int ldt, int T, int H) {
    constexpr int LD = D + 8, BM = 16 * WARPS, THREADS = 32 * WARPS, KD = D / 16, ND = D / 8, NT = BN / 8;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* sQ = (bf16*)smem;        // [BM][LD]
    bf16* sK = sQ + BM * LD;       // [2][BN][LD]
    bf16* sV = sK + 2 * BN * LD;   // [2][BN][LD]
    const int C = H * D, bh = blockIdx.y, b = bh / H, h = bh % H;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    // the heaviest query tiles (most keys) first: better balance at the end of the grid
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BM, w0 = q0 + warp * 16;
    const i64 stride = 3LL * C;
    const bf16* gQ = qkv + (i64)b * T * stride + (i64)h * D;
    const bf16* gK = gQ + C;
    const bf16* gV = gQ + 2 * C;
    const int nT = (min(T, q0 + BM) + BN - 1) / BN;   // key tiles at or below the block's last row
    const float scale = rsqrtf((float)D), sl2 = scale * LOG2E;

    loadRows<BM, D, THREADS>(sQ, gQ, stride, q0, T);
    loadRows<BN, D, THREADS>(sK, gK, stride, 0, T);
    loadRows<BN, D, THREADS>(sV, gV, stride, 0, T);
    cpAsyncCommit();

    const bool active = w0 < T;   // warp-uniform: the warp has rows to compute
    unsigned qf[KD][4];
    float o[ND][4];
#pragma unroll
    for (int n = 0; n < ND; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};   // rows g, g+8: raw-score max, per-thread partial sum

    for (int kt = 0; kt < nT; kt++) {
        if (kt + 1 < nT) {
            int nb = (kt + 1) & 1;
            loadRows<BN, D, THREADS>(sK + nb * BN * LD, gK, stride, (kt + 1) * BN, T);
            loadRows<BN, D, THREADS>(sV + nb * BN * LD, gV, stride, (kt + 1) * BN, T);
        }
        cpAsyncCommit();
        cpAsyncWait<1>();   // everything but the group just committed: tile kt (and Q) are in
        __syncthreads();
        if (kt == 0) {
#pragma unroll
            for (int kk = 0; kk < KD; kk++) loadA<LD>(qf[kk], sQ, warp * 16, kk * 16);
        }
        const int j0 = kt * BN;
        if (active && j0 <= w0 + 15) {
            const bf16* K = sK + (kt & 1) * BN * LD;
            const bf16* V = sV + (kt & 1) * BN * LD;
            float s[NT][4];
#pragma unroll
            for (int n = 0; n < NT; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KD; kk++)
#pragma unroll
                for (int np = 0; np < NT / 2; np++) mmaBnk<LD>(s[2 * np], s[2 * np + 1], qf[kk], K, np * 16, kk * 16);
            if (j0 + BN - 1 > w0) {   // the tile reaches past the warp's first row: causal (and T) mask
#pragma unroll
                for (int n = 0; n < NT; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        int j = j0 + n * 8 + 2 * t + (e & 1), i = w0 + g + (e >> 1) * 8;
                        if (j > min(i, T - 1)) s[n][e] = -INFINITY;
                    }
            }
            float alpha[2], ms[2];
#pragma unroll
            for (int hh = 0; hh < 2; hh++) {
                float mx = m[hh];
#pragma unroll
                for (int n = 0; n < NT; n++) mx = fmaxf(mx, fmaxf(s[n][2 * hh], s[n][2 * hh + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                ms[hh] = mx == -INFINITY ? 0.f : mx * sl2;   // never -inf here (key 0 is in every row's tile 0); safe anyway
                alpha[hh] = ex2(m[hh] * sl2 - ms[hh]);     // m_old = -inf: 0
                m[hh] = mx;
                l[hh] *= alpha[hh];
            }
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float p = ex2(fmaf(s[n][e], sl2, -ms[e >> 1]));   // exp((s - m) * scale); masked: 0
                    s[n][e] = p;
                    l[e >> 1] += p;
                }
#pragma unroll
            for (int n = 0; n < ND; n++) {
                o[n][0] *= alpha[0]; o[n][1] *= alpha[0];
                o[n][2] *= alpha[1]; o[n][3] *= alpha[1];
            }
#pragma unroll
            for (int kc = 0; kc < BN / 16; kc++) {
                unsigned a[4];
                accToA<NT>(a, s, kc);
#pragma unroll
                for (int np = 0; np < D / 16; np++) mmaBkn<LD>(o[2 * np], o[2 * np + 1], a, V, kc * 16, np * 16);
            }
        }
        __syncthreads();   // every warp is done with buffer kt & 1 before the next iteration refills it
    }
    cpAsyncWait<0>();

    if (!active) return;
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
    }
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        int i = w0 + g + hh * 8;
        if (i >= T) continue;
        float inv = 1.f / l[hh];
        i64 row = ((i64)b * T + i) * C + (i64)h * D + 2 * t;
#pragma unroll
        for (int n = 0; n < ND; n++) st2(out, odt, row + n * 8, o[n][2 * hh] * inv, o[n][2 * hh + 1] * inv);
        if (t == 0) st(lse, ldt, (i64)bh * T + i, m[hh] * scale + logf(l[hh]));
    }
}

// ------------------------------------------------------------------------------------------------ backward
// delta[bh][i] = rowsum(dO * O) of each query row, and the dQ accumulator (fp32 [B][T][H][D], the layout of dO)
// zeroed: one thread per 8-column chunk, D / 8 threads a row (a divisor of 32, so a row's lanes share a warp).
__device__ __forceinline__ void backwardPrep(const void* dout, int gdt, const void* out, int odt, float* delta, float* dqAcc,
                                             int B, int T, int H, int D) {
    const int cpr = D / 8, lane = threadIdx.x & 31;
    const i64 chunks = (i64)B * T * H * cpr;
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 base = (((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5) << 5; base < chunks; base += warps << 5) {
        const i64 x = base + lane;   // every lane takes part in the shuffles; chunks is a multiple of cpr
        float acc = 0.f;
        if (x < chunks) {
            float a[8], o[8];
            load8(a, dout, gdt, x * 8);
            load8(o, out, odt, x * 8);
#pragma unroll
            for (int k = 0; k < 8; k++) acc = fmaf(a[k], o[k], acc);
            float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
            *reinterpret_cast<float4*>(dqAcc + x * 8) = z;
            *reinterpret_cast<float4*>(dqAcc + x * 8 + 4) = z;
        }
        for (int w = 1; w < cpr; w <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, w);
        if (x < chunks && lane % cpr == 0) {
            i64 r = x / cpr;   // (b * T + i) * H + h
            int h = (int)(r % H), i = (int)((r / H) % T), b = (int)(r / ((i64)H * T));
            delta[((i64)b * H + h) * T + i] = acc;
        }
    }
}

// dQ of the backward (q part of dqkv) = scale * the accumulator, 4 columns a thread.
__device__ __forceinline__ void backwardStoreDq(const float* dqAcc, void* dqkv, int dxdt, i64 rows, int C, float scale) {
    const i64 n = rows * C / 4;
    for (i64 x = (i64)blockIdx.x * blockDim.x + threadIdx.x; x < n; x += (i64)gridDim.x * blockDim.x) {
        i64 r = x * 4 / C;
        int c = (int)(x * 4 - r * C);
        float4 v = *reinterpret_cast<const float4*>(dqAcc + x * 4);
        i64 o = r * 3 * C + c;
        st2(dqkv, dxdt, o, v.x * scale, v.y * scale);
        st2(dqkv, dxdt, o + 2, v.z * scale, v.w * scale);
    }
}

// dqAcc[i] += a, dqAcc[i + 1] += b (one vector atomic where the GPU has it).
__device__ __forceinline__ void atomicAdd2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// One block per 64 keys: dK and dV accumulate in registers over the query tiles from the diagonal on (header comment),
// and each tile's dS, staged in shared memory, gives that tile's share of dQ = dS K, added to the fp32 accumulator.
template <int D, int BQ>
__device__ __forceinline__ void backward(const void* dout, int gdt, const bf16* qkv, const void* lse, int ldt,
                                         const float* delta, float* dqAcc, void* dqkv, int dxdt, int T, int H) {
    constexpr int LD = D + 8, LDS = BQ + 8, THREADS = 128, KD = D / 16, ND = D / 8, NQ = BQ / 8;
    constexpr int QW = BQ / 16, DW = D / (4 / QW);   // dQ: warps as QW query blocks x (4 / QW) column groups of DW
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* sK = (bf16*)smem;          // [BN][LD]
    bf16* sV = sK + BN * LD;         // [BN][LD]
    bf16* sQ = sV + BN * LD;         // [2][BQ][LD]
    bf16* sG = sQ + 2 * BQ * LD;     // [2][BQ][LD]  dO
    bf16* sS = sG + 2 * BQ * LD;     // [BN][LDS]    dS^T (keys x queries) of the current tile
    float* sL = (float*)(sS + BN * LDS);   // [2][BQ]  lse * log2(e)
    float* sD = sL + 2 * BQ;               // [2][BQ]  delta
    const int C = H * D, bh = blockIdx.y, b = bh / H, h = bh % H;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int k0 = blockIdx.x * BN, wk0 = k0 + warp * 16;
    const i64 stride = 3LL * C;
    const bf16* gQ = qkv + (i64)b * T * stride + (i64)h * D;
    const i64 gBase = (i64)b * T * C + (i64)h * D;   // dO slice, and the dQ accumulator's
    const float scale = rsqrtf((float)D), sl2 = scale * LOG2E;
    const int qt0 = k0 / BQ, nQ = (T + BQ - 1) / BQ;   // query tiles from the one holding query k0
    const int dq0 = (warp % QW) * 16, dc0 = (warp / QW) * DW;

    auto loadQueries = [&](int buf, int qt) {
        int i0 = qt * BQ;
        loadRows<BQ, D, THREADS>(sQ + buf * BQ * LD, gQ, stride, i0, T);
        loadDout<BQ, D, THREADS>(sG + buf * BQ * LD, dout, gdt, gBase, C, i0, T);
        for (int x = threadIdx.x; x < BQ; x += THREADS) {
            int i = i0 + x;
            sL[buf * BQ + x] = i < T ? ld(lse, ldt, (i64)bh * T + i) * LOG2E : 0.f;
            sD[buf * BQ + x] = i < T ? delta[(i64)bh * T + i] : 0.f;
        }
    };
    loadRows<BN, D, THREADS>(sK, gQ + C, stride, k0, T);
    loadRows<BN, D, THREADS>(sV, gQ + 2 * C, stride, k0, T);
    loadQueries(0, qt0);
    cpAsyncCommit();

    const bool active = wk0 < T;
    float dk[ND][4], dv[ND][4];
#pragma unroll
    for (int n = 0; n < ND; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[n][e] = dv[n][e] = 0.f;

    for (int qt = qt0; qt < nQ; qt++) {
        const int buf = (qt - qt0) & 1;
        if (qt + 1 < nQ) loadQueries(buf ^ 1, qt + 1);
        cpAsyncCommit();
        cpAsyncWait<1>();
        __syncthreads();
        const int i0 = qt * BQ;
        const bf16* Q = sQ + buf * BQ * LD;
        const bf16* G = sG + buf * BQ * LD;
        bf16* S = sS + warp * 16 * LDS;   // this warp's 16 key rows of dS^T
        if (active && i0 + BQ - 1 >= wk0) {   // some query of the tile at or after the warp's first key
            const float* L = sL + buf * BQ;
            const float* Dl = sD + buf * BQ;
            // S^T = K Q^T, dP^T = V dO^T: [16 keys][BQ queries]
            float s[NQ][4], dp[NQ][4];
            twoProducts<NQ, KD, LD>(s, dp, sK, sV, warp * 16, Q, G);
            // P^T = exp(S * scale - lse), dS^T = P^T (dP^T - delta) (scale applied to dK and dQ at the end); masked
            // scores become -inf before the exponential (a branch-free 0)
            const bool mask = i0 < wk0 + 16 || i0 + BQ > T || wk0 + 16 > T;
#pragma unroll
            for (int n = 0; n < NQ; n++) {
                const float2 l2 = *reinterpret_cast<const float2*>(L + n * 8 + 2 * t);
                const float2 d2 = *reinterpret_cast<const float2*>(Dl + n * 8 + 2 * t);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float x = fmaf(s[n][e], sl2, -((e & 1) ? l2.y : l2.x));
                    if (mask) {
                        int i = i0 + n * 8 + 2 * t + (e & 1), j = wk0 + g + (e >> 1) * 8;
                        x = (i >= j && i < T && j < T) ? x : -INFINITY;
                    }
                    float p = ex2(x);
                    s[n][e] = p;
                    dp[n][e] = p * (dp[n][e] - ((e & 1) ? d2.y : d2.x));
                }
                *reinterpret_cast<unsigned*>(S + g * LDS + n * 8 + 2 * t) = pack(dp[n][0], dp[n][1]);
                *reinterpret_cast<unsigned*>(S + (g + 8) * LDS + n * 8 + 2 * t) = pack(dp[n][2], dp[n][3]);
            }
            // dV += P^T dO, dK += dS^T Q: [16 keys][D], reduction over the BQ queries
#pragma unroll
            for (int kc = 0; kc < BQ / 16; kc++) {
                unsigned pa[4], da[4];
                accToA<NQ>(pa, s, kc);
                accToA<NQ>(da, dp, kc);
#pragma unroll
                for (int np = 0; np < D / 16; np++) {
                    mmaBkn<LD>(dv[2 * np], dv[2 * np + 1], pa, G, kc * 16, np * 16);
                    mmaBkn<LD>(dk[2 * np], dk[2 * np + 1], da, Q, kc * 16, np * 16);
                }
            }
        } else {
            // no query of the tile sees these keys: their dS rows are 0 for the dQ product
            for (int x = lane; x < 16 * BQ / 2; x += 32)
                reinterpret_cast<unsigned*>(S + (x / (BQ / 2)) * LDS)[x % (BQ / 2)] = 0u;
        }
        __syncthreads();   // dS^T of all 64 keys in shared memory
        // dQ[BQ queries][D] += dS K: this warp's 16 queries (dq0..) and DW columns (dc0..), reduction over the 64 keys;
        // A = dS from the [keys][queries] tile through ldmatrix.trans, B = K from [keys][D] (ldmatrix.trans)
        if (i0 + dq0 < T) {
            float dq[DW / 8][4];
#pragma unroll
            for (int n = 0; n < DW / 8; n++) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
#pragma unroll
            for (int kc = 0; kc < BN / 16; kc++) {
                unsigned a[4];
                ldmatrix4T(a, sS + (kc * 16 + (lane & 7) + (lane >> 4) * 8) * LDS + dq0 + ((lane >> 3) & 1) * 8);
#pragma unroll
                for (int np = 0; np < DW / 16; np++) mmaBkn<LD>(dq[2 * np], dq[2 * np + 1], a, sK, kc * 16, dc0 + np * 16);
            }
#pragma unroll
            for (int hh = 0; hh < 2; hh++) {
                int i = i0 + dq0 + g + hh * 8;
                if (i >= T) continue;
                float* row = dqAcc + gBase + (i64)i * C + dc0 + 2 * t;
#pragma unroll
                for (int n = 0; n < DW / 8; n++) atomicAdd2(row + n * 8, dq[n][2 * hh], dq[n][2 * hh + 1]);
            }
        }
        __syncthreads();   // every warp is done with buffer buf and with dS before the next tile
    }
    cpAsyncWait<0>();

    if (!active) return;
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        int j = wk0 + g + hh * 8;
        if (j >= T) continue;
        i64 row = ((i64)b * T + j) * stride + (i64)h * D + 2 * t;
#pragma unroll
        for (int n = 0; n < ND; n++) {
            st2(dqkv, dxdt, row + C + n * 8, dk[n][2 * hh] * scale, dk[n][2 * hh + 1] * scale);
            st2(dqkv, dxdt, row + 2 * C + n * 8, dv[n][2 * hh], dv[n][2 * hh + 1]);
        }
    }
}

}  // namespace fa2

// Launch shapes and dynamic shared bytes (CudaBackend.attention / attentionBackward compute the same):
//   k_fa2_fwd64:      grid (ceil(T/64), B*H),  128 threads, (64 + 4*64) * 72 * 2   = 46080
//   k_fa2_fwd128:     grid (ceil(T/128), B*H), 256 threads, (128 + 4*64) * 136 * 2 = 104448
//   k_fa2_bwd_prep:   grid-stride over B*T*H*D/8 threads
//   k_fa2_bwd64:      grid (ceil(T/64), B*H),  128 threads, (2*64 + 4*64) * 72 * 2 + 64*72*2 + 4*64*4  = 65536
//   k_fa2_bwd128:     grid (ceil(T/64), B*H),  128 threads, (2*64 + 4*32) * 136 * 2 + 64*40*2 + 4*32*4 = 75264
//   k_fa2_bwd_dq:     grid-stride over B*T*C/4 threads
extern "C" {

// 4 blocks an SM (128 registers, no spills; 3 without the bound): 110.6 -> 106.5 us a call at 350M (ncu)
__global__ void __launch_bounds__(128, 4) k_fa2_fwd64(const __nv_bfloat16* qkv, void* out, int odt, void* lse, int ldt, int T, int H) {
    fa2::forward<64, 4>(qkv, out, odt, lse, ldt, T, H);
}

__global__ void __launch_bounds__(256) k_fa2_fwd128(const __nv_bfloat16* qkv, void* out, int odt, void* lse, int ldt, int T, int H) {
    fa2::forward<128, 8>(qkv, out, odt, lse, ldt, T, H);
}

__global__ void k_fa2_bwd_prep(const void* dout, int gdt, const void* out, int odt, float* delta, float* dqAcc, int B, int T, int H, int D) {
    fa2::backwardPrep(dout, gdt, out, odt, delta, dqAcc, B, T, H, D);
}

__global__ void __launch_bounds__(128, 3) k_fa2_bwd64(const void* dout, int gdt, const __nv_bfloat16* qkv, const void* lse, int ldt,
                                                      const float* delta, float* dqAcc, void* dqkv, int dxdt, int T, int H) {
    fa2::backward<64, 64>(dout, gdt, qkv, lse, ldt, delta, dqAcc, dqkv, dxdt, T, H);
}

__global__ void __launch_bounds__(128) k_fa2_bwd128(const void* dout, int gdt, const __nv_bfloat16* qkv, const void* lse, int ldt,
                                                    const float* delta, float* dqAcc, void* dqkv, int dxdt, int T, int H) {
    fa2::backward<128, 32>(dout, gdt, qkv, lse, ldt, delta, dqAcc, dqkv, dxdt, T, H);
}

__global__ void k_fa2_bwd_dq(const float* dqAcc, void* dqkv, int dxdt, long long rows, int C, float scale) {
    fa2::backwardStoreDq(dqAcc, dqkv, dxdt, rows, C, scale);
}

}  // extern "C"
