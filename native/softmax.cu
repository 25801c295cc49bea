// Row softmax and the softmax-based losses (cross-entropy, distillation KL), forward and backward.
// Rows are [N, V]; one block per row, fp32 arithmetic with a max-subtracted exponent.
#include "common.cuh"

// Whether row base of x can be read 8 bf16 at a time (16-byte loads).
__device__ __forceinline__ bool bf16Rows8(const void* x, int dt, int V) {
    return dt == DT_BF16 && V % 8 == 0 && ((size_t)x & 15) == 0;
}

// (m, s) += the values of another running pair: s sums exp(x - m) over the values seen, m their maximum.
__device__ __forceinline__ void lseMerge(float& m, float& s, float m2, float s2) {
    float mm = fmaxf(m, m2);
    if (mm == -INFINITY) return;
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

// log sum_j exp(scale * x[base + j]) over V elements (block-wide; all threads get it). One pass over the row: each
// thread keeps a running maximum and the sum of exponentials relative to it (rescaled when the maximum grows), and
// the block merges the pairs. (Two passes, max then sum, read a 50K-vocabulary row of logits twice: the loss and its
// gradient were 2.7 ms of a 350M training step.)
__device__ float rowLogSumExp(const void* x, int dt, i64 base, int V, float scale) {
    float m = -INFINITY, s = 0.f;
    if (bf16Rows8(x, dt, V)) {
        const uint4* r = reinterpret_cast<const uint4*>((const __nv_bfloat16*)x + base);
        for (int j = threadIdx.x; j < V / 8; j += blockDim.x) {
            float v[8];
            unpack8(r[j], v);
            float cm = m;
#pragma unroll
            for (int k = 0; k < 8; k++) { v[k] *= scale; cm = fmaxf(cm, v[k]); }
            if (cm == -INFINITY) continue;
            float cs = s * expf(m - cm);
#pragma unroll
            for (int k = 0; k < 8; k++) cs += expf(v[k] - cm);
            m = cm;
            s = cs;
        }
    } else {
        for (int j = threadIdx.x; j < V; j += blockDim.x) lseMerge(m, s, scale * ld(x, dt, base + j), 1.f);
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lseMerge(m, s, m2, s2);
    }
    __shared__ float pm[32], ps[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();   // an earlier call's readers of total are done
    if (lane == 0) { pm[warp] = m; ps[warp] = s; }
    __syncthreads();
    if (warp == 0) {
        m = lane < nw ? pm[lane] : -INFINITY;
        s = lane < nw ? ps[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
            lseMerge(m, s, m2, s2);
        }
        if (lane == 0) total = m + logf(s);
    }
    __syncthreads();
    return total;
}

extern "C" {

// out = softmax(x) per row; x, out [N, C]
__global__ void k_softmax(const void* x, int xdt, void* out, int odt, int C) {
    i64 base = (i64)blockIdx.x * C;
    float lse = rowLogSumExp(x, xdt, base, C, 1.f);
    for (int j = threadIdx.x; j < C; j += blockDim.x) st(out, odt, base + j, expf(ld(x, xdt, base + j) - lse));
}

// dx = y * (dy - sum(dy * y)) per row
__global__ void k_softmax_bwd(const void* y, int ydt, const void* dy, int gdt, void* dx, int dxdt, int C) {
    i64 base = (i64)blockIdx.x * C;
    float d = 0.f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) d += ld(y, ydt, base + j) * ld(dy, gdt, base + j);
    d = blockSum(d);
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        float yv = ld(y, ydt, base + j);
        st(dx, dxdt, base + j, yv * (ld(dy, gdt, base + j) - d));
    }
}

// losses[n] = logsumexp(logits[n]) - logits[n, t], 0 where t < 0; logits [N, V], targets I32 [N].
// A target >= V gives NaN (the host cannot check device targets without a sync; the NaN makes it visible).
__global__ void k_cross_entropy(const void* logits, int ldt, const int* targets, void* losses, int odt, int V) {
    i64 n = blockIdx.x, base = n * V;
    int t = targets[n];
    if (t < 0) { if (threadIdx.x == 0) st(losses, odt, n, 0.f); return; }
    float lse = rowLogSumExp(logits, ldt, base, V, 1.f);
    if (threadIdx.x == 0) st(losses, odt, n, t >= V ? NAN : lse - ld(logits, ldt, base + t));
}

// dlogits[n] = scale * (softmax(logits[n]) - onehot(t)), zero rows where t < 0 (assigned)
__global__ void k_cross_entropy_bwd(const void* logits, int ldt, const int* targets, float scale, void* dlogits, int ddt, int V) {
    i64 n = blockIdx.x, base = n * V;
    int t = targets[n];
    if (t < 0) {
        for (int j = threadIdx.x; j < V; j += blockDim.x) st(dlogits, ddt, base + j, 0.f);
        return;
    }
    float lse = rowLogSumExp(logits, ldt, base, V, 1.f);
    if (bf16Rows8(logits, ldt, V) && bf16Rows8(dlogits, ddt, V)) {
        const uint4* r = reinterpret_cast<const uint4*>((const __nv_bfloat16*)logits + base);
        uint4* w = reinterpret_cast<uint4*>((__nv_bfloat16*)dlogits + base);
        for (int j = threadIdx.x; j < V / 8; j += blockDim.x) {
            float v[8];
            unpack8(r[j], v);
            unsigned o[4];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                float a = scale * expf(v[2 * k] - lse) - (8 * j + 2 * k == t ? scale : 0.f);
                float b = scale * expf(v[2 * k + 1] - lse) - (8 * j + 2 * k + 1 == t ? scale : 0.f);
                __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
                o[k] = *reinterpret_cast<unsigned*>(&h);
            }
            w[j] = make_uint4(o[0], o[1], o[2], o[3]);
        }
        return;
    }
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float p = expf(ld(logits, ldt, base + j) - lse);
        st(dlogits, ddt, base + j, scale * p - (j == t ? scale : 0.f));
    }
}

// losses[n] = T^2 * KL(softmax(teacher/T) || softmax(student/T)); student, teacher [N, V]
__global__ void k_distill(const void* s, int sdt, const void* t, int tdt, float temp, void* losses, int odt, int V) {
    i64 base = (i64)blockIdx.x * V;
    float inv = 1.f / temp;
    float lseS = rowLogSumExp(s, sdt, base, V, inv), lseT = rowLogSumExp(t, tdt, base, V, inv);
    float kl = 0.f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float lpt = ld(t, tdt, base + j) * inv - lseT, lps = ld(s, sdt, base + j) * inv - lseS;
        kl += expf(lpt) * (lpt - lps);
    }
    kl = blockSum(kl);
    if (threadIdx.x == 0) st(losses, odt, blockIdx.x, temp * temp * kl);
}

// dstudent = scale * T * (softmax(student/T) - softmax(teacher/T)) (assigned)
__global__ void k_distill_bwd(const void* s, int sdt, const void* t, int tdt, float temp, float scale, void* ds, int ddt, int V) {
    i64 base = (i64)blockIdx.x * V;
    float inv = 1.f / temp;
    float lseS = rowLogSumExp(s, sdt, base, V, inv), lseT = rowLogSumExp(t, tdt, base, V, inv);
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float ps = expf(ld(s, sdt, base + j) * inv - lseS), pt = expf(ld(t, tdt, base + j) * inv - lseT);
        st(ds, ddt, base + j, scale * temp * (ps - pt));
    }
}

}  // extern "C"
