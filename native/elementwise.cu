// Elementwise ops, bias, row sums and activations (forward and backward side by side).
// Shapes: x/out seen as [N, C] matrices, leading dims flattened; n = element count.
#include "common.cuh"

extern "C" {

// p[0..n) = v (floating or I32 through the same store helper).
__global__ void k_fill(void* p, int dt, i64 n, double v) {
    FOR_N(i, n) {
        if (dt == DT_I32) ((int*)p)[i] = (int)v; else st(p, dt, i, (float)v);
    }
}

// dst[i] = src[i] with dtype conversion (same-dtype copies use cudaMemcpyAsync instead).
__global__ void k_convert(const void* src, int sdt, void* dst, int ddt, i64 n) {
    FOR_N(i, n) {
        if (sdt == DT_I32 && ddt == DT_I32) ((int*)dst)[i] = ((const int*)src)[i];
        else st(dst, ddt, i, ld(src, sdt, i));
    }
}

// out = alpha * a + beta * b   (out may alias a or b: each element is read before it is written)
__global__ void k_add(const void* a, int adt, double alpha, const void* b, int bdt, double beta, void* out, int odt, i64 n) {
    float fa = (float)alpha, fb = (float)beta;
    FOR_N(i, n) st(out, odt, i, fa * ld(a, adt, i) + fb * ld(b, bdt, i));
}

// The commonest elementwise ops on 8 bf16 (or 8 fp32) elements per thread, 16-byte accesses: residual adds and
// dtype conversions of activations, where the generic kernels above spend their time on per-element dtype
// branches. The same float math as k_add / k_convert, so bit-identical results. n8 = elements / 8.
// fa * va + fb * vb for 8 bf16 values each, in fp32, rounded once (the 8-wide add and bias kernels).
__device__ __forceinline__ uint4 axpby8(float fa, uint4 va, float fb, uint4 vb) {
    const __nv_bfloat162* ha = (const __nv_bfloat162*)&va;
    const __nv_bfloat162* hb = (const __nv_bfloat162*)&vb;
    uint4 r;
    __nv_bfloat162* hr = (__nv_bfloat162*)&r;
#pragma unroll
    for (int q = 0; q < 4; q++) {
        float2 x = __bfloat1622float2(ha[q]), y = __bfloat1622float2(hb[q]);
        hr[q] = __floats2bfloat162_rn(fa * x.x + fb * y.x, fa * x.y + fb * y.y);
    }
    return r;
}

__global__ void k_add_bf16x8(const uint4* a, double alpha, const uint4* b, double beta, uint4* out, i64 n8) {
    float fa = (float)alpha, fb = (float)beta;
    FOR_N(i, n8) out[i] = axpby8(fa, a[i], fb, b[i]);
}

__global__ void k_convert_bf16_f32_x8(const uint4* src, float4* dst, i64 n8) {
    FOR_N(i, n8) {
        uint4 v = src[i];
        const __nv_bfloat162* h = (const __nv_bfloat162*)&v;
        float2 f0 = __bfloat1622float2(h[0]), f1 = __bfloat1622float2(h[1]), f2 = __bfloat1622float2(h[2]), f3 = __bfloat1622float2(h[3]);
        dst[2 * i] = make_float4(f0.x, f0.y, f1.x, f1.y);
        dst[2 * i + 1] = make_float4(f2.x, f2.y, f3.x, f3.y);
    }
}

__global__ void k_convert_f32_bf16_x8(const float4* src, uint4* dst, i64 n8) {
    FOR_N(i, n8) {
        float4 a = src[2 * i], b = src[2 * i + 1];
        uint4 r;
        __nv_bfloat162* h = (__nv_bfloat162*)&r;
        h[0] = __floats2bfloat162_rn(a.x, a.y);
        h[1] = __floats2bfloat162_rn(a.z, a.w);
        h[2] = __floats2bfloat162_rn(b.x, b.y);
        h[3] = __floats2bfloat162_rn(b.z, b.w);
        dst[i] = r;
    }
}

// out = a * b
__global__ void k_mul(const void* a, int adt, const void* b, int bdt, void* out, int odt, i64 n) {
    FOR_N(i, n) st(out, odt, i, ld(a, adt, i) * ld(b, bdt, i));
}

// out = alpha * x
__global__ void k_scale(const void* x, int xdt, double alpha, void* out, int odt, i64 n) {
    float fa = (float)alpha;
    FOR_N(i, n) st(out, odt, i, fa * ld(x, xdt, i));
}

// out[r, c] = x[r, c] + bias[c];  x, out [N, C], bias [C]
// (group: null for one bias row; else I32 [N / C], each row's bias row, zero where negative: Backend.addGroupBias)
__global__ void k_add_bias(const void* x, int xdt, const void* bias, int bdt, const int* group, void* out, int odt, i64 n, int C) {
    FOR_N(i, n) {
        i64 g = group ? group[i / C] : 0;
        st(out, odt, i, ld(x, xdt, i) + (g < 0 ? 0.f : ld(bias, bdt, g * C + i % C)));
    }
}

// The same for bf16 x, bias and out, 8 elements a thread (C % 8 == 0, 32-bit indices; c8 = C / 8): the generic
// kernel spends its time on the 64-bit modulo and dtype branches. The same float math, so bit-identical results.
__global__ void k_add_bias_bf16x8(const uint4* x, const uint4* bias, const int* group, uint4* out, int n8, int c8) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += gridDim.x * blockDim.x) {
        int g = group ? group[i / c8] : 0;
        uint4 vb = g < 0 ? make_uint4(0u, 0u, 0u, 0u) : bias[(i64)g * c8 + i % c8];
        out[i] = axpby8(1.f, x[i], 1.f, vb);   // 1 * v is exact: the same sums as x + b
    }
}

// out[c] = beta * out[c] + sum_r x[r, c];  x [N, C], out [C]. One thread per column: reads are coalesced
// across the warp and the sum order is fixed (deterministic).
__global__ void k_sum_rows(const void* x, int xdt, void* out, int odt, int N, int C, float beta) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float acc = 0.f;
    for (int r = 0; r < N; r++) acc += ld(x, xdt, (i64)r * C + c);
    float prev = beta == 0.f ? 0.f : beta * ld(out, odt, c);
    st(out, odt, c, prev + acc);
}

// Column sums in two deterministic passes (enough parallelism for tall matrices): grid (ceil(C/128), P),
// block y sums rows [y*chunk, (y+1)*chunk) of its columns into partial [P, C]; k_sum_rows_final adds the P
// partials in order.
__global__ void k_sum_rows_partial(const void* x, int xdt, float* partial, int N, int C, int chunk) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    int r0 = blockIdx.y * chunk, r1 = min(N, r0 + chunk);
    float acc = 0.f;
#pragma unroll 8
    for (int r = r0; r < r1; r++) acc += ld(x, xdt, (i64)r * C + c);   // unrolled: eight loads in flight per thread
    partial[(i64)blockIdx.y * C + c] = acc;
}

// out[0..7] = acc (out 16-byte aligned): a thread's eight column sums into the partials.
__device__ __forceinline__ void store8(float* out, const float (&acc)[8]) {
    float4* o = (float4*)out;
    o[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    o[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
}

// out[0..7] = the sums over rows r0 .. r1-1 of the j-th 8 columns of bf16 x (c8 16-byte chunks a row), in row order.
__device__ __forceinline__ void sumRowsBf16x8(const uint4* x, int c8, int j, int r0, int r1, float* out) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 8
    for (int r = r0; r < r1; r++) {
        float f[8];
        unpack8(x[(i64)r * c8 + j], f);
#pragma unroll
        for (int q = 0; q < 8; q++) acc[q] += f[q];
    }
    store8(out, acc);
}

// k_sum_rows_partial for bf16 x, 8 columns a thread (16-byte loads; C % 8 == 0, c8 = C / 8): the same row order
// per column, so the same partial sums.
__global__ void k_sum_rows_partial_bf16x8(const uint4* x, float* partial, int N, int c8, int chunk) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c8) return;
    int r0 = blockIdx.y * chunk, r1 = min(N, r0 + chunk);
    sumRowsBf16x8(x, c8, j, r0, r1, partial + (i64)blockIdx.y * c8 * 8 + (i64)j * 8);
}

// Column sums per row group (Backend.sumRowsGrouped, the bias gradient of grouped experts). Each group's rows
// offsets[g] .. offsets[g+1] are cut into blocks of RB rows; the groups' blocks are numbered in order (group g's
// first is the sum of ceil(n_h / RB) over h < g), so blocks are as many as the rows need however unevenly the rows
// fall into groups (a per-group split gave the largest group's threads the longest chains: 90 us for a 64 MB
// [8192, 4096] bf16 gradient). grid (ceil(C / 128), at least the blocks' count), partial [blocks, C]; blocks past
// the count exit. The generic form (a column a thread) and the bf16 one (8 columns a thread, c8 = C / 8).
// The block number of group g's first row block, or of the end (g = G).
__device__ __forceinline__ int groupFirstBlock(const int* offsets, int g, int RB) {
    int start = 0;
    for (int h = 0; h < g; h++) start += (offsets[h + 1] - offsets[h] + RB - 1) / RB;
    return start;
}

// Row range [r0, r1) of row block y (r0 = r1 where y is past the last block), found by thread 0.
__device__ __forceinline__ void groupedRows(const int* offsets, int G, int RB, int y, int& r0, int& r1) {
    __shared__ int range[2];
    if (threadIdx.x == 0) {
        int start = 0, a = 0, b = 0;
        for (int h = 0; h < G; h++) {
            int nb = (offsets[h + 1] - offsets[h] + RB - 1) / RB;
            if (y < start + nb) { a = offsets[h] + (y - start) * RB; b = min(offsets[h + 1], a + RB); break; }
            start += nb;
        }
        range[0] = a; range[1] = b;
    }
    __syncthreads();
    r0 = range[0]; r1 = range[1];
}

__global__ void k_sum_rows_grouped_partial(const void* x, int xdt, const int* offsets, int G, int RB, float* partial, int C) {
    int r0, r1;
    groupedRows(offsets, G, RB, blockIdx.y, r0, r1);
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C || r0 == r1) return;
    float acc = 0.f;
#pragma unroll 8
    for (int r = r0; r < r1; r++) acc += ld(x, xdt, (i64)r * C + c);
    partial[(i64)blockIdx.y * C + c] = acc;
}

__global__ void k_sum_rows_grouped_partial_bf16x8(const uint4* x, const int* offsets, int G, int RB, float* partial, int c8) {
    int r0, r1;
    groupedRows(offsets, G, RB, blockIdx.y, r0, r1);
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c8 || r0 == r1) return;
    sumRowsBf16x8(x, c8, j, r0, r1, partial + (i64)blockIdx.y * c8 * 8 + (i64)j * 8);
}

// out[g, c] += the partial sums of group g's row blocks, in order; grid (ceil(C/32), G), 256 threads as
// k_sum_rows_final (deterministic order).
__global__ void k_sum_rows_grouped_final(const float* partial, const int* offsets, int RB, void* out, int odt, int C) {
    __shared__ float part[8][33];
    __shared__ int span[2];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, c = blockIdx.x * 32 + lane, g = blockIdx.y;
    if (threadIdx.x == 0) {
        int first = groupFirstBlock(offsets, g, RB);
        span[0] = first;
        span[1] = first + (offsets[g + 1] - offsets[g] + RB - 1) / RB;
    }
    __syncthreads();
    float acc = 0.f;
    if (c < C) for (int p = span[0] + w; p < span[1]; p += 8) acc += partial[(i64)p * C + c];
    part[w][lane] = acc;
    __syncthreads();
    if (w == 0 && c < C) {
        float t = 0.f;
        for (int q = 0; q < 8; q++) t += part[q][lane];
        i64 o = (i64)g * C + c;
        st(out, odt, o, ld(out, odt, o) + t);
    }
}

// out[c] = beta * out[c] + sum_p partial[p, c]; 32 columns a block of 256 threads: the 8 warps take every 8th
// partial (loads coalesced across the 32 columns), then warp 0 adds the 8 sums in order (deterministic).
__global__ void k_sum_rows_final(const float* partial, int P, void* out, int odt, int C, float beta) {
    __shared__ float part[8][33];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, c = blockIdx.x * 32 + lane;
    float acc = 0.f;
    if (c < C) for (int p = w; p < P; p += 8) acc += partial[(i64)p * C + c];
    part[w][lane] = acc;
    __syncthreads();
    if (w == 0 && c < C) {
        float t = 0.f;
        for (int q = 0; q < 8; q++) t += part[q][lane];
        float prev = beta == 0.f ? 0.f : beta * ld(out, odt, c);
        st(out, odt, c, prev + t);
    }
}

// out[r] = sum_c a[r, c] * b[r, c];  one block per row
__global__ void k_row_dot(const void* a, int adt, const void* b, int bdt, void* out, int odt, int C) {
    i64 r = blockIdx.x;
    float acc = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) acc += ld(a, adt, r * C + c) * ld(b, bdt, r * C + c);
    acc = blockSum(acc);
    if (threadIdx.x == 0) st(out, odt, r, acc);
}

// x[r, c] + bias[group[r], c] as the activations read it: bias null (or group[r] < 0) adds nothing; x and bias
// share the row width W (Backend.activationGroupBias).
__device__ __forceinline__ float actIn(const void* x, int xdt, const void* bias, int bdt, const int* group, i64 r, int W, int c) {
    float v = ld(x, xdt, r * W + c);
    if (bias == nullptr) return v;
    int g = group[r];
    return g < 0 ? v : v + ld(bias, bdt, (i64)g * W + c);
}

// out [N, F] = act(x (+ its row's group bias)), x [N, W] with W = 2F for the gated activations (laid out [a | b] per
// row), else F.
__global__ void k_activation(int act, const void* x, int xdt, const void* bias, int bdt, const int* group, void* out, int odt, i64 n, int F) {
    int W = (act == ACT_GEGLU || act == ACT_SWIGLU) ? 2 * F : F;
    FOR_N(i, n) {
        i64 r = i / F; int j = (int)(i % F);
        float v = actIn(x, xdt, bias, bdt, group, r, W, j), y;
        switch (act) {
            case ACT_RELU: y = v > 0.f ? v : 0.f; break;
            case ACT_GELU: y = gelu_f(v); break;
            case ACT_GEGLU: y = gelu_f(v) * actIn(x, xdt, bias, bdt, group, r, W, F + j); break;
            default: y = v * sigmoid_f(v) * actIn(x, xdt, bias, bdt, group, r, W, F + j); break;
        }
        st(out, odt, i, y);
    }
}

// dx [N, W] from dout [N, F] (assigned); n = N * F; the group bias as in k_activation
__global__ void k_activation_bwd(int act, const void* x, int xdt, const void* bias, int bdt, const int* group, const void* dout, int gdt,
                                 void* dx, int dxdt, i64 n, int F) {
    int W = (act == ACT_GEGLU || act == ACT_SWIGLU) ? 2 * F : F;
    FOR_N(i, n) {
        i64 r = i / F; int j = (int)(i % F);
        float v = actIn(x, xdt, bias, bdt, group, r, W, j), g = ld(dout, gdt, i);
        switch (act) {
            case ACT_RELU: st(dx, dxdt, r * W + j, v > 0.f ? g : 0.f); break;
            case ACT_GELU: st(dx, dxdt, r * W + j, g * gelu_grad(v)); break;
            case ACT_GEGLU: {
                float b = actIn(x, xdt, bias, bdt, group, r, W, F + j);
                st(dx, dxdt, r * W + j, g * b * gelu_grad(v));
                st(dx, dxdt, r * W + F + j, g * gelu_f(v));
                break;
            }
            default: {
                float b = actIn(x, xdt, bias, bdt, group, r, W, F + j), s = sigmoid_f(v);
                st(dx, dxdt, r * W + j, g * b * s * (1.f + v * (1.f - s)));
                st(dx, dxdt, r * W + F + j, g * v * s);
                break;
            }
        }
    }
}

// The non-gated activations on bf16 tensors, 8 elements per thread through 16-byte loads: the expert FFN's
// widest elementwise ops ([tokens, ffn]), where the generic kernels above spend their time on 64-bit index math
// and one-element loads. The same float math (actPlain, actPlainGrad), so the results are bit-identical to theirs.
// n8 = elements / 8.

__global__ void k_activation_bf16x8(int act, const uint4* x, uint4* out, i64 n8) {
    FOR_N(i, n8) {
        uint4 v = x[i];
        __nv_bfloat162* h = (__nv_bfloat162*)&v;
#pragma unroll
        for (int q = 0; q < 4; q++) {
            float2 f = __bfloat1622float2(h[q]);
            h[q] = __floats2bfloat162_rn(actPlain(act, f.x), actPlain(act, f.y));
        }
        out[i] = v;
    }
}

__global__ void k_activation_bwd_bf16x8(int act, const uint4* x, const uint4* dout, uint4* dx, i64 n8) {
    FOR_N(i, n8) {
        uint4 v = x[i], g = dout[i];
        __nv_bfloat162* hv = (__nv_bfloat162*)&v;
        const __nv_bfloat162* hg = (const __nv_bfloat162*)&g;
#pragma unroll
        for (int q = 0; q < 4; q++) {
            float2 f = __bfloat1622float2(hv[q]), d = __bfloat1622float2(hg[q]);
            hv[q] = __floats2bfloat162_rn(actPlainGrad(act, f.x, d.x), actPlainGrad(act, f.y, d.y));
        }
        dx[i] = v;
    }
}

// The expert bank's first bias fused into its activation (Backend.activationGroupBias): out = act(x + bias[g]) with
// g = group[row] (no bias where g < 0), the sum in fp32 and rounded once. One pass instead of a bias add that
// writes the pre-activation and an activation that reads it back; the backward recomputes x + bias.
// Non-gated activations, bf16, 8 elements a thread (C % 8 == 0, c8 = C / 8, 32-bit indices).
__device__ __forceinline__ uint4 groupBias8(const uint4* bias, const int* group, int r, int c8, int j) {
    int g = group[r];
    return g < 0 ? make_uint4(0u, 0u, 0u, 0u) : bias[(i64)g * c8 + j];
}

__global__ void k_bias_act_bf16x8(int act, const uint4* x, const uint4* bias, const int* group, uint4* out, int n8, int c8) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += gridDim.x * blockDim.x) {
        uint4 v = x[i], vb = groupBias8(bias, group, i / c8, c8, i % c8);
        __nv_bfloat162* h = (__nv_bfloat162*)&v;
        const __nv_bfloat162* hb = (const __nv_bfloat162*)&vb;
#pragma unroll
        for (int q = 0; q < 4; q++) {
            float2 f = __bfloat1622float2(h[q]), b = __bfloat1622float2(hb[q]);
            h[q] = __floats2bfloat162_rn(actPlain(act, f.x + b.x), actPlain(act, f.y + b.y));
        }
        out[i] = v;
    }
}

// Its backward (Backend.activationGroupBiasBackward): dx = act'(x + bias[group[r]]) * dout (assigned, bf16) and,
// over the rows of each group (offsets[g] .. offsets[g+1]), the column sums of the stored dx in the row blocks and
// partial layout of k_sum_rows_grouped_partial_bf16x8 (k_sum_rows_grouped_final adds them): the bias gradient
// without reading dx a second time. Row blocks after the groups' ones take the rows from offsets[G] to N (dx only,
// no sums). grid (ceil(c8 / 128), N / RB + G + 1); blocks with no rows exit.
__global__ void k_bias_act_bwd_grouped_bf16x8(int act, const uint4* x, const uint4* bias, const int* group, const uint4* dout,
                                              uint4* dx, const int* offsets, int G, int RB, int N, float* partial, int c8) {
    int r0, r1;
    groupedRows(offsets, G, RB, blockIdx.y, r0, r1);
    bool sums = r0 != r1;
    if (!sums) {   // past the groups' blocks: the tail rows, RB a block
        int t = (int)blockIdx.y - groupFirstBlock(offsets, G, RB);
        r0 = min(N, offsets[G] + t * RB);
        r1 = min(N, r0 + RB);
    }
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c8 || r0 >= r1) return;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
    for (int r = r0; r < r1; r++) {
        i64 i = (i64)r * c8 + j;
        uint4 v = x[i], g = dout[i], vb = groupBias8(bias, group, r, c8, j);
        __nv_bfloat162* hv = (__nv_bfloat162*)&v;
        const __nv_bfloat162* hg = (const __nv_bfloat162*)&g;
        const __nv_bfloat162* hb = (const __nv_bfloat162*)&vb;
#pragma unroll
        for (int q = 0; q < 4; q++) {
            float2 f = __bfloat1622float2(hv[q]), d = __bfloat1622float2(hg[q]), b = __bfloat1622float2(hb[q]);
            f.x += b.x;
            f.y += b.y;
            hv[q] = __floats2bfloat162_rn(actPlainGrad(act, f.x, d.x), actPlainGrad(act, f.y, d.y));
            float2 o = __bfloat1622float2(hv[q]);   // the sums are of the stored (rounded) gradient, as dW's GEMM reads it
            acc[2 * q] += o.x;
            acc[2 * q + 1] += o.y;
        }
        dx[i] = v;
    }
    if (sums) store8(partial + (i64)blockIdx.y * c8 * 8 + (i64)j * 8, acc);
}

// ------------------------------------------------------------------ random (Philox, see common.cuh)

// out[i] = lo + (hi - lo) * uniform(seed, offset + i), computed in fp64 like the CPU reference
__global__ void k_random_uniform(void* out, int dt, i64 n, double lo, double hi, unsigned long long seed, unsigned long long offset) {
    FOR_N(i, n) {
        uint4 b = philox(seed, offset + (unsigned long long)i);
        double u = (double)((b.x >> 8) * 0x1.0p-24f);
        stD(out, dt, i, lo + (hi - lo) * u);
    }
}

// out[i] = mean + std * normal(seed, offset + i)  (Box-Muller on the first two words, fp64)
__global__ void k_random_normal(void* out, int dt, i64 n, double mean, double stdv, unsigned long long seed, unsigned long long offset) {
    FOR_N(i, n) {
        uint4 b = philox(seed, offset + (unsigned long long)i);
        double u1 = ((double)(b.x >> 8) + 1.0) * 0x1.0p-24;
        double u2 = (double)(b.y >> 8) * 0x1.0p-24;
        double z = sqrt(-2.0 * log(u1)) * cos(2.0 * 3.141592653589793 * u2);
        stD(out, dt, i, mean + stdv * z);
    }
}

// ------------------------------------------------------------------ global reductions (fp64, two stages)

// partial[blockIdx.x] = sum (or sum of squares) of this block's grid-stride share of x
__global__ void k_reduce_partial(const void* x, int xdt, i64 n, int squares, double* partial) {
    double acc = 0.0;
    FOR_N(i, n) { double v = ld(x, xdt, i); acc += squares ? v * v : v; }
    acc = blockSumD(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// k_reduce_partial reading 16 bytes a load (8 bf16 or 4 fp32: n16 = n / per, every pointer 16-byte aligned): the
// generic kernel's per-element dtype branch held the squared gradient norm of a 1.9B model at 1.9 ms a call.
__global__ void k_reduce_partial_x16(const uint4* x, int xdt, i64 n16, int squares, double* partial) {
    double acc = 0.0;
    FOR_N(i, n16) {
        uint4 v = x[i];
        float f[8];
        int per = xdt == DT_BF16 ? 8 : 4;
        if (xdt == DT_BF16) {
            unpack8(v, f);
        } else {
            f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y); f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
        }
        for (int q = 0; q < per; q++) { double d = f[q]; acc += squares ? d * d : d; }
    }
    acc = blockSumD(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// out[0] = beta * out[0] + sum of the P partials (one block; fixed order, so deterministic)
__global__ void k_reduce_final(const double* partial, int P, void* out, int odt, float beta) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < P; i += blockDim.x) acc += partial[i];
    acc = blockSumD(acc);
    if (threadIdx.x == 0) {
        double prev = beta == 0.f ? 0.0 : (double)beta * ld(out, odt, 0);
        stD(out, odt, 0, prev + acc);
    }
}

// ------------------------------------------------------------------ optimizer

// The gradient clip factor min(1, maxNorm / sqrt(normSq)) of AdamW (1 without a norm), or -1 where normSq is not finite.
__device__ __forceinline__ float adamClip(const void* normSq, int nsdt, float maxNorm) {
    if (normSq == nullptr) return 1.f;
    float sq = ld(normSq, nsdt, 0);
    if (!isfinite(sq)) return -1.f;
    float norm = sqrtf(sq);
    return maxNorm > 0.f && norm > maxNorm ? maxNorm / norm : 1.f;
}

// Fused AdamW over a flat range. normSq (nullable) is the global squared gradient norm on the device:
// clip = min(1, maxNorm / sqrt(normSq)); a non-finite normSq skips the whole update (no host sync needed).
__global__ void k_adamw(void* param, int pdt, const void* grad, int gdt, void* m, int mdt, void* v, int vdt,
                        void* copy, int cdt, i64 n, float lr, float b1, float b2, float eps, float wd,
                        double c1, double c2, const void* normSq, int nsdt, float maxNorm) {
    float clip = adamClip(normSq, nsdt, maxNorm);
    if (clip < 0.f) return;   // a non-finite norm: skip the whole update
    float ic1 = (float)(1.0 / c1), ic2 = (float)(1.0 / c2);
    FOR_N(i, n) {
        float g = ld(grad, gdt, i) * clip;
        float mi = roundTo(mdt, b1 * ld(m, mdt, i) + (1.f - b1) * g);
        float vi = roundTo(vdt, b2 * ld(v, vdt, i) + (1.f - b2) * g * g);
        st(m, mdt, i, mi);
        st(v, vdt, i, vi);
        float p = ld(param, pdt, i);
        p -= lr * ((mi * ic1) / (sqrtf(vi * ic2) + eps) + wd * p);
        p = roundTo(pdt, p);
        st(param, pdt, i, p);
        if (copy != nullptr) st(copy, cdt, i, p);
    }
}

// k_adamw for fp32 param, m and v, 4 elements a thread (16-byte accesses; n4 = n / 4), grad fp32 or bf16, copy bf16
// or none: the generic kernel reads each element through dtype branches and 64-bit indexing. The same float math.
__global__ void k_adamw_f32x4(float4* param, const void* grad, int gdt, float4* m, float4* v, uint2* copy, i64 n4,
                              float lr, float b1, float b2, float eps, float wd, double c1, double c2,
                              const void* normSq, int nsdt, float maxNorm) {
    float clip = adamClip(normSq, nsdt, maxNorm);
    if (clip < 0.f) return;   // a non-finite norm: skip the whole update
    float ic1 = (float)(1.0 / c1), ic2 = (float)(1.0 / c2);
    FOR_N(i, n4) {
        float g[4];
        if (gdt == DT_F32) {
            float4 t = ((const float4*)grad)[i];
            g[0] = t.x; g[1] = t.y; g[2] = t.z; g[3] = t.w;
        } else {
            uint2 t = ((const uint2*)grad)[i];
            const __nv_bfloat162* h = (const __nv_bfloat162*)&t;
            float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
            g[0] = a.x; g[1] = a.y; g[2] = b.x; g[3] = b.y;
        }
        float4 m4 = m[i], v4 = v[i], p4 = param[i];
        float* mm = &m4.x; float* vv = &v4.x; float* pp = &p4.x;
#pragma unroll
        for (int q = 0; q < 4; q++) {
            float gq = g[q] * clip;
            mm[q] = b1 * mm[q] + (1.f - b1) * gq;
            vv[q] = b2 * vv[q] + (1.f - b2) * gq * gq;
            pp[q] -= lr * ((mm[q] * ic1) / (sqrtf(vv[q] * ic2) + eps) + wd * pp[q]);
        }
        m[i] = m4; v[i] = v4; param[i] = p4;
        if (copy != nullptr) {
            uint2 c;
            __nv_bfloat162* hc = (__nv_bfloat162*)&c;
            hc[0] = __floats2bfloat162_rn(pp[0], pp[1]);
            hc[1] = __floats2bfloat162_rn(pp[2], pp[3]);
            copy[i] = c;
        }
    }
}

}  // extern "C"
