// Row softmax and the softmax-based losses (cross-entropy, distillation KL), forward and backward.
// Rows are [N, V]; one block per row, fp32 arithmetic with a max-subtracted exponent.
#include "common.cuh"

// log sum_j exp(scale * x[base + j]) over V elements (block-wide; all threads get it)
__device__ float rowLogSumExp(const void* x, int dt, i64 base, int V, float scale) {
    float m = -INFINITY;
    for (int j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, scale * ld(x, dt, base + j));
    m = blockMax(m);
    float s = 0.f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) s += expf(scale * ld(x, dt, base + j) - m);
    s = blockSum(s);
    return m + logf(s);
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
