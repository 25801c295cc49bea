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

