package dev.moe4j.comm.nccl;

import dev.moe4j.comm.rendezvous.DistributedEnv;
import dev.moe4j.comm.rendezvous.Rendezvous;
import dev.moe4j.comm.rendezvous.TcpStore;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.backend.Backends;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import org.bytedeco.cuda.cudart.CUstream_st;
import org.bytedeco.cuda.global.cudart;
import org.bytedeco.cuda.global.nccl;
import org.bytedeco.cuda.nccl.ncclComm;
import org.bytedeco.cuda.nccl.ncclUniqueId;
import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.javacpp.Pointer;

import java.time.Duration;

/**
 * Smallest NCCL exchange between two processes, in three layers, to find where a failure comes from:
 * {@code raw} (cudaMalloc buffers, a cudaStreamCreate stream, blocking ncclCommInitRank), {@code backend-memory}
 * (the same with CUDA-backend tensors and stream), {@code communicator} (NcclCommunicator.allToAllV).
 * Each rank sends 1024 bytes of (rank + 1) to the other and checks what it receives. Start under torchrun.
 */
public final class NcclSmoke {
    public static void main(String[] args) throws Exception {
        DistributedEnv env = DistributedEnv.fromEnvironment();
        int rank = env.rank(), peer = 1 - rank, n = 1024;
        TcpStore store = Rendezvous.store(env, Duration.ofSeconds(60));
        NcclLibrary.load();
        check("cudaSetDevice", cudart.cudaSetDevice(env.localRank()));
        String mode = args.length > 0 ? args[0] : "raw";
        // As in real use, the CUDA backend (context, stream, cuBLAS, kernels module) exists before NCCL starts.
        Backend backend = mode.equals("raw") ? null : Backends.select("cuda").create(env.localRank());
        if (mode.equals("communicator")) {
            communicator(backend, env, rank, peer);
            return;
        }
        Tensor early = null;
        if (mode.equals("kernel-before")) {
            // One of our kernels before NCCL starts.
            early = backend.zeros(DType.I32, 256);
            backend.fill(early, 7);
            backend.synchronize();
        }
        ncclComm comm = new ncclComm();
        ncclUniqueId u = new ncclUniqueId();
        u.internal().put(NcclCommunicator.sharedUniqueId(store, "smoke/" + mode, rank));
        check("ncclCommInitRank", nccl.ncclCommInitRank(comm, 2, u, rank));
        System.out.println("[rank " + rank + "] " + mode + ": comm ready on device " + env.localRank());
        Pointer send, recv;
        CUstream_st stream = new CUstream_st();
        Tensor ts = null, tr = null;
        if (backend == null) {
            send = new Pointer();
            recv = new Pointer();
            check("cudaMalloc", cudart.cudaMalloc(send, n));
            check("cudaMalloc", cudart.cudaMalloc(recv, n));
            check("cudaMemset", cudart.cudaMemset(send, rank + 1, n));
            check("cudaMemset", cudart.cudaMemset(recv, 0, n));
            check("cudaStreamCreate", cudart.cudaStreamCreate(stream));
        } else {
            ts = backend.zeros(DType.I32, n / 4);
            tr = backend.zeros(DType.I32, n / 4);
            if (mode.equals("backend-memory")) {
                backend.fill(ts, (rank + 1) * 0x01010101);   // our fill kernel, after NCCL started
            } else {
                check("cudaMemset", cudart.cudaMemset(NcclCommunicator.pointer(ts.storage().deviceAddress()), rank + 1, n));
            }
            backend.synchronize();
            send = NcclCommunicator.pointer(ts.storage().deviceAddress() + ts.byteOffset());
            recv = NcclCommunicator.pointer(tr.storage().deviceAddress() + tr.byteOffset());
            stream = new CUstream_st(NcclCommunicator.pointer(backend.nativeStream()));
        }
        check("ncclGroupStart", nccl.ncclGroupStart());
        check("ncclSend", nccl.ncclSend(send, n, nccl.ncclUint8, peer, comm, stream));
        check("ncclRecv", nccl.ncclRecv(recv, n, nccl.ncclUint8, peer, comm, stream));
        check("ncclGroupEnd", nccl.ncclGroupEnd());
        check("cudaStreamSynchronize", cudart.cudaStreamSynchronize(stream));
        byte[] got = new byte[n];
        try (BytePointer h = new BytePointer(n)) {
            check("cudaMemcpy", cudart.cudaMemcpy(h, recv, n, cudart.cudaMemcpyDeviceToHost));
            h.get(got);
        }
        int bad = 0;
        for (byte b : got) if (b != peer + 1) bad++;
        System.out.println("[rank " + rank + "] " + mode + ": " + (bad == 0 ? "PASS" : "FAIL " + bad + " wrong bytes, first " + got[0]));
        nccl.ncclCommDestroy(comm);
        if (backend != null) { ts.close(); tr.close(); backend.close(); }
        System.exit(bad == 0 ? 0 : 1);
    }

    /** The same exchange through NcclCommunicator.allToAllV (one row of 256 ints to each rank). */
    private static void communicator(Backend backend, DistributedEnv env, int rank, int peer) {
        try (NcclCommunicator c = NcclCommunicator.create(backend, env, dev.moe4j.core.comm.CommOptions.withTimeout(Duration.ofSeconds(30)))) {
            int[] data = new int[2 * 256];
            java.util.Arrays.fill(data, rank + 1);
            Tensor send = backend.fromInts(data, 2, 256), recv = backend.zeros(DType.I32, 2, 256);
            c.allToAllV(send, new int[] {1, 1}, recv, new int[] {1, 1});
            int[] got = recv.toInts();
            int bad = 0;
            for (int i = 0; i < 256; i++) if (got[peer * 256 + i] != peer + 1 || got[rank * 256 + i] != rank + 1) bad++;
            System.out.println("[rank " + rank + "] communicator: " + (bad == 0 ? "PASS" : "FAIL " + bad + " wrong, got " + got[peer * 256]));
            System.exit(bad == 0 ? 0 : 1);
        }
    }

    private static void check(String call, int rc) {
        if (rc != 0) throw new IllegalStateException(call + " failed with code " + rc);
    }
}
