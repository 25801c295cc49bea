// Probe: can the expert-parallel dispatch move its rows between two NVLink-connected GPUs inside the permute kernel
// (each row stored straight into the owner GPU's receive buffer through peer access) faster than a local permute
// followed by an all-to-all? It decides whether an intra-node exchange of our own (CUDA IPC between the ranks'
// processes) is worth building for issue 6; the measured figures are in docs/benchmarks.md (expert-parallel section).
//
// One process drives both GPUs (peer access on). Each rank r holds x_r [S, M] bf16 and sends every row to rank
// dest(row) (a random half to each), into slot j of the sender's region of that rank's receive buffer [2][S][M]
// (rows in order within a region, as the dispatch orders them). Each variant runs `iters` times back to back on both
// GPUs with an exchange barrier after each run (each GPU's stream waits for the other's event), as a training step
// waits for its peer before the expert GEMMs; timed with CUDA events on GPU 0 around the whole loop.
//   local:      the permute with every row written locally (the single-GPU layer's dispatch; no communication)
//   push:       the permute writing each row to its owner (remote rows through peer access)
//   pull:       each rank gathering the rows it owns from the senders' x (remote rows read through peer access)
//   local + CE: the local permute into [dest][S][M], then the peer's region by cudaMemcpyPeerAsync (copy engine),
//               what an all-to-all does after a permute
//   raw write / raw CE: half of x written to the peer by a kernel / by the copy engine (link bandwidth alone)
//
// Build: nvcc -O3 -std=c++17 -arch=sm_90 -o p2p_exchange_probe p2p_exchange_probe.cu
// Run:   ./p2p_exchange_probe [S=8192] [M=1024] [iters=50]  (two GPUs with peer access, e.g. nvidia-h200-x2)
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); std::exit(1); } } while (0)

// out row slot[i] of buffer owner[i] (0: own, 1: the peer's) = x row i; a thread per 16-byte chunk.
__global__ void k_push(const uint4* x, const int* owner, const int* slot, uint4* own, uint4* peer, int rows, int c16) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < rows * c16; i += gridDim.x * blockDim.x) {
        int r = i / c16, c = i - r * c16;
        uint4* dst = owner[r] ? peer : own;
        dst[(long long)slot[r] * c16 + c] = x[i];
    }
}

// recv row j = src[j] < 0 ? nothing : (from[j] ? peerX : ownX) row src[j]; a thread per 16-byte chunk.
__global__ void k_pull(const uint4* ownX, const uint4* peerX, const int* from, const int* src, uint4* recv, int rows, int c16) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < rows * c16; i += gridDim.x * blockDim.x) {
        int j = i / c16, c = i - j * c16;
        int s = src[j];
        if (s < 0) continue;
        const uint4* x = from[j] ? peerX : ownX;
        recv[i] = x[(long long)s * c16 + c];
    }
}

__global__ void k_copy(const uint4* src, uint4* dst, long long n16) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n16; i += (long long)gridDim.x * blockDim.x) dst[i] = src[i];
}

struct Rank {
    cudaStream_t st;
    uint4 *x, *recv, *send;
    int *owner, *slot, *ownerLocal, *slotLocal, *from, *src;
    int toPeer = 0;   // rows this rank sends to the peer
};

int main(int argc, char** argv) {
    int S = argc > 1 ? std::atoi(argv[1]) : 8192, M = argc > 2 ? std::atoi(argv[2]) : 1024, iters = argc > 3 ? std::atoi(argv[3]) : 50;
    int n = 0;
    CK(cudaGetDeviceCount(&n));
    if (n < 2) { std::fprintf(stderr, "needs two GPUs, found %d\n", n); return 2; }
    int can01 = 0, can10 = 0;
    CK(cudaDeviceCanAccessPeer(&can01, 0, 1));
    CK(cudaDeviceCanAccessPeer(&can10, 1, 0));
    if (!can01 || !can10) { std::fprintf(stderr, "no peer access between GPU 0 and 1\n"); return 2; }
    int c16 = M * 2 / 16;
    size_t rowBytes = (size_t)M * 2, xBytes = (size_t)S * rowBytes;
    std::mt19937 rng(7);
    Rank R[2];
    std::vector<int> owner[2], slot[2];
    for (int r = 0; r < 2; r++) {
        owner[r].resize(S); slot[r].resize(S);
        for (int i = 0; i < S; i++) owner[r][i] = (int)(rng() & 1);   // 0: stays, 1: goes to the peer
    }
    // receive layout at rank d: region of sender s (s = d: own rows) at s * S, rows in order
    std::vector<int> from[2], src[2];
    for (int d = 0; d < 2; d++) { from[d].assign(2 * S, 0); src[d].assign(2 * S, -1); }
    for (int s = 0; s < 2; s++) {
        int cnt[2] = {0, 0};
        for (int i = 0; i < S; i++) {
            int d = owner[s][i] ? 1 - s : s, j = s * S + cnt[owner[s][i]]++;
            slot[s][i] = j;
            from[d][j] = s == d ? 0 : 1;
            src[d][j] = i;
        }
        R[s].toPeer = cnt[1];
    }
    for (int r = 0; r < 2; r++) {
        CK(cudaSetDevice(r));
        CK(cudaDeviceEnablePeerAccess(1 - r, 0));
        CK(cudaStreamCreateWithFlags(&R[r].st, cudaStreamNonBlocking));
        CK(cudaMalloc(&R[r].x, xBytes));
        CK(cudaMalloc(&R[r].recv, 2 * xBytes));
        CK(cudaMalloc(&R[r].send, 2 * xBytes));
        std::vector<unsigned short> h((size_t)S * M);
        for (auto& v : h) v = (unsigned short)(rng() & 0x7f7f);
        CK(cudaMemcpy(R[r].x, h.data(), xBytes, cudaMemcpyHostToDevice));
        std::vector<int> zero(S, 0), local(S);
        for (int i = 0; i < S; i++) local[i] = owner[r][i] * S + (slot[r][i] % S);   // [dest][S] in the own send buffer
        auto up = [&](int** p, const std::vector<int>& v) { CK(cudaMalloc(p, v.size() * 4)); CK(cudaMemcpy(*p, v.data(), v.size() * 4, cudaMemcpyHostToDevice)); };
        up(&R[r].owner, owner[r]); up(&R[r].slot, slot[r]); up(&R[r].ownerLocal, zero); up(&R[r].slotLocal, local);
        up(&R[r].from, from[r]); up(&R[r].src, src[r]);
    }
    int sms = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    int blocks = sms * 8, threads = 256;
    std::vector<cudaEvent_t> ev[2];
    for (int r = 0; r < 2; r++) {
        CK(cudaSetDevice(r));
        ev[r].resize(iters);
        for (auto& e : ev[r]) CK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    }
    cudaEvent_t t0, t1;
    CK(cudaSetDevice(0));
    CK(cudaEventCreate(&t0));
    CK(cudaEventCreate(&t1));

    // runs body(r) on both ranks iters times with an exchange barrier after each; returns ms per run (median of 5 loops)
    auto timeIt = [&](auto body) {
        std::vector<float> ms;
        for (int rep = 0; rep < 6; rep++) {
            CK(cudaSetDevice(0));
            CK(cudaEventRecord(t0, R[0].st));
            CK(cudaSetDevice(1));
            CK(cudaStreamWaitEvent(R[1].st, t0, 0));
            for (int it = 0; it < iters; it++) {
                for (int r = 0; r < 2; r++) { CK(cudaSetDevice(r)); body(r); CK(cudaEventRecord(ev[r][it], R[r].st)); }
                for (int r = 0; r < 2; r++) { CK(cudaSetDevice(r)); CK(cudaStreamWaitEvent(R[r].st, ev[1 - r][it], 0)); }
            }
            CK(cudaSetDevice(0));
            CK(cudaEventRecord(t1, R[0].st));
            CK(cudaEventSynchronize(t1));
            float v = 0;
            CK(cudaEventElapsedTime(&v, t0, t1));
            if (rep > 0) ms.push_back(v / iters);   // the first loop warms up
        }
        std::sort(ms.begin(), ms.end());
        return ms[ms.size() / 2];
    };
    auto push = [&](int r, bool local) {
        uint4* peer = R[1 - r].recv;
        if (local) k_push<<<blocks, threads, 0, R[r].st>>>(R[r].x, R[r].ownerLocal, R[r].slotLocal, R[r].send, nullptr, S, c16);
        else k_push<<<blocks, threads, 0, R[r].st>>>(R[r].x, R[r].owner, R[r].slot, R[r].recv, peer, S, c16);
    };
    double mb = (double)S * rowBytes / 2 / 1e6;   // MB: about half of x crosses the link each way (MB / ms = GB/s)
    std::printf("S=%d M=%d (x %.1f MB per rank, %d and %d rows to the peer), %d runs a loop, median of 5 loops, %d blocks x %d threads\n",
                S, M, xBytes / 1e6, R[0].toPeer, R[1].toPeer, iters, blocks, threads);
    float local = timeIt([&](int r) { push(r, true); });
    float pushed = timeIt([&](int r) { push(r, false); });
    float pulled = timeIt([&](int r) {
        k_pull<<<blocks, threads, 0, R[r].st>>>(R[r].x, R[1 - r].x, R[r].from, R[r].src, R[r].recv, 2 * S, c16);
    });
    float localCe = timeIt([&](int r) {
        push(r, true);
        CK(cudaMemcpyPeerAsync(R[1 - r].recv + (size_t)r * S * c16, 1 - r, R[r].send + (size_t)S * c16, r, (size_t)R[r].toPeer * rowBytes, R[r].st));
    });
    float rawWrite = timeIt([&](int r) { k_copy<<<blocks, threads, 0, R[r].st>>>(R[r].x, R[1 - r].recv, (long long)R[r].toPeer * c16); });
    float rawCe = timeIt([&](int r) {
        CK(cudaMemcpyPeerAsync(R[1 - r].recv, 1 - r, R[r].x, r, (size_t)R[r].toPeer * rowBytes, R[r].st));
    });
    // check: the push's receive buffers hold every row where the layout says (a CPU gather from x)
    bool ok = true;
    {
        push(0, false); push(1, false);
        for (int r = 0; r < 2; r++) { CK(cudaSetDevice(r)); CK(cudaStreamSynchronize(R[r].st)); }
        std::vector<unsigned short> hx[2], hr((size_t)2 * S * M);
        for (int r = 0; r < 2; r++) { hx[r].resize((size_t)S * M); CK(cudaSetDevice(r)); CK(cudaMemcpy(hx[r].data(), R[r].x, xBytes, cudaMemcpyDeviceToHost)); }
        for (int d = 0; d < 2 && ok; d++) {
            CK(cudaSetDevice(d));
            CK(cudaMemcpy(hr.data(), R[d].recv, 2 * xBytes, cudaMemcpyDeviceToHost));
            for (int j = 0; j < 2 * S && ok; j++) {
                if (src[d][j] < 0) continue;
                int s = from[d][j] ? 1 - d : d;
                ok = std::equal(hr.begin() + (size_t)j * M, hr.begin() + (size_t)(j + 1) * M, hx[s].begin() + (size_t)src[d][j] * M);
            }
        }
    }
    std::printf("local permute          %8.4f ms\n", local);
    std::printf("push permute (P2P)     %8.4f ms  (+%.4f over local; %.0f GB/s a direction if all of it were the link)\n", pushed, pushed - local, mb / pushed);
    std::printf("pull gather (P2P)      %8.4f ms  (+%.4f over local)\n", pulled, pulled - local);
    std::printf("local permute + CE     %8.4f ms  (+%.4f over local)\n", localCe, localCe - local);
    std::printf("raw kernel write       %8.4f ms  (%.0f GB/s a direction)\n", rawWrite, mb / rawWrite);
    std::printf("raw copy engine        %8.4f ms  (%.0f GB/s a direction)\n", rawCe, mb / rawCe);
    std::printf("push receive buffers %s\n", ok ? "match the layout (checked on the CPU)" : "DO NOT MATCH");
    return ok ? 0 : 1;
}
