// fp32 products on bf16 tensor cores (CudaBackend.matmul's split path, used by the fp32 gate of a bf16 model).
// An fp32 value v is the sum of three bf16 pieces, v = h0 + h1 + h2 (h0 = bf16(v), h1 = bf16(v - h0),
// h2 = bf16(v - h0 - h1)), exact up to the last bit or two of v's 24-bit significand. A product of two bf16
// values is exact in fp32, so a bf16 GEMM with fp32 accumulation over the pieces computes the fp32 product to
// fp32 accuracy: x * W = x * h0(W) + x * h1(W) + x * h2(W) when x is bf16 already (three terms), and six terms
// (the pieces whose weights sum to at least 2^-16 of the leading one) when both operands are fp32. Into a bf16
// output, whose own rounding (2^-9) dwarfs the rest, the terms down to 2^-8 of the leading one suffice.
#include "common.cuh"

// The three pieces of v, each from the residual of the one before (exact: the residual fits fp32).
__device__ __forceinline__ void f32Pieces(float v, __nv_bfloat16 h[3]) {
    h[0] = __float2bfloat16_rn(v);
    if (!isfinite(v)) {   // inf/NaN: the leading piece carries it
        h[1] = h[2] = __float2bfloat16_rn(0.f);
        return;
    }
    float r = v - __bfloat162float(h[0]);
    h[1] = __float2bfloat16_rn(r);
    h[2] = __float2bfloat16_rn(r - __bfloat162float(h[1]));
}

// src viewed as [outer][inner] fp32; dst [outer][blocks][inner] bf16 with dst[o][t][i] = piece (code >> 2t & 3)
// of src[o][i]. Lays the pieces of an operand side by side along a GEMM dimension (the matrix's rows when
// inner is a row's length, whole copies when outer is 1). A thread per source element writes its blocks;
// n = outer * inner. 32-bit index math where it fits (the 64-bit division dominated the first version).
template <typename I>
__device__ __forceinline__ void splitF32(const float* src, __nv_bfloat16* dst, I inner, int blocks, int code, I n) {
    for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (I)gridDim.x * blockDim.x) {
        I o = i / inner, c = i - o * inner;
        float v = src[i];
        __nv_bfloat16 h[3];
        f32Pieces(v, h);
        __nv_bfloat16* d = dst + (i64)o * blocks * inner + c;
        for (int t = 0; t < blocks; t++) d[(i64)t * inner] = h[(code >> (2 * t)) & 3];
    }
}

// splitF32 four source elements a thread (inner % 4 == 0, src 16- and dst 8-byte aligned): one 16-byte load and an
// 8-byte store per block instead of four 4-byte loads and twelve 2-byte stores. The same pieces.
extern "C" __global__ void k_split_f32_bf16_x4(const float4* src, uint2* dst, int inner4, int blocks, int code, int n4) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += gridDim.x * blockDim.x) {
        int o = i / inner4, c = i - o * inner4;
        float4 v = src[i];
        __nv_bfloat16 a[3], b[3], d[3], e[3];
        f32Pieces(v.x, a); f32Pieces(v.y, b); f32Pieces(v.z, d); f32Pieces(v.w, e);
        // piece q of each value, selected without indexing the arrays by a runtime q (which would put them on the stack)
        __nv_bfloat162 lo[3] = {__halves2bfloat162(a[0], b[0]), __halves2bfloat162(a[1], b[1]), __halves2bfloat162(a[2], b[2])};
        __nv_bfloat162 hi[3] = {__halves2bfloat162(d[0], e[0]), __halves2bfloat162(d[1], e[1]), __halves2bfloat162(d[2], e[2])};
        for (int t = 0; t < blocks; t++) {
            int q = (code >> (2 * t)) & 3;
            __nv_bfloat162 l = q == 0 ? lo[0] : q == 1 ? lo[1] : lo[2], h = q == 0 ? hi[0] : q == 1 ? hi[1] : hi[2];
            uint2 w;
            w.x = *reinterpret_cast<unsigned*>(&l);
            w.y = *reinterpret_cast<unsigned*>(&h);
            dst[((i64)o * blocks + t) * inner4 + c] = w;
        }
    }
}

extern "C" __global__ void k_split_f32_bf16(const float* src, __nv_bfloat16* dst, i64 inner, int blocks, int code, i64 n) {
    if (n < (1LL << 31)) splitF32<int>(src, dst, (int)inner, blocks, code, (int)n);
    else splitF32<i64>(src, dst, inner, blocks, code, n);
}

// dst[r, c] = alpha * sum_p src[r * rowStride + p * pieceStride + c] + beta * dst[r, c] (beta 0: dst not read);
// dst [rows, cols] of dtype ddt. The sum of the pieces' partial products, in a fixed order.
template <typename I>
__device__ __forceinline__ void sumPieces(const float* src, I rowStride, I pieceStride, int pieces, float alpha, float beta,
                                          void* dst, int ddt, I cols, I n) {
    for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (I)gridDim.x * blockDim.x) {
        I r = i / cols, c = i - r * cols;
        const float* s = src + (i64)r * rowStride + c;
        float acc = 0.f;
        for (int p = 0; p < pieces; p++) acc += s[(i64)p * pieceStride];
        acc *= alpha;
        if (beta != 0.f) acc += beta * ld(dst, ddt, i);
        st(dst, ddt, i, acc);
    }
}

extern "C" __global__ void k_sum_pieces(const float* src, i64 rowStride, i64 pieceStride, int pieces, float alpha, float beta,
                             void* dst, int ddt, i64 cols, i64 n) {
    if ((i64)pieces * pieceStride + n < (1LL << 31) && rowStride * (n / cols) < (1LL << 31))
        sumPieces<int>(src, (int)rowStride, (int)pieceStride, pieces, alpha, beta, dst, ddt, (int)cols, (int)n);
    else
        sumPieces<i64>(src, rowStride, pieceStride, pieces, alpha, beta, dst, ddt, cols, n);
}

