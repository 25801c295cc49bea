package dev.moe4j.comm.nccl;

import dev.moe4j.comm.rendezvous.DistributedEnv;
import dev.moe4j.comm.rendezvous.Rendezvous;
import dev.moe4j.comm.rendezvous.TcpStore;
import org.bytedeco.cuda.cudart.CUevent_st;
import org.bytedeco.cuda.cudart.CUstream_st;
import org.bytedeco.cuda.global.cudart;
import org.bytedeco.cuda.global.nccl;
import org.bytedeco.cuda.nccl.ncclComm;
import org.bytedeco.cuda.nccl.ncclUniqueId;
import org.bytedeco.cuda.nccl.ncclWindow_vidmem;
import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.javacpp.FloatPointer;
import org.bytedeco.javacpp.Pointer;

import java.time.Duration;
import java.util.Arrays;
import java.util.Locale;

/**
 * Probe (not a test): NCCL's all-to-all on copy engines (NCCL 2.28+: buffers from ncclMemAlloc registered as
 * symmetric windows, a communicator with CTA policy ZERO, one node) against its kernel all-to-all on plain
 * cudaMalloc buffers, 1-64 MiB per rank; and both while a GEMM-sized kernel load runs beside them on another
 * stream (memset traffic stands in). Checks every received byte. Start under torchrun, one process per GPU.
 */
public final class NcclCeProbe {
    public static void main(String[] args) throws Exception {
        DistributedEnv env = DistributedEnv.fromEnvironment();
        int rank = env.rank(), P = env.worldSize();
        TcpStore store = Rendezvous.store(env, Duration.ofSeconds(60));
        NcclLibrary.load();
        check("cudaSetDevice", cudart.cudaSetDevice(env.localRank()));
        ncclComm ce = comm(store, rank, P, "ce", nccl.NCCL_CTA_POLICY_ZERO), plain = comm(store, rank, P, "plain", Integer.MIN_VALUE);
        long max = 64L << 20;
        Pointer ceSend = new Pointer(), ceRecv = new Pointer(), send = new Pointer(), recv = new Pointer();
        check("ncclMemAlloc", nccl.ncclMemAlloc(ceSend, max));
        check("ncclMemAlloc", nccl.ncclMemAlloc(ceRecv, max));
        check("cudaMalloc", cudart.cudaMalloc(send, max));
        check("cudaMalloc", cudart.cudaMalloc(recv, max));
        ncclWindow_vidmem w1 = new ncclWindow_vidmem(), w2 = new ncclWindow_vidmem();
        check("ncclCommWindowRegister", nccl.ncclCommWindowRegister(ce, ceSend, max, w1, nccl.NCCL_WIN_COLL_SYMMETRIC));
        check("ncclCommWindowRegister", nccl.ncclCommWindowRegister(ce, ceRecv, max, w2, nccl.NCCL_WIN_COLL_SYMMETRIC));
        CUstream_st stream = new CUstream_st(), other = new CUstream_st();
        check("cudaStreamCreate", cudart.cudaStreamCreateWithFlags(stream, cudart.cudaStreamNonBlocking));
        check("cudaStreamCreate", cudart.cudaStreamCreateWithFlags(other, cudart.cudaStreamNonBlocking));
        Pointer load = new Pointer();
        long loadBytes = 1L << 30;
        check("cudaMalloc", cudart.cudaMalloc(load, loadBytes));
        for (long bytes : new long[] {1 << 20, 4 << 20, 8 << 20, 16 << 20, 32 << 20, 64 << 20}) {
            long count = bytes / 2 / P;   // bf16 elements per peer
            for (boolean useCe : new boolean[] {false, true}) {
                Pointer s = useCe ? ceSend : send, r = useCe ? ceRecv : recv;
                ncclComm c = useCe ? ce : plain;
                check("cudaMemset", cudart.cudaMemset(s, rank + 1, bytes));
                check("cudaMemset", cudart.cudaMemset(r, 0, bytes));
                check("cudaDeviceSynchronize", cudart.cudaDeviceSynchronize());
                Runnable a2a = () -> check("ncclAlltoAll", nccl.ncclAlltoAll(s, r, count, nccl.ncclBfloat16, c, stream));
                a2a.run();
                check("cudaStreamSynchronize", cudart.cudaStreamSynchronize(stream));
                int bad = verify(r, bytes, P);
                double alone = median(stream, a2a, 50, 50);
                // the same beside a memory-bound load on another stream (as an expert GEMM of 350M would be)
                Runnable busy = () -> check("cudaMemsetAsync", cudart.cudaMemsetAsync(load, 3, loadBytes, other));
                double beside = median(stream, () -> { busy.run(); a2a.run(); }, 10, 20);
                check("cudaDeviceSynchronize", cudart.cudaDeviceSynchronize());
                if (rank == 0) {
                    System.out.printf(Locale.ROOT, "{\"probe\":\"nccl_alltoall\",\"engine\":\"%s\",\"bytes\":%d,\"ms\":%.4f,\"busbw\":%.1f,\"ms_beside_memset\":%.4f,\"bad_bytes\":%d}%n",
                            useCe ? "copy-engine" : "kernel", bytes, alone, bytes / (alone * 1e-3) / 1e9 * (P - 1) / P, beside, bad);
                }
            }
        }
        nccl.ncclCommWindowDeregister(ce, w1);
        nccl.ncclCommWindowDeregister(ce, w2);
        nccl.ncclCommDestroy(ce);
        nccl.ncclCommDestroy(plain);
        System.exit(0);
    }

    private static int verify(Pointer r, long bytes, int P) {
        byte[] got = new byte[(int) bytes];
        try (BytePointer h = new BytePointer(bytes)) {
            check("cudaMemcpy", cudart.cudaMemcpy(h, r, bytes, cudart.cudaMemcpyDeviceToHost));
            h.get(got);
        }
        int bad = 0;
        long per = bytes / P;
        for (int i = 0; i < got.length; i++) if (got[i] != (byte) (i / per + 1)) bad++;
        return bad;
    }

    /** Median stream time of {@code body} in ms (CUDA events), after warm-up runs. */
    private static double median(CUstream_st stream, Runnable body, int warm, int reps) {
        for (int i = 0; i < warm; i++) body.run();
        CUevent_st a = new CUevent_st(), b = new CUevent_st();
        check("cudaEventCreate", cudart.cudaEventCreate(a));
        check("cudaEventCreate", cudart.cudaEventCreate(b));
        double[] t = new double[reps];
        try (FloatPointer ms = new FloatPointer(1)) {
            for (int i = 0; i < reps; i++) {
                check("cudaEventRecord", cudart.cudaEventRecord(a, stream));
                body.run();
                check("cudaEventRecord", cudart.cudaEventRecord(b, stream));
                check("cudaEventSynchronize", cudart.cudaEventSynchronize(b));
                check("cudaEventElapsedTime", cudart.cudaEventElapsedTime(ms, a, b));
                t[i] = ms.get();
            }
        }
        Arrays.sort(t);
        return t[reps / 2];
    }

    private static ncclComm comm(TcpStore store, int rank, int P, String name, int ctaPolicy) throws Exception {
        ncclUniqueId u = new ncclUniqueId();
        u.internal().put(NcclCommunicator.sharedUniqueId(store, "ceprobe/" + name, rank));
        ncclComm c = new ncclComm();
        check("ncclCommInitRankConfig " + name, nccl.ncclCommInitRankConfig(c, P, u, rank, NcclCommunicator.config(true, ctaPolicy)));
        return c;
    }

    private static void check(String call, int rc) {
        if (rc != 0) throw new IllegalStateException(call + " failed with code " + rc);
    }
}
