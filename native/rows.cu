// Row indexing ops: token + position embedding (and its backward), gather rows, scatter-add rows.
#include "common.cuh"

extern "C" {

// out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:] (wpe nullable); tokens I32 [B,T], wte [V,C], out [B*T, C], n = B*T*C.
// A token outside [0, V) writes NaN (the host checks nothing on the device; the NaN makes it visible).
__global__ void k_embedding(const int* tokens, const void* wte, int edt, const void* wpe, int pdt, void* out, int odt,
                            i64 n, int T, int C, int V) {
    FOR_N(i, n) {
        i64 r = i / C; int c = (int)(i % C);
        int tok = tokens[r];
        float v = (tok < 0 || tok >= V) ? NAN : ld(wte, edt, (i64)tok * C + c);
        if (wpe != nullptr) v += ld(wpe, pdt, (i64)(r % T) * C + c);
        st(out, odt, i, v);
    }
}

// F32 dwte: dwte[tokens[r], c] += dout[r, c], one thread per element with fp32 atomics (fast; the order of
// the additions into a repeated token's row, so its last bits, may vary between runs). A BF16 dwte goes through
// an F32 copy (CudaBackend.addInF32).
__global__ void k_embedding_bwd_wte_atomic(const void* dout, int gdt, const int* tokens, float* dwte, i64 n, int C) {
    FOR_N(i, n) {
        i64 r = i / C; int c = (int)(i % C);
        atomicAdd(dwte + (i64)tokens[r] * C + c, ld(dout, gdt, i));
    }
}

// dwpe[t, c] += sum_b dout[b, t, c]; n = T * C
__global__ void k_embedding_bwd_wpe(const void* dout, int gdt, void* dwpe, int dt, i64 n, int B, int T, int C) {
    FOR_N(i, n) {
        float acc = 0.f;
        for (int b = 0; b < B; b++) acc += ld(dout, gdt, (i64)b * T * C + i);
        st(dwpe, dt, i, ld(dwpe, dt, i) + acc);
    }
}

// out[m, c] = src[idx[m], c], zero where idx[m] < 0; n = M * C
__global__ void k_gather_rows(const void* src, int sdt, const int* idx, void* out, int odt, i64 n, int C) {
    FOR_N(i, n) {
        i64 m = i / C; int c = (int)(i % C);
        int from = idx[m];
        st(out, odt, i, from < 0 ? 0.f : ld(src, sdt, (i64)from * C + c));
    }
}

// The same gather when src and out share a dtype: a bit-exact move of 2- or 4-byte elements (any dtype, I32
// included: the hierarchical all-to-all's layout transforms move token ids and counts too).
__global__ void k_gather_rows_raw(const void* src, const int* idx, void* out, int elemBytes, i64 n, int C) {
    FOR_N(i, n) {
        i64 m = i / C; int c = (int)(i % C);
        int from = idx[m];
        if (elemBytes == 4) ((unsigned*)out)[i] = from < 0 ? 0u : ((const unsigned*)src)[(i64)from * C + c];
        else ((unsigned short*)out)[i] = from < 0 ? (unsigned short)0 : ((const unsigned short*)src)[(i64)from * C + c];
    }
}

// k_gather_rows_raw for rows of whole 16-byte chunks (c16 chunks per row, 16-byte aligned): one chunk per thread,
// the layout transforms of expert parallelism move [rows, hidden] bf16 activations. n16 = rows * c16 (< 2^31).
__global__ void k_gather_rows_16b(const uint4* src, const int* idx, uint4* out, int n16, int c16) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += gridDim.x * blockDim.x) {
        int m = i / c16, c = i - m * c16;
        int from = idx[m];
        out[i] = from < 0 ? make_uint4(0, 0, 0, 0) : src[(i64)from * c16 + c];
    }
}

// Row m of src to row dest[m].y of destination dest[m].x (skipped where dest[m].x < 0), in 16-byte chunks (c16 a row,
// n16 = rows * c16 < 2^31): the expert-parallel exchange, whose destinations are the ranks' windows, the peers' mapped
// by CUDA IPC so that these stores cross NVLink. Eight destinations at most (one node's GPUs), passed as arguments.
__global__ void k_scatter_rows_to_16b(const uint4* src, const int* dest, uint4* d0, uint4* d1, uint4* d2, uint4* d3,
                                      uint4* d4, uint4* d5, uint4* d6, uint4* d7, int n16, int c16) {
    PeerRows to{dest, d0, d1, d2, d3, d4, d5, d6, d7, c16};
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += gridDim.x * blockDim.x) {
        int m = i / c16, c = i - m * c16;
        uint4* row = to.row(m);
        if (row != nullptr) row[c] = src[i];
    }
}

// F32 dst: dst[idx[m], c] += w[m] * src[m, c] for idx[m] >= 0 (w nullable: 1), one thread per element and fp32
// atomics (fast when many rows share a destination, e.g. expert-bias gradients; the summation order, so the last
// bits, may vary). A BF16 dst goes through an F32 copy (CudaBackend.addInF32).
__global__ void k_scatter_add_rows_atomic(const void* src, int sdt, const int* idx, const void* w, int wdt, float* dst, i64 n, int C) {
    FOR_N(i, n) {
        i64 m = i / C; int c = (int)(i % C);
        int to = idx[m];
        if (to < 0) continue;
        float wm = w == nullptr ? 1.f : ld(w, wdt, m);
        atomicAdd(dst + (i64)to * C + c, wm * ld(src, sdt, i));
    }
}

}  // extern "C"
