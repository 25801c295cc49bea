// Grouped GEMMs of the expert FFN on bf16 tensor cores (mma.sync m16n8k16, fp32 accumulation), reading the
// expert offsets on the device: no host round trip to size the groups, one launch for all experts.
//
// Opt-in (-Dmoe4j.cuda.groupedKernel=mma_sync): measured on an H100 (docs/benchmarks.md, 2026-11-23) it is slower than
// cuBLAS on every benchmark shape, by 1.1-1.4x where the product is bound by reading expert weights and 2-2.7x
// where it is bound by tensor-core throughput (mma.sync reaches about 250 TFLOP/s here; cuBLAS's wgmma kernels
// about 600). It stays as the device-offset path and the base for a wgmma version. Each block computes one BM x BN
// tile of one expert, streaming the operands through a multistage cp.async pipeline.
//
//   k_ggemm_nn<BM>:  C[rows_e, N] = A[rows_e, K] * W[e]  (W [E, K, N])   + beta * C
//   k_ggemm_nt<BM>:  C[rows_e, N] = A[rows_e, K] * W[e]^T (W [E, N, K]) + beta * C
//   k_ggemm_wgrad:   dW[e] [K, N] = A[rows_e, K]^T * dY[rows_e, N] + beta * dW[e]
// A, W, dY bf16; C / dW bf16 or fp32 (cdt). K and N multiples of 8, operands 16-byte aligned (the caller checks).
#include "common.cuh"

namespace gg {

constexpr int BN = 128, THREADS = 256, PAD = 8;
// Shared tiles keep the global layout (contiguous dimension innermost), rows padded by 8 elements so that the
// eight 16-byte rows an ldmatrix reads fall into distinct banks.
constexpr int tileElems(int rows, int cols) { return rows * (cols + PAD); }

__device__ __forceinline__ void ldmatrix4(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smemAddr(p)));
}
__device__ __forceinline__ void ldmatrix4T(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smemAddr(p)));
}
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The operand tiles of one pipeline stage. A is the [BM, BK] slice of the left operand, B the [BK, BN] slice of
// the right one; each is stored either with its reduction index (k) contiguous or with its other index contiguous.
//   A_KCONTIG: A tile [BM][BK] (activations [rows, K]);  else [BK][BM] (wgrad: A^T, read from A [rows, Kdim]).
//   B_KCONTIG: B tile [BN][BK] (W[e] stored [N, K]);     else [BK][BN] (W[e] [K, N], or dY [rows, N]).
template <int BM, int BK, int STAGES, bool A_KCONTIG, bool B_KCONTIG>
struct Tiles {
    static constexpr int A_ELEMS = A_KCONTIG ? tileElems(BM, BK) : tileElems(BK, BM);
    static constexpr int B_ELEMS = B_KCONTIG ? tileElems(BN, BK) : tileElems(BK, BN);
    static constexpr int STAGE_ELEMS = A_ELEMS + B_ELEMS;
    static constexpr int SHARED_BYTES = STAGES * STAGE_ELEMS * 2;
};

// Warp layout: 8 warps as 2 (m) x 4 (n); each warp owns a (BM/2) x 32 block of the tile: MI m16 x 4 n8 fragments.
template <int BM, int BK, bool A_KCONTIG, bool B_KCONTIG>
__device__ __forceinline__ void mmaStage(const __nv_bfloat16* sA, const __nv_bfloat16* sB, float (&acc)[BM / 32][4][4]) {
    constexpr int MI = BM / 32;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int wm = (warp >> 2) * (BM / 2), wn = (warp & 3) * 32;
    int j = lane >> 3, r = lane & 7;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
        unsigned a[MI][4], b[4][2];
#pragma unroll
        for (int mi = 0; mi < MI; mi++) {
            int m0 = wm + mi * 16;
            if (A_KCONTIG) ldmatrix4(a[mi], sA + (m0 + (lane & 15)) * (BK + PAD) + kk + (lane >> 4) * 8);
            else ldmatrix4T(a[mi], sA + (kk + r + (j >> 1) * 8) * (BM + PAD) + m0 + (j & 1) * 8);
        }
#pragma unroll
        for (int np = 0; np < 2; np++) {
            int n0 = wn + np * 16;
            unsigned q[4];
            if (B_KCONTIG) ldmatrix4(q, sB + (n0 + r + (j >> 1) * 8) * (BK + PAD) + kk + (j & 1) * 8);
            else ldmatrix4T(q, sB + (kk + r + (j & 1) * 8) * (BN + PAD) + n0 + (j >> 1) * 8);
            b[2 * np][0] = q[0]; b[2 * np][1] = q[1]; b[2 * np + 1][0] = q[2]; b[2 * np + 1][1] = q[3];
        }
#pragma unroll
        for (int mi = 0; mi < MI; mi++)
#pragma unroll
            for (int ni = 0; ni < 4; ni++) mma16816(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
}

// Loads a [R][C] tile (C contiguous, multiple of 8) of rows rowBase.. (valid below rowEnd) and columns colBase..
// (valid below colEnd) from a row-major matrix with leading dimension ld; invalid chunks are zero-filled.
template <int R, int C>
__device__ __forceinline__ void loadTile(__nv_bfloat16* s, const __nv_bfloat16* g, i64 ld, i64 rowBase, i64 rowEnd,
                                         int colBase, int colEnd) {
    constexpr int CHUNKS = R * C / 8;
#pragma unroll
    for (int c = threadIdx.x; c < CHUNKS; c += THREADS) {
        int row = c / (C / 8), col = (c % (C / 8)) * 8;
        i64 gr = rowBase + row;
        int gc = colBase + col;
        bool valid = gr < rowEnd && gc < colEnd;
        cpAsync16(s + row * (C + PAD) + col, valid ? g + gr * ld + gc : g, valid);
    }
}

// Writes acc (rows/cols relative to the tile origin) as out[row, col] = acc + beta * out for rows < rowLimit,
// cols < colLimit; out is row-major with leading dimension ld, bf16 or fp32. With beta != 0 every old value is
// loaded before the first store, so the loads overlap instead of each waiting behind the previous store.
template <int BM>
__device__ __forceinline__ void storeTile(float (&acc)[BM / 32][4][4], void* out, int cdt, i64 ld, i64 rowOrigin,
                                          int rowLimit, int colOrigin, int colLimit, float beta) {
    constexpr int MI = BM / 32;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int wm = (warp >> 2) * (BM / 2), wn = (warp & 3) * 32;
    int g = lane >> 2, t = lane & 3;
    auto index = [&](int mi, int ni, int h, bool& in) {
        int row = wm + mi * 16 + g + h * 8, col = wn + ni * 8 + 2 * t;
        in = row < rowLimit && col < colLimit;   // colLimit is even: the pair is in or out
        return (rowOrigin + row) * ld + colOrigin + col;
    };
    if (beta != 0.f) {
#pragma unroll
        for (int mi = 0; mi < MI; mi++)
#pragma unroll
            for (int ni = 0; ni < 4; ni++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    bool in;
                    i64 i = index(mi, ni, h, in);
                    if (!in) continue;
                    float2 o = cdt == DT_F32 ? *(const float2*)((const float*)out + i)
                                             : __bfloat1622float2(*(const __nv_bfloat162*)((const __nv_bfloat16*)out + i));
                    acc[mi][ni][2 * h] += beta * o.x;
                    acc[mi][ni][2 * h + 1] += beta * o.y;
                }
    }
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int ni = 0; ni < 4; ni++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                bool in;
                i64 i = index(mi, ni, h, in);
                if (!in) continue;
                float v0 = acc[mi][ni][2 * h], v1 = acc[mi][ni][2 * h + 1];
                if (cdt == DT_F32) *(float2*)((float*)out + i) = make_float2(v0, v1);
                else *(__nv_bfloat162*)((__nv_bfloat16*)out + i) = __floats2bfloat162_rn(v0, v1);
            }
}

// The multistage pipeline: tile kt + STAGES - 1 is loaded while tile kt is multiplied. load(stage, kt) issues the
// cp.async copies of k-tile kt into a stage.
template <int BM, int BK, int STAGES, bool A_KCONTIG, bool B_KCONTIG, typename Load>
__device__ __forceinline__ void mainLoop(__nv_bfloat16* s, int kTiles, Load load, float (&acc)[BM / 32][4][4]) {
    using T = Tiles<BM, BK, STAGES, A_KCONTIG, B_KCONTIG>;
#pragma unroll
    for (int st = 0; st < STAGES - 1; st++) { if (st < kTiles) load(s + st * T::STAGE_ELEMS, st); cpAsyncCommit(); }
    for (int kt = 0; kt < kTiles; kt++) {
        cpAsyncWait<STAGES - 2>();
        __syncthreads();   // tile kt is in; every warp is done with the stage the next load overwrites
        int next = kt + STAGES - 1;
        if (next < kTiles) load(s + (next % STAGES) * T::STAGE_ELEMS, next);
        cpAsyncCommit();
        const __nv_bfloat16* sA = s + (kt % STAGES) * T::STAGE_ELEMS;
        mmaStage<BM, BK, A_KCONTIG, B_KCONTIG>(sA, sA + T::A_ELEMS, acc);
    }
}

// Forward / data-gradient product: grid (N / BN, m-tiles bound). The n-tiles of one m-tile are neighbours in launch
// order, so the blocks resident at once share a few A row blocks and the weights of one or two experts in L2
// (m-tiles fastest re-read all of A from memory for every n-tile once A outgrows L2).
template <int BM, int BK, int STAGES, bool TRANS_W>
__device__ void groupedGemm(const __nv_bfloat16* A, const __nv_bfloat16* W, void* C, int cdt, const int* offsets,
                            int E, int K, int N, float beta) {
    extern __shared__ __align__(16) unsigned char smem[];
    int expert, tile, nTile;
    if (!findGroupTile<BM>(offsets, E, 1, blockIdx.y, expert, tile, nTile)) return;
    i64 rowStart = offsets[expert] + (i64)tile * BM, rowEnd = offsets[expert + 1];
    int n0 = blockIdx.x * BN;
    const __nv_bfloat16* We = W + (i64)expert * K * N;
    using T = Tiles<BM, BK, STAGES, true, TRANS_W>;
    auto load = [&](__nv_bfloat16* sA, int kt) {
        __nv_bfloat16* sB = sA + T::A_ELEMS;
        int k0 = kt * BK;
        loadTile<BM, BK>(sA, A + k0, K, rowStart, rowEnd, 0, K - k0);
        if (TRANS_W) loadTile<BN, BK>(sB, We + k0, K, n0, N, 0, K - k0);   // W[e] [N, K]: rows n, columns k
        else loadTile<BK, BN>(sB, We + (i64)k0 * N, N, 0, K - k0, n0, N);   // W[e] [K, N]: rows k, columns n
    };
    float acc[BM / 32][4][4] = {};
    mainLoop<BM, BK, STAGES, true, TRANS_W>((__nv_bfloat16*)smem, (K + BK - 1) / BK, load, acc);
    storeTile<BM>(acc, C, cdt, N, rowStart, (int)(rowEnd - rowStart), n0, N - n0, beta);
}

// Weight gradient: grid (ceil(K / 128) * ceil(N / BN), E); block (kTile, nTile) of expert blockIdx.y reduces over
// the expert's rows. An expert without rows still writes beta * dW (zero for beta = 0).
__device__ void groupedWeightGrad(const __nv_bfloat16* A, const __nv_bfloat16* dY, void* dW, int cdt, const int* offsets,
                                  int K, int N, float beta) {
    constexpr int BM = 128, BK = 32, STAGES = 4;
    extern __shared__ __align__(16) unsigned char smem[];
    int nTiles = (N + BN - 1) / BN;
    int m0 = (blockIdx.x / nTiles) * BM, n0 = (blockIdx.x % nTiles) * BN;
    int expert = blockIdx.y;
    i64 rowStart = offsets[expert], rowEnd = offsets[expert + 1];
    using T = Tiles<BM, BK, STAGES, false, false>;
    auto load = [&](__nv_bfloat16* sA, int kt) {
        __nv_bfloat16* sB = sA + T::A_ELEMS;
        i64 r0 = rowStart + (i64)kt * BK;
        loadTile<BK, BM>(sA, A, K, r0, rowEnd, m0, K);    // A rows r, columns m (= dW's rows)
        loadTile<BK, BN>(sB, dY, N, r0, rowEnd, n0, N);   // dY rows r, columns n
    };
    float acc[BM / 32][4][4] = {};
    mainLoop<BM, BK, STAGES, false, false>((__nv_bfloat16*)smem, (int)((rowEnd - rowStart + BK - 1) / BK), load, acc);
    storeTile<BM>(acc, dW, cdt, N, (i64)expert * K + m0, K - m0, n0, N - n0, beta);
}

}  // namespace gg

// Each kernel's dynamic shared memory is Tiles<...>::SHARED_BYTES; CudaBackend.groupedKernelShared computes the
// same. The data-gradient form (W[e] read as [N, K]) takes 64-wide k-tiles: 128-byte rows of W per load instead of 64.
#define GG_LAUNCH(name, BM, BK, STAGES, TW)                                                                   \
    extern "C" __global__ void __launch_bounds__(gg::THREADS) name(                                          \
        const __nv_bfloat16* A, const __nv_bfloat16* W, void* C, int cdt, const int* offsets, int E, int K,   \
        int N, float beta) {                                                                                  \
        gg::groupedGemm<BM, BK, STAGES, TW>(A, W, C, cdt, offsets, E, K, N, beta);                            \
    }
GG_LAUNCH(k_ggemm_nn_128, 128, 32, 4, false)
GG_LAUNCH(k_ggemm_nt_128, 128, 64, 3, true)
GG_LAUNCH(k_ggemm_nn_64, 64, 32, 4, false)
GG_LAUNCH(k_ggemm_nt_64, 64, 64, 3, true)
#undef GG_LAUNCH

extern "C" __global__ void __launch_bounds__(gg::THREADS) k_ggemm_wgrad(
        const __nv_bfloat16* A, const __nv_bfloat16* dY, void* dW, int cdt, const int* offsets, int K, int N, float beta) {
    gg::groupedWeightGrad(A, dY, dW, cdt, offsets, K, N, beta);
}
