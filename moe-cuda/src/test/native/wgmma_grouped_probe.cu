// Probe: a grouped GEMM of our own on Hopper's wgmma (sm_90a), fed by the bulk tensor copy (TMA), against cuBLAS on
// the expert products of the layer benchmark. It decides whether the expert FFN's grouped products move from cuBLAS
// to a kernel that reads the experts' offsets on the device (no host round trip for dropless layers, one launch for
// every expert, room for fused epilogues); figures in docs/benchmarks.md ("Grouped GEMM on wgmma").
//
// Two forms are probed: the experts' data gradient, both operands K-major, and the forward, W read N-major:
//   C[rows_e, N] = A[rows_e, K] * W[e]^T + beta * C    (W [E, N, K]; expert e owns rows offsets[e] .. offsets[e+1])
//   C[rows_e, N] = A[rows_e, K] * W[e]   + beta * C    (W [E, K, N], K a multiple of 64)
// One block computes a 128 x BN tile of one expert: warpgroup 0 loads STAGES stages of A [128 x 64] and W [BN x 64]
// by TMA (128-byte swizzle, one thread, mbarriers), warpgroups 1 and 2 each multiply 64 rows with wgmma m64nBNk16,
// one wgmma group in flight, releasing a stage when its group completes. Blocks are ordered expert by expert, n-tile
// by n-tile with the expert's m-tiles fastest, so that resident blocks share one slice of W[e] and the expert's rows
// stay in L2. Rows of a tile past the expert's end are computed (TMA loads the next expert's rows, or zeros past A)
// and not stored.
//
// Checks (fresh hash-random inputs): uneven experts (an empty one, one of two tiles and a bit), beta 0 and 0.5, rows
// past offsets[E] untouched bit for bit, against cuBLAS GEMMs per expert; then times capacity-shaped products
// (equal experts) against cuBLAS's strided-batched GEMM, median of 20 after 5 warm-ups, CUDA events, twice each.
//
// Build: nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a wgmma_grouped_probe.cu -lcublas -lcuda
// Run:   ./a.out   (one H100 or H200).  -DKERNEL_ONLY builds the kernels alone (registers and spills with -Xptxas -v
// where cuBLAS's headers are absent).
#include <cuda_bf16.h>
#include <cuda.h>
#ifndef KERNEL_ONLY
#include <cublas_v2.h>
#endif
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <cmath>
typedef long long i64;
typedef __nv_bfloat16 bf16;

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); exit(1); } } while (0)
#ifndef KERNEL_ONLY
#define CB(x) do { cublasStatus_t s_ = (x); if (s_ != CUBLAS_STATUS_SUCCESS) { printf("cuBLAS %d at %s:%d\n", (int)s_, __FILE__, __LINE__); exit(1); } } while (0)
#endif
#include "wgmma_ops.cuh"

__device__ __forceinline__ unsigned smemAddr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void wgFence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgCommit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgWait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory"); }

// K-major operand, rows of 64 bf16 (128 bytes) with the 128-byte swizzle: 16-byte chunk c of row r at c ^ (r % 8);
// 8-row groups 1024 bytes apart (SBO); the tile starts 1024-byte aligned.
__device__ __forceinline__ uint64_t descK128(const void* p) {
    uint64_t a = smemAddr(p);
    return ((a & 0x3FFFF) >> 4) | (1ull << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}

// N-major operand (the forward's W[e] [K, N]): TMA boxes of 64 k-rows x 64 n (128 bytes, 128-byte swizzle), one box
// per 64 columns, 8192 bytes apart: LBO = 8192 (between the 64-column boxes), SBO = 1024 (between 8-row groups along
// k). The other assignment was tried on an H100 and gives wrong products (relative error 1.2).
__device__ __forceinline__ uint64_t descN128(const void* p) {
    uint64_t a = smemAddr(p);
    return ((a & 0x3FFFF) >> 4) | ((uint64_t)(8192 >> 4) << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}

// The expert, m-tile and n-tile of this block (1-D grid): experts in order, each expert's tiles n-tile by n-tile with
// its m-tiles fastest, so that the blocks resident together share one slice of W[e] and the expert's rows stay in L2.
template <int BM>
__device__ __forceinline__ bool findTileMN(const int* offsets, int E, int nTiles, int& expert, int& mTile, int& nTile) {
    __shared__ int sExpert, sM, sN;
    int lane = threadIdx.x & 31;
    if (threadIdx.x < 32) {
        if (lane == 0) sExpert = -1;
        __syncwarp();
        int t = blockIdx.x, base = 0;
        for (int e0 = 0; e0 < E && base <= t; e0 += 32) {
            int e = e0 + lane, mt = 0;
            if (e < E) mt = (offsets[e + 1] - offsets[e] + BM - 1) / BM;
            int tiles = mt * nTiles, incl = tiles;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                int v = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += v;
            }
            int first = base + incl - tiles;
            if (tiles > 0 && t >= first && t < first + tiles) { sExpert = e; sN = (t - first) / mt; sM = (t - first) % mt; }
            base += __shfl_sync(0xffffffffu, incl, 31);
        }
    }
    __syncthreads();
    expert = sExpert;
    mTile = sM;
    nTile = sN;
    return expert >= 0;
}

// mbarriers and the bulk tensor copy (TMA)
__device__ __forceinline__ void mbarInit(uint64_t* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(smemAddr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarExpectTx(uint64_t* bar, int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(smemAddr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbarArrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(smemAddr(bar)) : "memory");
}
__device__ __forceinline__ void mbarWait(uint64_t* bar, int parity) {
    asm volatile("{\n"
                 ".reg .pred P1;\n"
                 "LAB_WAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
                 "@P1 bra DONE;\n"
                 "bra LAB_WAIT;\n"
                 "DONE:\n"
                 "}\n" :: "r"(smemAddr(bar)), "r"(parity) : "memory");
}
__device__ __forceinline__ void tmaLoad2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
                 :: "r"(smemAddr(dst)), "l"(map), "r"(c0), "r"(c1), "r"(smemAddr(bar)) : "memory");
}

// Warp-specialized: warpgroup 0 feeds STAGES stages by TMA (one thread), warpgroups 1 and 2 each multiply 64 rows of
// the 128-row tile by BN columns, keeping one wgmma group in flight and releasing a stage when its group completes.
// FWD: C = A W[e] with W [E, K, N] (K a multiple of 64, BN of 64); else C = A W[e]^T.
template <int BN, int STAGES, bool FWD = false>
__global__ void __launch_bounds__(384, 1) k_wg_tma(const __grid_constant__ CUtensorMap tmA, const __grid_constant__ CUtensorMap tmW,
                                                  bf16* C, const int* offsets, int E, int K, int N, float beta) {
    constexpr int BM = 128, A_BYTES = BM * 128, B_BYTES = BN * 128, STAGE = A_BYTES + B_BYTES;
    extern __shared__ unsigned char smraw[];
    __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];
    unsigned char* sm = (unsigned char*)(((uintptr_t)smraw + 1023) & ~(uintptr_t)1023);
    int expert, tile, nTile;
    if (!findTileMN<BM>(offsets, E, (N + BN - 1) / BN, expert, tile, nTile)) return;
    int rowStart = offsets[expert] + tile * BM, rowEnd = offsets[expert + 1];
    int n0 = nTile * BN;
    int kTiles = (K + 63) / 64;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) { mbarInit(&full[s], 1); mbarInit(&empty[s], 8); }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    int wg = threadIdx.x >> 7;
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (threadIdx.x == 0) {
            for (int kt = 0; kt < kTiles; kt++) {
                int s = kt % STAGES;
                if (kt >= STAGES) mbarWait(&empty[s], ((kt / STAGES) - 1) & 1);
                mbarExpectTx(&full[s], STAGE);
                tmaLoad2d(sm + s * STAGE, &tmA, kt * 64, rowStart, &full[s]);
                if constexpr (FWD) {
                    for (int j = 0; j < BN / 64; j++)
                        tmaLoad2d(sm + s * STAGE + A_BYTES + j * 8192, &tmW, n0 + 64 * j, expert * K + kt * 64, &full[s]);
                } else {
                    tmaLoad2d(sm + s * STAGE + A_BYTES, &tmW, kt * 64, expert * N + n0, &full[s]);
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
        int c = wg - 1, lane = threadIdx.x & 31;
        float acc[BN / 2];
#pragma unroll
        for (int i = 0; i < BN / 2; i++) acc[i] = 0.f;
        for (int kt = 0; kt < kTiles; kt++) {
            int s = kt % STAGES;
            mbarWait(&full[s], (kt / STAGES) & 1);
            unsigned char* sA = sm + s * STAGE + c * 64 * 128;
            unsigned char* sB = sm + s * STAGE + A_BYTES;
            wgFence();
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                if constexpr (FWD) wgmmaSS<BN, true>(acc, descK128(sA + kk * 32), descN128(sB + kk * 2048));
                else wgmmaSS<BN, false>(acc, descK128(sA + kk * 32), descK128(sB + kk * 32));
            }
            wgCommit();
            wgWait<1>();
            if (kt > 0 && lane == 0) mbarArrive(&empty[(kt - 1) % STAGES]);
        }
        wgWait<0>();
        int w = (threadIdx.x >> 5) & 3;
#pragma unroll
        for (int j = 0; j < BN / 8; j++) {
            int col = n0 + 8 * j + 2 * (lane & 3);
            if (col >= N) continue;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                i64 row = rowStart + c * 64 + 16 * w + (lane >> 2) + 8 * h;
                if (row >= rowEnd) continue;
                bf16* o = C + row * N + col;
                float v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
                if (beta != 0.f) {
                    float2 old = __bfloat1622float2(*(__nv_bfloat162*)o);
                    v0 += beta * old.x;
                    v1 += beta * old.y;
                }
                *(__nv_bfloat162*)o = __floats2bfloat162_rn(v0, v1);
            }
        }
    }
}

__global__ void k_fill(bf16* p, i64 n, unsigned seed, float scale) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        unsigned x = (unsigned)(i * 2654435761u) ^ seed;
        x ^= x >> 13; x *= 0x5bd1e995u; x ^= x >> 15;
        p[i] = __float2bfloat16(((x & 0xFFFFFF) / 16777216.f - 0.5f) * scale);
    }
}

#ifndef KERNEL_ONLY
// 2D bf16 tensor map over a row-major [rows, cols] matrix, box [boxRows, 64 columns], 128-byte swizzle
static CUtensorMap tensorMap(const bf16* p, i64 rows, i64 cols, int boxRows) {
    CUtensorMap m;
    cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows}, strides[1] = {(cuuint64_t)cols * 2};
    cuuint32_t box[2] = {64, (cuuint32_t)boxRows}, es[2] = {1, 1};
    CUresult r = cuTensorMapEncodeTiled(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, (void*)p, dims, strides, box, es,
                                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) { printf("cuTensorMapEncodeTiled failed: %d\n", (int)r); exit(1); }
    return m;
}

template <int BN, int STAGES, bool FWD_ = false>
struct TmaVariant {
    static constexpr bool FWD = FWD_;
    static int smem() { return STAGES * (128 * 128 + BN * 128) + 1024; }
    static void prepare() { CK(cudaFuncSetAttribute(k_wg_tma<BN, STAGES, FWD>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem())); }
    static void run(const bf16* A, const bf16* W, bf16* C, const int* offs, int E, int T, int K, int N, float beta) {
        CUtensorMap ta = tensorMap(A, T, K, 128), tw = FWD ? tensorMap(W, (i64)E * K, N, 64) : tensorMap(W, (i64)E * N, K, BN);
        dim3 grid(((T + 127) / 128 + E) * ((N + BN - 1) / BN));
        k_wg_tma<BN, STAGES, FWD><<<grid, 384, smem()>>>(ta, tw, C, offs, E, K, N, beta);
    }
    static const char* name() { static char b[64]; snprintf(b, 64, "tma_bn%d_s%d%s", BN, STAGES, FWD ? "_fwd" : ""); return b; }
};

static std::vector<float> toHost(const bf16* d, i64 n) {
    std::vector<bf16> h(n);
    CK(cudaMemcpy(h.data(), d, n * 2, cudaMemcpyDeviceToHost));
    std::vector<float> f(n);
    for (i64 i = 0; i < n; i++) f[i] = __bfloat162float(h[i]);
    return f;
}

static double relErr(const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) {
        if (!std::isfinite(a[i])) return 1e30;
        double d = (double)a[i] - b[i];
        num += d * d; den += (double)b[i] * b[i];
    }
    return std::sqrt(num / std::max(den, 1e-30));
}

// C_e = A_e W_e^T (+ beta C_e) per expert with cuBLAS (column-major: C^T [N, rows] = W_cm^T A_cm)
// fwd: C_e = A_e W_e with W_e [K, N] (column-major: C^T = W_cm A_cm, W_cm [N, K] with ld N)
static void cublasPerExpert(cublasHandle_t h, bool fwd, const bf16* A, const bf16* W, bf16* C, const std::vector<int>& offs, int K, int N, float beta) {
    float al = 1.f;
    for (size_t e = 0; e + 1 < offs.size(); e++) {
        int rows = offs[e + 1] - offs[e];
        if (rows == 0) continue;
        CB(cublasGemmEx(h, fwd ? CUBLAS_OP_N : CUBLAS_OP_T, CUBLAS_OP_N, N, rows, K, &al, W + (i64)e * N * K, CUDA_R_16BF, fwd ? N : K,
                        A + (i64)offs[e] * K, CUDA_R_16BF, K, &beta, C + (i64)offs[e] * N, CUDA_R_16BF, N,
                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
}

template <typename F>
static float medianMs(F f, int warm = 5, int reps = 20) {
    for (int i = 0; i < warm; i++) f();
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
    std::vector<float> t;
    for (int i = 0; i < reps; i++) {
        CK(cudaEventRecord(a)); f(); CK(cudaEventRecord(b)); CK(cudaEventSynchronize(b));
        float ms; CK(cudaEventElapsedTime(&ms, a, b)); t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

struct Shape { const char* name; int E, rows, K, N; };

template <typename V>
static void checkAndTime(cublasHandle_t h, const Shape& s, bool timeIt) {
    V::prepare();
    // correctness: uneven experts (an empty one, one past two tiles), rows past the end untouched, beta 0 and 0.5
    {
        std::vector<int> offs = {0};
        int sizes[] = {5, 0, 200, 64, 131, 1};
        for (int x : sizes) offs.push_back(offs.back() + x);
        int E = (int)offs.size() - 1, T = offs.back() + 7, K = s.K, N = s.N;
        bf16 *A, *W, *C, *R; int* d;
        CK(cudaMalloc(&A, (i64)T * K * 2)); CK(cudaMalloc(&W, (i64)E * N * K * 2));
        CK(cudaMalloc(&C, (i64)T * N * 2)); CK(cudaMalloc(&R, (i64)T * N * 2)); CK(cudaMalloc(&d, offs.size() * 4));
        CK(cudaMemcpy(d, offs.data(), offs.size() * 4, cudaMemcpyHostToDevice));
        k_fill<<<256, 256>>>(A, (i64)T * K, 11, 2.f); k_fill<<<256, 256>>>(W, (i64)E * N * K, 12, 0.2f);
        for (float beta : {0.f, 0.5f}) {
            k_fill<<<256, 256>>>(C, (i64)T * N, 13, 1.f); k_fill<<<256, 256>>>(R, (i64)T * N, 13, 1.f);
            V::run(A, W, C, d, E, T, K, N, beta);
            CK(cudaGetLastError());
            cublasPerExpert(h, V::FWD, A, W, R, offs, K, N, beta);
            CK(cudaDeviceSynchronize());
            auto c = toHost(C, (i64)T * N), r = toHost(R, (i64)T * N);
            bool tail = true;
            for (i64 i = (i64)offs.back() * N; i < (i64)T * N; i++) tail &= c[i] == r[i];
            printf("  check %-14s K=%d N=%d beta=%.1f rel err %.3e tail untouched %s\n", V::name(), K, N, beta, relErr(c, r), tail ? "yes" : "NO");
        }
        cudaFree(A); cudaFree(W); cudaFree(C); cudaFree(R); cudaFree(d);
    }
    if (!timeIt) return;
    int E = s.E, T = E * s.rows, K = s.K, N = s.N;
    std::vector<int> offs(E + 1);
    for (int e = 0; e <= E; e++) offs[e] = e * s.rows;
    bf16 *A, *W, *C, *R; int* d;
    CK(cudaMalloc(&A, (i64)T * K * 2)); CK(cudaMalloc(&W, (i64)E * N * K * 2));
    CK(cudaMalloc(&C, (i64)T * N * 2)); CK(cudaMalloc(&R, (i64)T * N * 2)); CK(cudaMalloc(&d, offs.size() * 4));
    CK(cudaMemcpy(d, offs.data(), offs.size() * 4, cudaMemcpyHostToDevice));
    k_fill<<<1024, 256>>>(A, (i64)T * K, 21, 2.f); k_fill<<<1024, 256>>>(W, (i64)E * N * K, 22, 0.2f);
    float al = 1.f, be = 0.f;
    auto cub = [&] {
        CB(cublasGemmStridedBatchedEx(h, V::FWD ? CUBLAS_OP_N : CUBLAS_OP_T, CUBLAS_OP_N, N, s.rows, K, &al, W, CUDA_R_16BF, V::FWD ? N : K, (i64)N * K,
                                      A, CUDA_R_16BF, K, (i64)s.rows * K, &be, R, CUDA_R_16BF, N, (i64)s.rows * N, E,
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    };
    auto own = [&] { V::run(A, W, C, d, E, T, K, N, 0.f); };
    float tc = medianMs(cub), to = medianMs(own), tc2 = medianMs(cub), to2 = medianMs(own);
    CK(cudaDeviceSynchronize());
    double err = relErr(toHost(C, (i64)T * N), toHost(R, (i64)T * N));
    double flop = 2.0 * T * K * N, bytes = 2.0 * ((double)E * N * K + (double)T * K + (double)T * N);
    printf("  time  %-14s %-22s cuBLAS %.3f %.3f ms  own %.3f %.3f ms  own/cuBLAS %.2f  own %.0f TFLOP/s %.0f GB/s  err %.2e\n",
           V::name(), s.name, tc, tc2, to, to2, std::min(to, to2) / std::min(tc, tc2), flop / std::min(to, to2) / 1e9,
           bytes / std::min(to, to2) / 1e6, err);
    cudaFree(A); cudaFree(W); cudaFree(C); cudaFree(R); cudaFree(d);
}

int main() {
    cublasHandle_t h;
    CB(cublasCreate(&h));
    cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, 0));
    printf("%s, %d SMs\n", p.name, p.multiProcessorCount);
    // the data-gradient products of the layer benchmark (C = dY W^T per expert), capacity-padded
    Shape shapes[] = {
        {"350M fc2 dgrad", 128, 64, 1024, 4096}, {"350M fc1 dgrad", 128, 64, 4096, 1024},
        {"1.3B fc2 dgrad", 128, 64, 2048, 8192}, {"top2 fc2 dgrad", 64, 256, 2048, 8192},
        {"top2 fc1 dgrad", 64, 256, 8192, 2048}, {"mixtral fc2 dgrad", 8, 4096, 4096, 14336},
        {"mixtral fc1 dgrad", 8, 4096, 14336, 4096}, {"ep8 fc2 dgrad", 16, 512, 2048, 8192}, {"ep8 fc1 dgrad", 16, 512, 8192, 2048},
    };
    for (const Shape& s : shapes) {
        checkAndTime<TmaVariant<256, 4>>(h, s, true);
        checkAndTime<TmaVariant<128, 6>>(h, s, true);
    }
    // the forward form (C = A W[e], W [E, K, N]: W read N-major)
    Shape fshapes[] = {
        {"350M fc1 fwd", 128, 64, 1024, 4096}, {"350M fc2 fwd", 128, 64, 4096, 1024}, {"top2 fc1 fwd", 64, 256, 2048, 8192},
        {"top2 fc2 fwd", 64, 256, 8192, 2048}, {"mixtral fc1 fwd", 8, 4096, 4096, 14336}, {"ep8 fc1 fwd", 16, 512, 2048, 8192},
    };
    for (const Shape& s : fshapes) {
        checkAndTime<TmaVariant<256, 4, true>>(h, s, true);
    }
    return 0;
}
#else
int main() {
    CK(cudaFuncSetAttribute(k_wg_tma<256, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize, 1));
    CK(cudaFuncSetAttribute(k_wg_tma<128, 6>, cudaFuncAttributeMaxDynamicSharedMemorySize, 1));
    CK(cudaFuncSetAttribute(k_wg_tma<256, 4, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, 1));
}
#endif
