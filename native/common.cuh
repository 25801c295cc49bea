// Shared device helpers of the MoE4J kernels: dtype-generic loads/stores, reductions, Philox.
//
// Every floating tensor argument travels as (pointer, dtype code) so that one kernel serves every mix of
// F32 and BF16 tensors the Backend SPI allows; the code is uniform across a launch, so the branch costs
// little next to the memory traffic. Arithmetic is fp32 (fp64 for the global reductions).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#define DT_F32 0
#define DT_BF16 1
#define DT_I32 2

typedef long long i64;

__device__ __forceinline__ float ld(const void* p, int dt, i64 i) {
    if (dt == DT_F32) return ((const float*)p)[i];
    if (dt == DT_BF16) return __bfloat162float(((const __nv_bfloat16*)p)[i]);
    return (float)((const int*)p)[i];
}

__device__ __forceinline__ void st(void* p, int dt, i64 i, float v) {
    if (dt == DT_F32) ((float*)p)[i] = v;
    else if (dt == DT_BF16) ((__nv_bfloat16*)p)[i] = __float2bfloat16_rn(v);
    else ((int*)p)[i] = (int)v;
}

// v rounded to what a tensor of dtype dt stores (the CPU reference keeps saved statistics rounded so).
__device__ __forceinline__ float roundTo(int dt, float v) {
    return dt == DT_BF16 ? __bfloat162float(__float2bfloat16_rn(v)) : v;
}

// Grid-stride loop over n elements.
#define FOR_N(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

// Stores a double with one rounding to the target type (fp32), or via fp32 to bf16 as the CPU reference does.
__device__ __forceinline__ void stD(void* p, int dt, i64 i, double v) { st(p, dt, i, (float)v); }

// The 8 bf16 values of a 16-byte chunk as floats, in order.
__device__ __forceinline__ void unpack8(uint4 v, float (&f)[8]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int k = 0; k < 4; k++) { float2 t = __bfloat1622float2(h[k]); f[2 * k] = t.x; f[2 * k + 1] = t.y; }
}

// The 8 values of p (bf16 or fp32, dt) from element i (a multiple of 8) as floats: one or two 16-byte loads.
__device__ __forceinline__ void load8(float (&x)[8], const void* p, int dt, i64 i) {
    if (dt == DT_BF16) {
        unpack8(*reinterpret_cast<const uint4*>((const __nv_bfloat16*)p + i), x);
    } else {
        float4 a = *reinterpret_cast<const float4*>((const float*)p + i), b = *reinterpret_cast<const float4*>((const float*)p + i + 4);
        x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
    }
}

// Shared-memory addresses and the asynchronous 16-byte copy global -> shared (cp.async, sm_80 and later), for the
// tensor-core kernels of both fatbins. The "memory" clobbers keep the compiler from moving this thread's own shared
// loads and stores across an issue or a wait (the wgmma epilogue reads its copies back with plain loads).
__device__ __forceinline__ unsigned smemAddr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cpAsync16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(smemAddr(dst)), "l"(src) : "memory");
}
// valid false: no source bytes read, the 16 bytes zero-filled
__device__ __forceinline__ void cpAsync16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(smemAddr(dst)), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// until at most N of this thread's committed groups are still in flight
template <int N> __device__ __forceinline__ void cpAsyncWait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory"); }

__device__ __forceinline__ float warpSum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warpMax(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ double warpSumD(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Block-wide sum (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float blockSum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warpSum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < nw ? part[lane] : 0.f;
        s = warpSum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

__device__ float blockMax(float v) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warpMax(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < nw ? part[lane] : -INFINITY;
        s = warpMax(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

__device__ double blockSumD(double v) {
    __shared__ double part[32];
    __shared__ double total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warpSumD(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double s = lane < nw ? part[lane] : 0.0;
        s = warpSumD(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

// Philox4x32-10, the same function as dev.moe4j.core.backend.Philox: counter (lo, hi, 0, 0), key = seed.
__device__ __forceinline__ uint4 philox(unsigned long long seed, unsigned long long counter) {
    uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#pragma unroll
    for (int r = 0; r < 10; r++) {
        uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
    return make_uint4(c0, c1, c2, c3);
}

__device__ __forceinline__ float gelu_f(float x) {
    const float s = 0.7978845608028654f;  // sqrt(2/pi)
    float u = s * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.f + tanhf(u));
}

__device__ __forceinline__ float gelu_grad(float x) {
    const float s = 0.7978845608028654f;
    float u = s * (x + 0.044715f * x * x * x);
    float t = tanhf(u);
    float du = s * (1.f + 3.f * 0.044715f * x * x);
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * du;
}

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

// Activation codes (CudaBackend.actCode): the gated ones read [a | b] rows twice as wide as their output.
#define ACT_RELU 0
#define ACT_GELU 1
#define ACT_GEGLU 2
#define ACT_SWIGLU 3

// The non-gated activations (RELU, GELU) of v, and d act(v) / dv times d: one definition for the elementwise kernels
// and the grouped GEMM epilogues that fuse them, so that fused and unfused results are the same bits.
__device__ __forceinline__ float actPlain(int act, float v) { return act == ACT_RELU ? (v > 0.f ? v : 0.f) : gelu_f(v); }
__device__ __forceinline__ float actPlainGrad(int act, float v, float d) { return act == ACT_RELU ? (v > 0.f ? d : 0.f) : d * gelu_grad(v); }

// The rows of a buffer that lives scattered over up to eight tensors (scatterRowsTo's destinations: the ranks' peer
// windows, the peers' mapped by CUDA IPC): row r is row dest[2r + 1] of d[dest[2r]], nowhere where dest[2r] is not
// 0..7. Rows of c16 16-byte chunks. Two 4-byte loads: dest may be a view at any 4-byte offset.
struct PeerRows {
    const int* dest;
    uint4 *d0, *d1, *d2, *d3, *d4, *d5, *d6, *d7;
    int c16;

    __device__ __forceinline__ uint4* row(i64 r) const {
        int q = dest[2 * r], at = dest[2 * r + 1];
        uint4* d;
        switch (q) {   // a switch, not an array: a runtime index into the arguments would go through local memory
            case 0: d = d0; break;
            case 1: d = d1; break;
            case 2: d = d2; break;
            case 3: d = d3; break;
            case 4: d = d4; break;
            case 5: d = d5; break;
            case 6: d = d6; break;
            case 7: d = d7; break;
            default: return nullptr;
        }
        return d + (i64)at * c16;
    }
};

// The rows of one contiguous buffer of rows of len T's, in PeerRows' form.
template <typename T>
struct LocalRows {
    T* buf;
    int len;

    __device__ __forceinline__ T* row(i64 r) const { return buf + r * len; }
};

// Grouped GEMM tiles (grouped_gemm.cu, grouped_gemm_sm90.cu): tile t of the list of every expert's tiles, expert
// by expert, each expert's tiles n-tile by n-tile with its BM-row m-tiles fastest (nTiles 1: m-tiles only). Expert
// e owns rows offsets[e] .. offsets[e + 1]. Warp 0 scans the per-expert tile counts 32 experts at a time; the block
// shares the answer. Returns false for t past the last tile (grids are sized for an upper bound).
template <int BM>
__device__ __forceinline__ bool findGroupTile(const int* offsets, int E, int nTiles, int t, int& expert, int& mTile, int& nTile) {
    __shared__ int sExpert, sM, sN;
    int lane = threadIdx.x & 31;
    if (threadIdx.x < 32) {
        if (lane == 0) sExpert = -1;
        __syncwarp();
        int base = 0;
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
