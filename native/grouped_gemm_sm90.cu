// Grouped GEMMs of the expert FFN on Hopper (sm_90a): wgmma fed by the bulk tensor copy (TMA), warp-specialized,
// reading the expert offsets on the device. Compiled on its own into moe4j_sm90a.fatbin (build-fatbin.sh), loaded
// only on a compute capability 9.0 device; the tensor maps are encoded by the caller (CudaBackend) and passed by
// value. Measured against cuBLAS in docs/benchmarks.md ("Grouped GEMM on wgmma"); moe-cuda/src/test/native/
// wgmma_grouped_probe.cu checks and times these kernels outside the JVM.
//
//   k_wg_nt:    C[rows_e, N] = A[rows_e, K] * W[e]^T + beta * C   (W [E, N, K]: map {K, N, E}, box {64, 256, 1})
//   k_wg_nn:    C[rows_e, N] = A[rows_e, K] * W[e]   + beta * C   (W [E, K, N]: map {N, K, E}, box {64, 64, 1})
//               either with the activation fused into its epilogue (EPI_* below: the forward's h and act(h), the
//               data gradient through act')
//   k_wg_wgrad: dW[e] [K, N] = A[rows_e, K]^T * dY[rows_e, N] + beta * dW[e]
//               (A: map {K, T}, box {64, 64}; dY: map {N, T}, box {64, 64}; dW: map {N, K, E} of its dtype, box
//               {128 bytes of columns, 64, 1}, written through by the bulk tensor copy)
// A (for the first two): map {K, T}, box {64, 128}. Every map bf16 with the 128-byte swizzle; coordinates past a
// map's end read zeros, so K and N need only be multiples of 8 (16-byte strides). C / dW bf16 or fp32 (cdt).
// The input maps are bf16.
//
// A block has 384 threads: warpgroup 0 produces (one thread issues the TMA loads of STAGES stages, each guarded by
// a full and an empty mbarrier), warpgroups 1 and 2 consume, each multiplying 64 rows by 256 columns with wgmma
// m64n256k16, one wgmma group in flight, releasing a stage when the group that read it is done: both the two halves
// of a 128-row tile (cooperative), or each its own 64-row tiles (the products' ping-pong schedule, k_wg_*_pp).
// A block walks tiles blockIdx.x, + gridDim.x, ...: the caller's grid makes it one tile per block or persistent.
#include "common.cuh"
#include <cuda.h>

// The products' epilogues (CudaBackend.EPI_*): EPI_PLAIN out = acc + beta * out; EPI_ACT (the experts' first
// product with its activation) out = h = acc and aux = act(h); EPI_ACT_GRAD (the second product's data gradient
// through the activation) out = act'(aux) * d, where d = acc and aux = h. h and d are rounded to out's dtype first,
// as the unfused path stores them, so fused and unfused give the same bits. aux has out's dtype and layout.
#define EPI_PLAIN 0
#define EPI_ACT 1
#define EPI_ACT_GRAD 2

namespace wg {

constexpr int BM = 128, BN = 256, BK = 64, THREADS = 384;
constexpr int STAGES = 4;          // the products' pipeline depth
constexpr int WGRAD_STAGES = 3;    // the weight gradient's, which also stages its output tiles (OUT_BYTES each)
constexpr int BOX = 64 * 128;      // one box of 64 rows of 128 bytes: 8 KiB
constexpr int STAGE_BYTES = (BM + BN) * 128, OUT_BYTES = 64 * BN * 2;
constexpr int EPI_BYTES = 64 * 64 * 4;   // the products' staging of one consumer warpgroup: 64 x 64 fp32 accumulators
constexpr int READ_BYTES = 64 * 128;     // ping-pong: one of a consumer's two buffers of what its epilogue reads (64 x 64 bf16)

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ void wgFence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgCommit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgWait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory"); }

// Shared-memory matrix descriptors, 128-byte swizzle (16-byte chunk c of a 128-byte row r stored at c ^ (r % 8)),
// tiles 1024-byte aligned.
// K-major (the reduction index contiguous): rows of 64 elements, 8-row groups 1024 bytes apart (SBO).
__device__ __forceinline__ uint64_t descK(const void* p) {
    uint64_t a = smemAddr(p);
    return ((a & 0x3FFFF) >> 4) | (1ull << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}
// MN-major (the reduction index strided): boxes of 64 reduction rows x 64 columns, one per 64 columns 8 KiB apart
// (LBO), 8-row groups along the reduction 1024 bytes apart (SBO). The other assignment gives wrong products
// (tried on an H100).
__device__ __forceinline__ uint64_t descMN(const void* p) {
    uint64_t a = smemAddr(p);
    return ((a & 0x3FFFF) >> 4) | ((uint64_t)(BOX >> 4) << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}

// wgmma.mma_async m64n256k16, f32 += bf16 * bf16, both operands from shared memory; TA / TB: the operand is
// MN-major (transposed); D accumulates (scale-d 1). The operand list is written out: inline asm takes no loops.
template <int TA, int TB>
__device__ __forceinline__ void wgmma256(float (&d)[128], uint64_t da, uint64_t db) {
    asm volatile("{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %132, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "%128, %129, p, 1, 1, %130, %131;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db), "n"(TA), "n"(TB), "r"(1));
}

// mbarriers and the bulk tensor copy
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
                 "WAIT_%=:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
                 "@!P1 bra WAIT_%=;\n"
                 "}\n" :: "r"(smemAddr(bar)), "r"(parity) : "memory");
}
__device__ __forceinline__ void tmaLoad2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
                 :: "r"(smemAddr(dst)), "l"(map), "r"(c0), "r"(c1), "r"(smemAddr(bar)) : "memory");
}
__device__ __forceinline__ void tmaLoad3d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, uint64_t* bar) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
                 :: "r"(smemAddr(dst)), "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(smemAddr(bar)) : "memory");
}

__device__ __forceinline__ void tmaStore3d(const CUtensorMap* map, int c0, int c1, int c2, const void* src) {
    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%1, %2, %3}], [%4];\n"
                 :: "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(smemAddr(src)) : "memory");
}
// The same, adding the tile into global memory (dW += tile) instead of overwriting it: fp32 adds, round to nearest.
__device__ __forceinline__ void tmaAdd3d(const CUtensorMap* map, int c0, int c1, int c2, const void* src) {
    asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2, %3}], [%4];\n"
                 :: "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(smemAddr(src)) : "memory");
}
__device__ __forceinline__ void bulkCommit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void bulkWaitRead() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
// Generic-proxy writes to shared memory made visible to the async proxy (wgmma, TMA) that reads them next.
__device__ __forceinline__ void fenceProxyAsync() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// The 128 threads of consumer warpgroup c (named barriers 1 and 2; 0 is __syncthreads); the 256 of both consumer
// warpgroups (3). Immediate ids, so that ptxas reserves only these.
__device__ __forceinline__ void warpgroupSync(int c) {
    if (c == 0) asm volatile("bar.sync 1, 128;\n" ::: "memory");
    else asm volatile("bar.sync 2, 128;\n" ::: "memory");
}
__device__ __forceinline__ void consumersSync() { asm volatile("bar.sync 3, 256;\n" ::: "memory"); }
// The ping-pong products' turns (named barriers 4: warpgroup 0's mainloop is done, 5: warpgroup 1's): consumer c
// waits for the other's last mainloop before its own, and passes the turn after it.
__device__ __forceinline__ void turnWait(int c) {
    if (c == 0) asm volatile("bar.sync 5, 256;\n" ::: "memory");
    else asm volatile("bar.sync 4, 256;\n" ::: "memory");
}
__device__ __forceinline__ void turnPass(int c) {
    if (c == 0) asm volatile("bar.arrive 4, 256;\n" ::: "memory");
    else asm volatile("bar.arrive 5, 256;\n" ::: "memory");
}

// The stage pipeline: S stages of BYTES (1024-byte aligned, from sm), a full barrier per stage (the producer's
// expect_tx, completed by the TMA bytes) and an empty one (one arrival per warp that reads the stage: WARPS, 8 where
// both consumer warpgroups read every stage, 4 where each reads its own tiles' stages). Steps are numbered g = 0, 1,
// ... over the block's whole life; step g uses stage g % S.
template <int S, int BYTES = STAGE_BYTES, int WARPS = 8>
struct Pipe {
    unsigned char* sm;
    uint64_t* full;
    uint64_t* empty;

    __device__ __forceinline__ Pipe(unsigned char* smraw, uint64_t* f, uint64_t* e)
        : sm((unsigned char*)(((uintptr_t)smraw + 1023) & ~(uintptr_t)1023)), full(f), empty(e) {
        if (threadIdx.x == 0) {
            for (int s = 0; s < S; s++) { mbarInit(&full[s], 1); mbarInit(&empty[s], WARPS); }
            asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        }
        __syncthreads();
    }
    __device__ __forceinline__ unsigned char* stage(int g) const { return sm + (g % S) * BYTES; }
    // producer: waits until step g's stage is released by its previous use, then expects the step's bytes
    __device__ __forceinline__ uint64_t* acquire(int g) const {
        if (g >= S) mbarWait(&empty[g % S], ((g / S) - 1) & 1);
        mbarExpectTx(&full[g % S], BYTES);
        return &full[g % S];
    }
    // consumers: wait for step g's data; release step g (one arrival per warp) once the wgmma that read it is done
    __device__ __forceinline__ void wait(int g) const { mbarWait(&full[g % S], (g / S) & 1); }
    __device__ __forceinline__ void release(int g) const { if ((threadIdx.x & 31) == 0) mbarArrive(&empty[g % S]); }
    // consumers, after issuing step g's wgmma (s: its step within the tile): commit it, keep one group in flight and
    // release the step before it, whose group is now done
    __device__ __forceinline__ void stepIssued(int g, int s) const {
        wgCommit();
        wgWait<1>();
        if (s > 0) release(g - 1);
    }
    // consumers, after a tile's steps (g: the step after its last): wait for its last group and release that step
    __device__ __forceinline__ void tileDone(int g, int steps) const {
        wgWait<0>();
        if (steps > 0) release(g - 1);
    }
};

__device__ __forceinline__ float2 load2(const void* p, int dt, i64 i) {
    return dt == DT_F32 ? *(const float2*)((const float*)p + i) : __bfloat1622float2(*(const __nv_bfloat162*)((const __nv_bfloat16*)p + i));
}
__device__ __forceinline__ void store2(void* p, int dt, i64 i, float a, float b) {
    if (dt == DT_F32) *(float2*)((float*)p + i) = make_float2(a, b);
    else *(__nv_bfloat162*)((__nv_bfloat16*)p + i) = __floats2bfloat162_rn(a, b);
}

// Writes this consumer warpgroup's 64 x 256 accumulators as out = acc + beta * out for rows < rowLimit and cols <
// colLimit of the tile (rows from rowOrigin, cols from colOrigin), row-major with leading dimension ld, straight from
// the fragments (the weight gradient's betas other than 0, and 1 into fp32). Fragment layout of wgmma's m64nN f32
// accumulators: warp w holds rows 16w .. 16w + 15, lane l rows l / 4 and l / 4 + 8, columns 8j + 2 (l % 4) and the
// next. The old values are loaded 64 columns at a time before any of those columns' stores, so that the loads
// overlap instead of each waiting behind a store.
__device__ __forceinline__ void storeAcc(const float (&acc)[128], void* out, int cdt, i64 ld, i64 rowOrigin, int rowLimit,
                                         int colOrigin, int colLimit, float beta) {
    int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) & 3;
#pragma unroll
    for (int j0 = 0; j0 < BN / 8; j0 += 8) {
        float2 old[8][2];
#pragma unroll
        for (int j = j0; j < j0 + 8; j++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int col = 8 * j + 2 * (lane & 3), row = 16 * w + (lane >> 2) + 8 * h;
                old[j - j0][h] = beta != 0.f && col < colLimit && row < rowLimit ? load2(out, cdt, (rowOrigin + row) * ld + colOrigin + col)
                                                                                 : make_float2(0.f, 0.f);
            }
        }
#pragma unroll
        for (int j = j0; j < j0 + 8; j++) {
            int col = 8 * j + 2 * (lane & 3);
            if (col >= colLimit) continue;   // colLimit is even: the pair is in or out
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int row = 16 * w + (lane >> 2) + 8 * h;
                if (row >= rowLimit) continue;
                float2 o = old[j - j0][h];
                store2(out, cdt, (rowOrigin + row) * ld + colOrigin + col, acc[4 * j + 2 * h] + beta * o.x, acc[4 * j + 2 * h + 1] + beta * o.y);
            }
        }
    }
}

__device__ __forceinline__ void store8(void* p, int dt, i64 i, const float (&v)[8]) {
    if (dt == DT_F32) {
        *(float4*)((float*)p + i) = make_float4(v[0], v[1], v[2], v[3]);
        *(float4*)((float*)p + i + 4) = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        uint4 u;
        __nv_bfloat162* h = (__nv_bfloat162*)&u;
#pragma unroll
        for (int k = 0; k < 4; k++) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
        *(uint4*)((__nv_bfloat16*)p + i) = u;
    }
}

// Copies column chunk q (q < BN / 64) of a bf16 src the epilogue reads into buf (READ_BYTES: 64 rows of 128 bytes):
// each thread the 8 columns of the 4 rows it will read back itself (no barrier needed), as one cp.async group.
__device__ __forceinline__ void fetchChunk(unsigned char* buf, const void* src, i64 ld, i64 rowOrigin, int rowLimit, int colOrigin,
                                           int colLimit, int q) {
    int tid = threadIdx.x & 127, g = tid & 7, col = 64 * q + 8 * g;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int row = (tid >> 3) + 16 * i;
        if (row < rowLimit && col < colLimit) cpAsync16(buf + row * 128 + g * 16, (const __nv_bfloat16*)src + (rowOrigin + row) * ld + colOrigin + col);
    }
    cpAsyncCommit();
}

// The products' epilogue (mode: EPI_* above, whose roundings give the unfused path's bits) through this
// warpgroup's staging buffer stg (EPI_BYTES), 64 columns at a time: the fragments go in as fp32, rows of 256 bytes
// with 16-byte chunk k of row r at k ^ (r % 8) (the 8 rows of a fragment store, and the 4 rows of a read-back, fall
// on distinct banks); then each thread takes 8 consecutive columns of 4 rows: 16-byte loads of what the mode reads
// (beta's out, aux; all four issued before any store; on ping-pong, bf16, a chunk ahead, below) and 16-byte stores
// (bf16), a warp covering 4 whole rows.
// Storing the fragments straight wrote 16 bytes of each of 8 rows per instruction (1.3-1.8x the product's time on
// 4096 and more columns). The loop over the 4 column chunks is not unrolled (the accumulators move down 32 after
// each, so chunk 0's are always acc[0..31]): unrolled, the fused modes' activation made the kernel 20,000
// instructions and the instruction fetch stalled it (Nsight Compute: 36% of the warps' samples; 2.3x the product's
// time). ahead (ping-pong, a bf16 read; else null): the reads go through the warpgroup's two READ_BYTES buffers, each
// chunk copied while the one before it is staged (the first by the mainloop), so that their latency runs under that
// work: loaded where they were used, the fused data gradient's h waited in full four times a tile (Nsight Compute,
// top-2 fc2 on ping-pong: 18% of the stall samples on those loads, the kernel 1.4x the plain product). The
// cooperative schedule has no shared memory left for them and loads after the staging. acc is consumed.
__device__ __forceinline__ void storeAccStaged(float (&acc)[128], float* stg, unsigned char* ahead, int c, void* out, int cdt, i64 ld,
                                               i64 rowOrigin, int rowLimit, int colOrigin, int colLimit, float beta, void* aux, int mode,
                                               int act) {
    if (rowLimit <= 0) return;   // the whole warpgroup alike: its rows are past the expert's end
    int tid = threadIdx.x & 127, lane = threadIdx.x & 31, w = tid >> 5;
    bool reads = mode == EPI_ACT_GRAD || (mode == EPI_PLAIN && beta != 0.f);
    const void* src = mode == EPI_ACT_GRAD ? aux : out;
    int g = tid & 7;
#pragma unroll 1
    for (int q = 0; q < BN / 64 && 64 * q < colLimit; q++) {
        // ahead: chunk q is in (or on its way to) buffer q % 2; the next one goes to the other while this is staged
        if (ahead && q + 1 < BN / 64) fetchChunk(ahead + ((q + 1) & 1) * READ_BYTES, src, ld, rowOrigin, rowLimit, colOrigin, colLimit, q + 1);
        warpgroupSync(c);   // the previous chunk's read-back is done
#pragma unroll
        for (int j = 0; j < 8; j++) {
            int col = 8 * j + 2 * (lane & 3);
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int row = 16 * w + (lane >> 2) + 8 * h;
                *(float2*)(stg + row * 64 + (((col >> 2) ^ (row & 7)) << 2) + (col & 3)) = make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
            }
        }
#pragma unroll
        for (int k = 0; k < 96; k++) acc[k] = acc[k + 32];
        warpgroupSync(c);
        int col = 64 * q + 8 * g;
        if (col >= colLimit) continue;   // colLimit is a multiple of 8: 8 columns in or out
        float o[4][8];
        if (ahead) {
            if (q + 1 < BN / 64) cpAsyncWait<1>(); else cpAsyncWait<0>();   // this thread's pieces of chunk q are in
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int row = (tid >> 3) + 16 * i;
                if (row < rowLimit) unpack8(*(const uint4*)(ahead + (q & 1) * READ_BYTES + row * 128 + g * 16), o[i]);
            }
        } else {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int row = (tid >> 3) + 16 * i;
                if (reads && row < rowLimit) load8(o[i], src, cdt, (rowOrigin + row) * ld + colOrigin + col);
            }
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int row = (tid >> 3) + 16 * i;
            if (row >= rowLimit) break;
            float4 lo = *(const float4*)(stg + row * 64 + (((2 * g) ^ (row & 7)) << 2));
            float4 hi = *(const float4*)(stg + row * 64 + (((2 * g + 1) ^ (row & 7)) << 2));
            float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
            i64 at = (rowOrigin + row) * ld + colOrigin + col;
            if (mode == EPI_PLAIN) {
#pragma unroll
                for (int k = 0; k < 8; k++) v[k] = v[k] + beta * (reads ? o[i][k] : 0.f);
                store8(out, cdt, at, v);
            } else if (mode == EPI_ACT) {
#pragma unroll
                for (int k = 0; k < 8; k++) { v[k] = roundTo(cdt, v[k]); o[i][k] = actPlain(act, v[k]); }
                store8(out, cdt, at, v);
                store8(aux, cdt, at, o[i]);
            } else {
#pragma unroll
                for (int k = 0; k < 8; k++) v[k] = actPlainGrad(act, o[i][k], roundTo(cdt, v[k]));
                store8(out, cdt, at, v);
            }
        }
    }
}

// Pulls the rows the epilogue will read (src: 64 rows of this warpgroup's tile, its columns) from DRAM into L2, a few
// k-steps before the epilogue, so that its loads there hit L2. A row's bytes need not start on a 128-byte line (a row
// of N x 2 bytes, N not a multiple of 64): it may touch one line more than its length fills, the last skipped where not.
__device__ __forceinline__ void prefetchL2(const void* src, int dt, i64 ld, i64 rowOrigin, int rowLimit, int colOrigin, int colLimit) {
    int es = dt == DT_F32 ? 4 : 2, bytes = min(colLimit, BN) * es, lines = (bytes + 127) / 128 + 1;
    for (int l = threadIdx.x & 127; l < 64 * lines; l += 128) {
        int row = l / lines;
        if (row >= rowLimit) break;
        const char* first = (const char*)src + ((rowOrigin + row) * ld + colOrigin) * es;
        const char* at = (const char*)((unsigned long long)first & ~127ull) + (l % lines) * 128;
        if (at < first + bytes) asm volatile("prefetch.global.L2 [%0];\n" :: "l"(at));
    }
}

// The expert, m-tile and n-tile of a block's tiles t (non-decreasing) in findGroupTile's order (an expert's m-tiles
// fastest): the first by findGroupTile (the whole block, a warp-wide scan), the next ones by each thread walking on
// from there, so a persistent block passes over the experts once in all; tiles at or past bound (the grid's bound of
// tiles, past the last) end the walk at once.
template <int TBM>   // the tiles' rows
struct TileWalker {
    int e = 0, base = 0;   // expert e's first tile is base
    int bound;

    // The whole block: false where its first tile is past the last (the block exits).
    __device__ __forceinline__ bool start(const int* offsets, int E, int nTiles, int& expert, int& mTile, int& nTile) {
        bound = ((__ldg(offsets + E) + TBM - 1) / TBM + E) * nTiles;
        if (!findGroupTile<TBM>(offsets, E, nTiles, blockIdx.x, expert, mTile, nTile)) return false;
        int mt = (__ldg(offsets + expert + 1) - __ldg(offsets + expert) + TBM - 1) / TBM;
        e = expert;
        base = blockIdx.x - nTile * mt - mTile;
        return true;
    }

    __device__ __forceinline__ bool find(const int* offsets, int E, int nTiles, int t, int& expert, int& mTile, int& nTile) {
        if (t >= bound) return false;
        for (; e < E; e++) {
            int mt = (__ldg(offsets + e + 1) - __ldg(offsets + e) + TBM - 1) / TBM;
            if (t < base + mt * nTiles) {
                expert = e;
                nTile = (t - base) / mt;
                mTile = (t - base) % mt;
                return true;
            }
            base += mt * nTiles;
        }
        return false;
    }
};

// Forward (FWD: W [E, K, N] read MN-major) or data-gradient (W [E, N, K], K-major) product: block b takes tiles b,
// b + gridDim.x, ... (TileWalker's order: resident blocks share one slice of W[e] and the expert's rows stay in L2).
// Two schedules (PP):
// - cooperative (false): 128 x 256 tiles, both consumer warpgroups on every tile (64 rows each). A grid of the tile
//   bound runs one tile per block; a grid of one block per multiprocessor is persistent, the producer loading the next
//   tile while the consumers store. Rows of a tile past the expert's end are computed and not stored (on 64-row
//   experts the second warpgroup's half).
// - ping-pong (true): 64 x 256 tiles, each of one consumer warpgroup (the block's tiles alternate between them), so
//   that one warpgroup's epilogue runs while the other multiplies; persistent grids only (a block of one tile would
//   leave one warpgroup idle). Stages of 64 rows of A, each read by one warpgroup. The two mainloops take turns
//   (turnWait / turnPass): a warpgroup then waits on a stage only after every earlier step of the block has been
//   waited on, so the stage's full barrier is at most one phase behind (a parity wait cannot tell a phase from the
//   one two before it: without the turns, warpgroup 1's first wait could pass on warpgroup 0's data). The turn is
//   passed only where the other has a next tile, so that no arrival is left pending at exit.
template <bool FWD, bool PP>
__device__ __forceinline__ void product(const CUtensorMap* tmA, const CUtensorMap* tmW, void* C, int cdt, const int* offsets,
                                        int E, int K, int N, float beta, void* aux, int mode, int act) {
    constexpr int TBM = PP ? 64 : BM, A_BYTES = TBM * 128, BYTES = (TBM + BN) * 128;
    constexpr int OWN_TILE_STRIDE = PP ? 2 : 1;   // a consumer takes every block tile, or (ping-pong) every other one
    extern __shared__ unsigned char smraw[];
    __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];
    int nTiles = (N + BN - 1) / BN, kTiles = (K + BK - 1) / BK;
    TileWalker<TBM> walk;
    int expert, tile, nTile;
    if (!walk.start(offsets, E, nTiles, expert, tile, nTile)) return;   // the whole block alike
    Pipe<STAGES, BYTES, PP ? 4 : 8> p(smraw, full, empty);
    int wgi = threadIdx.x >> 7;
    if (wgi == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (threadIdx.x == 0) {
            int g = 0;
            for (int t = blockIdx.x; walk.find(offsets, E, nTiles, t, expert, tile, nTile); t += gridDim.x) {
                int rowStart = __ldg(offsets + expert) + tile * TBM, n0 = nTile * BN;
                for (int kt = 0; kt < kTiles; kt++, g++) {
                    uint64_t* bar = p.acquire(g);
                    unsigned char* st = p.stage(g);
                    tmaLoad2d(st, tmA, kt * BK, rowStart, bar);   // TBM rows (tmA's box)
                    if constexpr (FWD) {
                        for (int j = 0; j < BN / 64; j++) tmaLoad3d(st + A_BYTES + j * BOX, tmW, n0 + 64 * j, kt * BK, expert, bar);
                    } else {
                        tmaLoad3d(st + A_BYTES, tmW, kt * BK, n0, expert, bar);
                    }
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
        int c = wgi - 1;
        float* stg = (float*)(p.sm + STAGES * BYTES + c * EPI_BYTES);
        // what the epilogue reads (aux's h, or beta's old out): pulled into L2 three k-steps before the epilogue; on
        // ping-pong, bf16, also copied into this warpgroup's two read buffers a column chunk ahead, the first from then
        bool reads = mode == EPI_ACT_GRAD || (mode == EPI_PLAIN && beta != 0.f);
        const void* src = mode == EPI_ACT_GRAD ? aux : C;
        int prefetchStep = reads ? max(kTiles - 3, 0) : -1;   // K > 0 (the caller's check): the mainloop reaches it
        unsigned char* ahead = PP && reads && cdt == DT_BF16 ? p.sm + STAGES * BYTES + 2 * EPI_BYTES + c * 2 * READ_BYTES : nullptr;
        // the block's j-th tile (t = blockIdx.x + j * gridDim.x) is loaded as steps j * kTiles ..; ping-pong: this
        // warpgroup's tiles are j = c, c + 2, ...
        int j = PP ? c : 0;
        for (int t = blockIdx.x + j * gridDim.x; walk.find(offsets, E, nTiles, t, expert, tile, nTile);
             t += OWN_TILE_STRIDE * gridDim.x, j += OWN_TILE_STRIDE) {
            int rowStart = __ldg(offsets + expert) + tile * TBM, rowEnd = __ldg(offsets + expert + 1), n0 = nTile * BN;
            int rowOrigin = rowStart + (PP ? 0 : c * 64);
            float acc[128];
#pragma unroll
            for (int i = 0; i < 128; i++) acc[i] = 0.f;
            int g = j * kTiles;
            if (PP && j > 0) turnWait(c);   // the other warpgroup's tile j - 1 has been waited on step by step
            for (int kt = 0; kt < kTiles; kt++, g++) {
                p.wait(g);
                unsigned char* sA = p.stage(g) + (PP ? 0 : c * 64 * 128);
                unsigned char* sB = p.stage(g) + A_BYTES;
                wgFence();
#pragma unroll
                for (int kk = 0; kk < 4; kk++) {
                    if constexpr (FWD) wgmma256<0, 1>(acc, descK(sA + kk * 32), descMN(sB + kk * 2048));
                    else wgmma256<0, 0>(acc, descK(sA + kk * 32), descK(sB + kk * 32));
                }
                p.stepIssued(g, kt);
                if (kt == prefetchStep) {
                    prefetchL2(src, cdt, N, rowOrigin, rowEnd - rowOrigin, n0, N - n0);
                    if (ahead) fetchChunk(ahead, src, N, rowOrigin, rowEnd - rowOrigin, n0, N - n0, 0);
                }
            }
            if constexpr (PP) {
                int e1, m1, n1;   // tile j + 1, the other's, if there is one
                if (walk.find(offsets, E, nTiles, t + gridDim.x, e1, m1, n1)) turnPass(c);
            }
            p.tileDone(g, kTiles);
            storeAccStaged(acc, stg, ahead, c, C, cdt, N, rowOrigin, rowEnd - rowOrigin, n0, N - n0, beta, aux, mode, act);
        }
    }
}

// Writes this consumer warpgroup's 64 x 256 accumulators (beta 0; add: beta 1 into fp32) through shared memory: the
// fragments into boxes of 64 rows x 128 bytes in the 128-byte swizzle (conflict-free: the 8 rows of a store fall into
// distinct 16-byte chunks), then one thread stores (or adds) them with the bulk tensor copy, which clips rows and
// columns past the map's ends (dW's map {N, K, E}: rows past K are not the next expert's). fp32 goes in two halves of
// 128 columns. The staging buffer is reused only after the previous tile's stores have read it.
__device__ __forceinline__ void storeAccTma(const float (&acc)[128], unsigned char* out, const CUtensorMap* map, int cdt, int c,
                                            int n0, int m0, int e, int N, bool add) {
    int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) & 3;
    bool issuer = (threadIdx.x & 127) == 0;
    int halves = cdt == DT_F32 ? 2 : 1, boxCols = cdt == DT_F32 ? 32 : 64;   // columns of one 128-byte box row
#pragma unroll
    for (int half = 0; half < 2; half++) {
        if (half >= halves) break;
        if (issuer) bulkWaitRead();
        warpgroupSync(c);
#pragma unroll
        for (int j = 0; j < BN / 8; j++) {
            int col = 8 * j + 2 * (lane & 3) - half * 128;   // within this half
            if (col < 0 || col >= BN / halves) continue;
            int box = col / boxCols, inRow = (col % boxCols) * (cdt == DT_F32 ? 4 : 2);
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int row = 16 * w + (lane >> 2) + 8 * h;
                int chunk = (inRow >> 4) ^ (row & 7);
                store2(out + box * BOX + row * 128 + chunk * 16 + (inRow & 15), cdt, 0, acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
            }
        }
        fenceProxyAsync();
        warpgroupSync(c);
        if (issuer) {
            for (int b = 0; b < 4; b++) {
                int col0 = n0 + half * 128 + b * boxCols;
                if (col0 >= N) continue;   // boxes wholly past N: nothing to write
                if (add) tmaAdd3d(map, col0, m0, e, out + b * BOX);
                else tmaStore3d(map, col0, m0, e, out + b * BOX);
            }
            bulkCommit();
        }
    }
}

// Tile t of the weight gradient (expert by expert, n-tile by n-tile, m fastest): expert e, dW's rows m0.. and columns
// n0.., reduced over the expert's rows r0 .. r0 + rows in steps of BK; the producer and the consumers alike.
struct WgradTile { int e, m0, n0, r0, rows, steps; };

__device__ __forceinline__ WgradTile wgradTile(const int* offsets, int t, int mTiles, int nTiles) {
    WgradTile w;
    w.e = t / (mTiles * nTiles);
    w.m0 = t % mTiles * BM;
    w.n0 = t / mTiles % nTiles * BN;
    w.r0 = offsets[w.e];
    w.rows = offsets[w.e + 1] - w.r0;
    w.steps = (w.rows + BK - 1) / BK;
    return w;
}

// Weight gradient, persistent: block b takes tiles b, b + gridDim.x, ... of the E x ceil(K / 128) x ceil(N / 256)
// tiles of dW (expert by expert, n-tile by n-tile, m fastest: resident blocks share dY's columns). Each tile reduces
// over its expert's rows 64 at a time; the producer runs ahead into the next tiles while the consumers store, which
// is what this product (one or two reduction steps for 64-row experts, a 128 x 256 output tile each) is bound by.
// The last step's rows past the expert's end hold the next expert's rows (or what lies past offsets[E]): the
// consumers zero them in A's and dY's boxes before multiplying. An expert without rows still writes beta * dW. beta 0
// stores through shared memory and tmDW, and so does beta 1 into an fp32 dW (the bulk copy adds: gradient
// accumulation); other betas and beta 1 into bf16 (whose add would round twice) read and write each value in place
// (storeAcc).
__device__ __forceinline__ void weightGrad(const CUtensorMap* tmA, const CUtensorMap* tmDY, const CUtensorMap* tmDW, void* dW,
                                           int cdt, const int* offsets, int E, int K, int N, float beta) {
    constexpr int A_BYTES = BM * 128;
    extern __shared__ unsigned char smraw[];
    __shared__ __align__(8) uint64_t full[WGRAD_STAGES], empty[WGRAD_STAGES];
    Pipe<WGRAD_STAGES> p(smraw, full, empty);
    int mTiles = (K + BM - 1) / BM, nTiles = (N + BN - 1) / BN, tiles = E * mTiles * nTiles;
    int wgi = threadIdx.x >> 7;
    if (wgi == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (threadIdx.x == 0) {
            int g = 0;
            for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
                WgradTile t0 = wgradTile(offsets, t, mTiles, nTiles);
                for (int s = 0; s < t0.steps; s++, g++) {
                    uint64_t* bar = p.acquire(g);
                    unsigned char* st = p.stage(g);
                    for (int j = 0; j < BM / 64; j++) tmaLoad2d(st + j * BOX, tmA, t0.m0 + 64 * j, t0.r0 + s * BK, bar);
                    for (int j = 0; j < BN / 64; j++) tmaLoad2d(st + A_BYTES + j * BOX, tmDY, t0.n0 + 64 * j, t0.r0 + s * BK, bar);
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
        int c = wgi - 1, g = 0;
        unsigned char* out = p.sm + WGRAD_STAGES * STAGE_BYTES + c * OUT_BYTES;
        for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
            WgradTile t0 = wgradTile(offsets, t, mTiles, nTiles);
            float acc[128];
#pragma unroll
            for (int i = 0; i < 128; i++) acc[i] = 0.f;
            for (int s = 0; s < t0.steps; s++, g++) {
                p.wait(g);
                unsigned char* sA = p.stage(g) + c * BOX;
                unsigned char* sB = p.stage(g) + A_BYTES;
                int valid = t0.rows - s * BK;
                if (valid < BK) {
                    // rows valid .. 63 to zero (a box row is one 128-byte line: the swizzle permutes chunks within it)
                    // in this warpgroup's A box and in its half of dY's four boxes, which both warpgroups read: the
                    // rows hold the next expert's or whatever lies past offsets[E], and 0 x Inf or NaN would reach dW.
                    // Visible to wgmma before either warpgroup issues it.
                    uint4* rowsA = (uint4*)(sA + valid * 128);
                    uint4* rowsB0 = (uint4*)(sB + 2 * c * BOX + valid * 128);
                    uint4* rowsB1 = (uint4*)(sB + (2 * c + 1) * BOX + valid * 128);
                    for (int i = threadIdx.x & 127; i < (BK - valid) * 8; i += 128) {
                        rowsA[i] = make_uint4(0, 0, 0, 0);
                        rowsB0[i] = make_uint4(0, 0, 0, 0);
                        rowsB1[i] = make_uint4(0, 0, 0, 0);
                    }
                    fenceProxyAsync();
                    consumersSync();
                }
                wgFence();
#pragma unroll
                for (int kk = 0; kk < 4; kk++) wgmma256<1, 1>(acc, descMN(sA + kk * 2048), descMN(sB + kk * 2048));
                p.stepIssued(g, s);
            }
            p.tileDone(g, t0.steps);
            int mOrigin = t0.m0 + c * 64;
            if (mOrigin >= K) continue;   // this warpgroup's rows are all past K (the whole warpgroup alike)
            if (beta == 0.f || (beta == 1.f && cdt == DT_F32)) storeAccTma(acc, out, tmDW, cdt, c, t0.n0, mOrigin, t0.e, N, beta != 0.f);
            else storeAcc(acc, dW, cdt, N, (i64)t0.e * K + mOrigin, K - mOrigin, t0.n0, N - t0.n0, beta);
        }
        if ((threadIdx.x & 127) == 0) bulkWaitRead();   // the last stores have read the staging buffer
    }
}

#endif  // sm_90a

}  // namespace wg

// Dynamic shared memory (CudaBackend.WG_SHARED, WG_PP_SHARED, WG_WGRAD_SHARED): the products STAGES stages of A
// (128 x 64, ping-pong 64 x 64) and B (256 x 64) bf16 and two staging buffers (EPI_BYTES), ping-pong also four read
// buffers (READ_BYTES, two per consumer; 225 KiB in all), the weight gradient
// WGRAD_STAGES stages and two output tiles (OUT_BYTES); plus 1 KiB to align the first stage to 1024 bytes.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WG_BODY(call) call
#else
#define WG_BODY(call) __trap()
#endif

// The products take an epilogue (mode, act and aux: EPI_* above; EPI_PLAIN ignores aux and act). _pp: ping-pong
// (tmA's box 64 rows, a persistent grid), else cooperative (tmA's box 128 rows).
#define WG_PRODUCT(name, FWD, PP)                                                                                         \
    extern "C" __global__ void __launch_bounds__(wg::THREADS, 1) name(                                                    \
            const __grid_constant__ CUtensorMap tmA, const __grid_constant__ CUtensorMap tmW, void* C, int cdt,           \
            const int* offsets, int E, int K, int N, float beta, void* aux, int mode, int act) {                          \
        WG_BODY((wg::product<FWD, PP>(&tmA, &tmW, C, cdt, offsets, E, K, N, beta, aux, mode, act)));                     \
    }
WG_PRODUCT(k_wg_nt, false, false)
WG_PRODUCT(k_wg_nn, true, false)
WG_PRODUCT(k_wg_nt_pp, false, true)
WG_PRODUCT(k_wg_nn_pp, true, true)
#undef WG_PRODUCT

extern "C" __global__ void __launch_bounds__(wg::THREADS, 1) k_wg_wgrad(
        const __grid_constant__ CUtensorMap tmA, const __grid_constant__ CUtensorMap tmDY, const __grid_constant__ CUtensorMap tmDW,
        void* dW, int cdt, const int* offsets, int E, int K, int N, float beta) {
    WG_BODY((wg::weightGrad(&tmA, &tmDY, &tmDW, dW, cdt, offsets, E, K, N, beta)));
}
#undef WG_BODY
