// Probe: the grouped GEMMs of native/grouped_gemm_sm90.cu (wgmma fed by TMA, device offsets) checked and timed
// against cuBLAS outside the JVM, on the expert products of the layer benchmark; figures in docs/benchmarks.md
// ("Grouped GEMM on wgmma").
//
// Checks (fresh hash-random inputs): uneven experts (an empty one, one of two tiles and a bit), K and N off the tile
// sizes, beta 0 and 0.5, bf16 and fp32 outputs, rows past offsets[E] untouched bit for bit, against cuBLAS GEMMs per
// expert; then times capacity-shaped products (equal experts) against cuBLAS's strided-batched GEMM, median of 20
// after 5 warm-ups, CUDA events, twice each.
//
// Build: nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a wgmma_grouped_probe.cu -lcublas -lcuda
// Run:   ./a.out   (one H100 or H200).
#include "../../../../native/grouped_gemm_sm90.cu"
#include <cublas_v2.h>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cmath>
typedef __nv_bfloat16 bf16;

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); exit(1); } } while (0)
#define CB(x) do { cublasStatus_t s_ = (x); if (s_ != CUBLAS_STATUS_SUCCESS) { printf("cuBLAS %d at %s:%d\n", (int)s_, __FILE__, __LINE__); exit(1); } } while (0)

__global__ void k_fill(bf16* p, i64 n, unsigned seed, float scale) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        unsigned x = (unsigned)(i * 2654435761u) ^ seed;
        x ^= x >> 13; x *= 0x5bd1e995u; x ^= x >> 15;
        p[i] = __float2bfloat16(((x & 0xFFFFFF) / 16777216.f - 0.5f) * scale);
    }
}

// Fills an output of dtype cdt with the same values k_fill gives bf16 (scale 1).
__global__ void k_fillC(void* p, int cdt, i64 n, unsigned seed) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        unsigned x = (unsigned)(i * 2654435761u) ^ seed;
        x ^= x >> 13; x *= 0x5bd1e995u; x ^= x >> 15;
        st(p, cdt, i, (x & 0xFFFFFF) / 16777216.f - 0.5f);
    }
}

// A bf16 (or fp32) tensor map with the 128-byte swizzle: dims innermost first (elements), box likewise; rows packed.
static CUtensorMap tensorMap(const void* p, std::vector<i64> dims, std::vector<int> box, bool f32 = false) {
    CUtensorMap m;
    int r = (int)dims.size();
    cuuint64_t d[3], st[2];
    cuuint32_t bx[3], es[3] = {1, 1, 1};
    i64 stride = f32 ? 4 : 2;
    for (int i = 0; i < r; i++) { d[i] = dims[i]; bx[i] = box[i]; if (i > 0) { stride *= dims[i - 1]; st[i - 1] = stride; } }
    CUresult res = cuTensorMapEncodeTiled(&m, f32 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, r, (void*)p, d, st, bx, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                          CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (res != CUDA_SUCCESS) { printf("cuTensorMapEncodeTiled failed: %d\n", (int)res); exit(1); }
    return m;
}

enum Form { NT, NN, WGRAD };
static const char* formName(Form f) { return f == NT ? "dgrad" : f == NN ? "fwd" : "wgrad"; }
static const int PP_SHARED = wg::STAGES * (64 + wg::BN) * 128 + 2 * wg::EPI_BYTES + 4 * wg::READ_BYTES + 1024;   // ping-pong: 64-row A stages, read buffers
static const int SHARED = wg::STAGES * wg::STAGE_BYTES + 2 * wg::EPI_BYTES + 1024, WGRAD_SHARED = wg::WGRAD_STAGES * wg::STAGE_BYTES + 2 * wg::OUT_BYTES + 1024;
static int numSms;
static int failures;   // checks out of bounds: the exit status

// NT: C [T, N] = A [T, K] W[e]^T (W [E, N, K]); NN: C = A W[e] (W [E, K, N]); WGRAD: C [E, K, N] = A^T B per expert
// (B = dY [T, N]). cdt: 0 fp32, 1 bf16.
// persistent: the products on one block per multiprocessor (else one block per tile); the weight gradient always is.
// blocks > 0: that many blocks, each walking many tiles (the checks' persistent runs, whose shapes have fewer tiles
// than the multiprocessors).
// aux, mode: the products' fused GeLU epilogues (EPI_ACT: aux = gelu(C); EPI_ACT_GRAD: C = gelu'(aux) x the product).
// pp: the products' ping-pong schedule (64-row tiles, one consumer warpgroup each; always persistent).
static void runOwn(Form f, const bf16* A, const bf16* B, void* C, int cdt, const int* offs, int E, int T, int K, int N, float beta,
                   bool persistent = false, int blocks = 0, void* aux = nullptr, int mode = EPI_PLAIN, bool pp = false) {
    static bool prepared = false;
    if (!prepared) {
        CK(cudaFuncSetAttribute(k_wg_nt, cudaFuncAttributeMaxDynamicSharedMemorySize, SHARED));
        CK(cudaFuncSetAttribute(k_wg_nn, cudaFuncAttributeMaxDynamicSharedMemorySize, SHARED));
        CK(cudaFuncSetAttribute(k_wg_wgrad, cudaFuncAttributeMaxDynamicSharedMemorySize, WGRAD_SHARED));
        CK(cudaFuncSetAttribute(k_wg_nt_pp, cudaFuncAttributeMaxDynamicSharedMemorySize, PP_SHARED));
        CK(cudaFuncSetAttribute(k_wg_nn_pp, cudaFuncAttributeMaxDynamicSharedMemorySize, PP_SHARED));
        prepared = true;
    }
    if (f == WGRAD) {
        CUtensorMap ta = tensorMap(A, {K, T}, {64, 64}), tb = tensorMap(B, {N, T}, {64, 64});
        CUtensorMap tc = tensorMap(C, {N, K, E}, {cdt == DT_F32 ? 32 : 64, 64, 1}, cdt == DT_F32);
        int tiles = E * ((K + 127) / 128) * ((N + 255) / 256);
        k_wg_wgrad<<<blocks > 0 ? blocks : std::min(tiles, numSms), wg::THREADS, WGRAD_SHARED>>>(ta, tb, tc, C, cdt, offs, E, K, N, beta);
        return;
    }
    int bm = pp ? 64 : 128;
    CUtensorMap ta = tensorMap(A, {K, T}, {64, bm});
    CUtensorMap tw = f == NN ? tensorMap(B, {N, K, E}, {64, 64, 1}) : tensorMap(B, {K, N, E}, {64, 256, 1});
    int tiles = ((T + bm - 1) / bm + E) * ((N + 255) / 256);
    if (pp) {
        dim3 g(blocks > 0 ? blocks : std::min(tiles, numSms));
        if (f == NN) k_wg_nn_pp<<<g, wg::THREADS, PP_SHARED>>>(ta, tw, C, cdt, offs, E, K, N, beta, aux, mode, ACT_GELU);
        else k_wg_nt_pp<<<g, wg::THREADS, PP_SHARED>>>(ta, tw, C, cdt, offs, E, K, N, beta, aux, mode, ACT_GELU);
        return;
    }
    dim3 grid(blocks > 0 ? blocks : persistent ? std::min(tiles, numSms) : tiles);
    if (f == NN) k_wg_nn<<<grid, wg::THREADS, SHARED>>>(ta, tw, C, cdt, offs, E, K, N, beta, aux, mode, ACT_GELU);
    else k_wg_nt<<<grid, wg::THREADS, SHARED>>>(ta, tw, C, cdt, offs, E, K, N, beta, aux, mode, ACT_GELU);
}

static std::vector<float> toHost(const void* d, i64 n, int cdt) {
    std::vector<float> f(n);
    if (cdt == DT_F32) { CK(cudaMemcpy(f.data(), d, n * 4, cudaMemcpyDeviceToHost)); return f; }
    std::vector<bf16> h(n);
    CK(cudaMemcpy(h.data(), d, n * 2, cudaMemcpyDeviceToHost));
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

// The same products with cuBLAS, one GEMM per expert (column-major: each row-major product is computed transposed).
static void cublasPerExpert(cublasHandle_t h, Form f, const bf16* A, const bf16* B, void* C, int cdt, const std::vector<int>& offs,
                            int K, int N, float beta) {
    float al = 1.f;
    cudaDataType ct = cdt == DT_F32 ? CUDA_R_32F : CUDA_R_16BF;
    int es = cdt == DT_F32 ? 4 : 2;
    for (size_t e = 0; e + 1 < offs.size(); e++) {
        int rows = offs[e + 1] - offs[e];
        if (f == WGRAD) {   // dW_e^T [N, K] = dY_e^T [N, rows] * A_e [rows, K]
            CB(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_T, N, K, rows, &al, B + (i64)offs[e] * N, CUDA_R_16BF, N, A + (i64)offs[e] * K,
                            CUDA_R_16BF, K, &beta, (char*)C + (i64)e * K * N * es, ct, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            continue;
        }
        if (rows == 0) continue;
        CB(cublasGemmEx(h, f == NN ? CUBLAS_OP_N : CUBLAS_OP_T, CUBLAS_OP_N, N, rows, K, &al, B + (i64)e * N * K, CUDA_R_16BF, f == NN ? N : K,
                        A + (i64)offs[e] * K, CUDA_R_16BF, K, &beta, (char*)C + (i64)offs[e] * N * es, ct, N,
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

static void check(cublasHandle_t h, Form f, int K, int N) {
    std::vector<int> offs = {0};
    int sizes[] = {5, 0, 200, 64, 131, 1};
    for (int x : sizes) offs.push_back(offs.back() + x);
    int E = (int)offs.size() - 1, T = offs.back() + 7;
    i64 aN = (i64)T * K, bN = f == WGRAD ? (i64)T * N : (i64)E * N * K, cN = f == WGRAD ? (i64)E * K * N : (i64)T * N;
    bf16 *A, *B; void *C, *R; int* d;
    CK(cudaMalloc(&A, aN * 2)); CK(cudaMalloc(&B, bN * 2)); CK(cudaMalloc(&C, cN * 4)); CK(cudaMalloc(&R, cN * 4));
    CK(cudaMalloc(&d, offs.size() * 4));
    CK(cudaMemcpy(d, offs.data(), offs.size() * 4, cudaMemcpyHostToDevice));
    k_fill<<<256, 256>>>(A, aN, 11, 2.f); k_fill<<<256, 256>>>(B, bN, 12, f == WGRAD ? 1.f : 0.2f);
    if (f == WGRAD) {   // NaN (all bits set) in the rows past offsets[E], which the weight gradient must not read
        i64 past = T - offs.back();
        CK(cudaMemset(A + (i64)offs.back() * K, 0xFF, past * K * 2));
        CK(cudaMemset(B + (i64)offs.back() * N, 0xFF, past * N * 2));
    }
    for (int cdt : {DT_BF16, DT_F32}) {
        for (float beta : {0.f, 0.5f, 1.f}) {   // the weight gradient adds through the bulk copy at beta 1 into fp32
            // the same start values in C and R
            k_fillC<<<256, 256>>>(R, cdt, cN, 13);
            cublasPerExpert(h, f, A, B, R, cdt, offs, K, N, beta);
            CK(cudaDeviceSynchronize());
            auto r = toHost(R, cN, cdt);
            for (int run = 0; run < (f == WGRAD ? 2 : 3); run++) {   // a block per tile; on 3 blocks, each walking many tiles; ping-pong on 3
                bool persistent = run > 0, pp = run == 2;
                k_fillC<<<256, 256>>>(C, cdt, cN, 13);
                runOwn(f, A, B, C, cdt, d, E, T, K, N, beta, persistent, persistent ? 3 : 0, nullptr, EPI_PLAIN, pp);
                CK(cudaGetLastError());
                CK(cudaDeviceSynchronize());
                auto c = toHost(C, cN, cdt);
                bool tail = true;
                if (f != WGRAD) for (i64 i = (i64)offs.back() * N; i < cN; i++) tail &= c[i] == r[i];
                double err = relErr(c, r);
                // bit-equal to cuBLAS but where beta adds into a bf16 output (ours adds in fp32 and rounds once)
                if (err > (cdt == DT_BF16 && beta != 0.f ? 5e-3 : 0.0) || !tail) failures++;
                printf("  check %-6s%s K=%d N=%d %s beta=%.1f rel err %.3e tail untouched %s\n", formName(f),
                       pp ? " (ping-pong, 3 blocks)" : persistent ? " (3 blocks)" : "", K, N,
                       cdt == DT_F32 ? "f32 " : "bf16", beta, err, f == WGRAD ? "-" : tail ? "yes" : "NO");
                if (err > 1e-3) {   // where it goes wrong: the first few elements off, as (row, column) of the output
                    int shown = 0;
                    for (i64 i = 0; i < cN && shown < 6; i++) {
                        if (std::fabs(c[i] - r[i]) > 1e-2 * (std::fabs(r[i]) + 1)) {
                            printf("      at row %lld col %lld: ours %g cuBLAS %g\n", i / N, i % N, c[i], r[i]);
                            shown++;
                        }
                    }
                }
            }
        }
    }
    cudaFree(A); cudaFree(B); cudaFree(C); cudaFree(R); cudaFree(d);
}

struct Shape { const char* name; Form f; int E, rows, K, N; };

static void time(cublasHandle_t h, const Shape& s) {
    Form f = s.f;
    int E = s.E, T = E * s.rows, K = s.K, N = s.N;
    std::vector<int> offs(E + 1);
    for (int e = 0; e <= E; e++) offs[e] = e * s.rows;
    i64 aN = (i64)T * K, bN = f == WGRAD ? (i64)T * N : (i64)E * N * K, cN = f == WGRAD ? (i64)E * K * N : (i64)T * N;
    bf16 *A, *B, *C, *R; int* d;
    CK(cudaMalloc(&A, aN * 2)); CK(cudaMalloc(&B, bN * 2)); CK(cudaMalloc(&C, cN * 2)); CK(cudaMalloc(&R, cN * 2));
    CK(cudaMalloc(&d, offs.size() * 4));
    CK(cudaMemcpy(d, offs.data(), offs.size() * 4, cudaMemcpyHostToDevice));
    k_fill<<<1024, 256>>>(A, aN, 21, 2.f); k_fill<<<1024, 256>>>(B, bN, 22, 0.2f);
    float al = 1.f, be = 0.f;
    auto cub = [&] {
        if (f == WGRAD)
            CB(cublasGemmStridedBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_T, N, K, s.rows, &al, B, CUDA_R_16BF, N, (i64)s.rows * N, A, CUDA_R_16BF, K,
                                          (i64)s.rows * K, &be, R, CUDA_R_16BF, N, (i64)K * N, E, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        else
            CB(cublasGemmStridedBatchedEx(h, f == NN ? CUBLAS_OP_N : CUBLAS_OP_T, CUBLAS_OP_N, N, s.rows, K, &al, B, CUDA_R_16BF, f == NN ? N : K,
                                          (i64)N * K, A, CUDA_R_16BF, K, (i64)s.rows * K, &be, R, CUDA_R_16BF, N, (i64)s.rows * N, E,
                                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    };
    auto own = [&] { runOwn(f, A, B, C, DT_BF16, d, E, T, K, N, 0.f); };
    auto ownP = [&] { runOwn(f, A, B, C, DT_BF16, d, E, T, K, N, 0.f, true); };
    float tc = medianMs(cub), to = medianMs(own), tc2 = medianMs(cub), to2 = medianMs(own);
    CK(cudaDeviceSynchronize());
    double err = relErr(toHost(C, cN, DT_BF16), toHost(R, cN, DT_BF16));
    if (err > 0) failures++;   // every timed product equals cuBLAS's bit for bit
    double flop = 2.0 * T * K * N, bytes = 2.0 * (aN + bN + cN);
    printf("  time  %-24s cuBLAS %.3f %.3f ms  own %.3f %.3f ms  own/cuBLAS %.2f  own %.0f TFLOP/s %.0f GB/s  err %.2e\n",
           s.name, tc, tc2, to, to2, std::min(to, to2) / std::min(tc, tc2), flop / std::min(to, to2) / 1e9,
           bytes / std::min(to, to2) / 1e6, err);
    if (f != WGRAD) {
        CK(cudaMemset(C, 0, cN * 2));
        float tp = medianMs(ownP), tp2 = medianMs(ownP);
        CK(cudaDeviceSynchronize());
        double perr = relErr(toHost(C, cN, DT_BF16), toHost(R, cN, DT_BF16));
        if (perr > 0) failures++;
        printf("  time  %-24s persistent own %.3f %.3f ms  own/cuBLAS %.2f  own %.0f TFLOP/s  err %.2e\n", s.name, tp, tp2,
               std::min(tp, tp2) / std::min(tc, tc2), flop / std::min(tp, tp2) / 1e9, perr);
        // the fused epilogue the layer runs on this form (the forward's h and gelu(h); the data gradient through gelu')
        bf16* X;
        CK(cudaMalloc(&X, cN * 2));
        k_fill<<<1024, 256>>>(X, cN, 23, 2.f);
        int mode = f == NN ? EPI_ACT : EPI_ACT_GRAD;
        auto fused = [&] { runOwn(f, A, B, C, DT_BF16, d, E, T, K, N, 0.f, false, 0, X, mode); };
        auto fusedP = [&] { runOwn(f, A, B, C, DT_BF16, d, E, T, K, N, 0.f, true, 0, X, mode); };
        auto pp = [&] { runOwn(f, A, B, C, DT_BF16, d, E, T, K, N, 0.f, true, 0, nullptr, EPI_PLAIN, true); };
        auto fusedPP = [&] { runOwn(f, A, B, C, DT_BF16, d, E, T, K, N, 0.f, true, 0, X, mode, true); };
        float tf = medianMs(fused), tfp = medianMs(fusedP), tf2 = medianMs(fused), tfp2 = medianMs(fusedP);
        printf("  time  %-24s fused gelu own %.3f %.3f ms, persistent %.3f %.3f ms  own/cuBLAS %.2f (cuBLAS without the activation's pass)\n",
               s.name, tf, tf2, tfp, tfp2, std::min(std::min(tf, tf2), std::min(tfp, tfp2)) / std::min(tc, tc2));
        float tq = medianMs(pp), tqf = medianMs(fusedPP), tq2 = medianMs(pp), tqf2 = medianMs(fusedPP);
        pp();
        CK(cudaDeviceSynchronize());
        double ppErr = relErr(toHost(C, cN, DT_BF16), toHost(R, cN, DT_BF16));
        // the fused ping-pong outputs against the cooperative kernel's (the same arithmetic: equal bit for bit)
        k_fill<<<1024, 256>>>(X, cN, 23, 2.f);
        fused();
        CK(cudaDeviceSynchronize());
        auto wantC = toHost(C, cN, DT_BF16), wantX = toHost(X, cN, DT_BF16);
        k_fill<<<1024, 256>>>(X, cN, 23, 2.f);
        fusedPP();
        CK(cudaDeviceSynchronize());
        double fusedErr = std::max(relErr(toHost(C, cN, DT_BF16), wantC), relErr(toHost(X, cN, DT_BF16), wantX));
        if (ppErr > 0 || fusedErr > 0) failures++;
        printf("  time  %-24s ping-pong own %.3f %.3f ms, fused gelu %.3f %.3f ms  own/cuBLAS %.2f, fused %.2f  err %.2e, fused vs cooperative %.2e\n",
               s.name, tq, tq2, tqf, tqf2, std::min(tq, tq2) / std::min(tc, tc2), std::min(tqf, tqf2) / std::min(tc, tc2), ppErr, fusedErr);
        cudaFree(X);
    }
    cudaFree(A); cudaFree(B); cudaFree(C); cudaFree(R); cudaFree(d);
}

int main(int argc, char** argv) {
    cublasHandle_t h;
    CB(cublasCreate(&h));
    cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, 0));
    numSms = p.multiProcessorCount;
    printf("%s, %d SMs\n", p.name, p.multiProcessorCount);
    // an argument: time only the shapes whose name contains it, without the checks (for a profiler)
    const char* only = argc > 1 ? argv[1] : nullptr;
    if (!only) for (Form f : {NT, NN, WGRAD}) { check(h, f, 200, 136); check(h, f, 1024, 512); }
    // the layer benchmark's expert products, capacity-padded (experts x rows, K, N)
    Shape shapes[] = {
        {"350M fc1 fwd", NN, 128, 64, 1024, 4096}, {"350M fc2 fwd", NN, 128, 64, 4096, 1024},
        {"1.3B fc1 fwd", NN, 128, 64, 2048, 8192}, {"1.3B fc2 dgrad", NT, 128, 64, 2048, 8192},
        {"top2 fc1 fwd", NN, 64, 256, 2048, 8192}, {"top2 fc2 fwd", NN, 64, 256, 8192, 2048},
        {"mixtral fc1 fwd", NN, 8, 4096, 4096, 14336}, {"ep8 fc1 fwd", NN, 16, 512, 2048, 8192},
        {"350M fc2 dgrad", NT, 128, 64, 1024, 4096}, {"350M fc1 dgrad", NT, 128, 64, 4096, 1024},
        {"top2 fc2 dgrad", NT, 64, 256, 2048, 8192}, {"top2 fc1 dgrad", NT, 64, 256, 8192, 2048},
        {"mixtral fc2 dgrad", NT, 8, 4096, 4096, 14336}, {"ep8 fc2 dgrad", NT, 16, 512, 2048, 8192},
        {"350M fc2 wgrad", WGRAD, 128, 64, 4096, 1024}, {"350M fc1 wgrad", WGRAD, 128, 64, 1024, 4096},
        {"1.3B fc1 wgrad", WGRAD, 128, 64, 2048, 8192}, {"top2 fc1 wgrad", WGRAD, 64, 256, 2048, 8192},
        {"top2 fc2 wgrad", WGRAD, 64, 256, 8192, 2048}, {"mixtral fc1 wgrad", WGRAD, 8, 4096, 4096, 14336},
        {"ep8 fc1 wgrad", WGRAD, 16, 512, 2048, 8192}, {"ep8 fc2 wgrad", WGRAD, 16, 512, 8192, 2048},
    };
    for (const Shape& s : shapes) if (!only || strstr(s.name, only)) time(h, s);
    if (failures) printf("FAILED: %d checks out of bounds\n", failures);
    return failures ? 1 : 0;
}
