package dev.moe4j.cuda;

import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import org.bytedeco.cuda.cudart.CUstream_st;
import org.bytedeco.cuda.global.cudart;
import org.junit.jupiter.api.Tag;
import org.junit.jupiter.api.Test;

import java.util.ArrayList;
import java.util.List;
import java.util.SplittableRandom;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;

/**
 * Uploads through the pinned ring ({@link UploadRing}): queued behind a long GEMM they return before the stream has
 * run (the host does not wait), and many uploads that wrap the ring several times while their copies are still
 * queued each arrive intact (a region is written again only after the copy that read it ran); an upload larger
 * than the ring takes the synchronous path and arrives intact too.
 */
@Tag("gpu")
class CudaUploadTest extends GpuTestBase {

    /** An 8192^3 fp32 GEMM (milliseconds), so that what follows is queued behind it. */
    private static void busy(Tensor a, Tensor c) {
        gpu.matmul(a, false, a, false, c, 1f, 0f);
    }

    private static boolean streamIdle() {
        return cudart.cudaStreamQuery(new CUstream_st(Cuda.ptr(gpu.nativeStream()))) == 0;
    }

    @Test
    void uploadsAreQueuedWithoutWaitingAndArriveIntact() {
        SplittableRandom r = new SplittableRandom(7);
        try (Tensor a = gpu.empty(DType.F32, 8192, 8192);
             Tensor c = gpu.empty(DType.F32, 8192, 8192)) {
            gpu.randomUniform(a, -1, 1, 3, 0);
            gpu.synchronize();
            busy(a, c);
            int[] small = r.ints(1000, -1000, 1000).toArray();
            try (Tensor t = gpu.fromInts(small, small.length)) {
                assertEquals(false, streamIdle(), "the upload returned only after the stream had run: it waited for the GEMM");
                assertArrayEquals(small, t.toInts(), "small upload");
            }
            // far more than the ring holds, all queued behind one GEMM: the ring wraps while copies are pending
            busy(a, c);
            List<int[]> want = new ArrayList<>();
            List<Tensor> got = new ArrayList<>();
            for (int i = 0; i < 40; i++) {
                int n = 1 + r.nextInt(2 << 20);   // up to 8 MiB each
                int[] v = r.ints(n, Integer.MIN_VALUE, Integer.MAX_VALUE).toArray();
                want.add(v);
                got.add(gpu.fromInts(v, n));
            }
            int[] huge = r.ints(20 << 20, 0, 1 << 30).toArray();   // 80 MiB: larger than the ring
            want.add(huge);
            got.add(gpu.fromInts(huge, huge.length));
            for (int i = 0; i < got.size(); i++) {
                assertArrayEquals(want.get(i), got.get(i).toInts(), "upload " + i + " of " + got.size());
                got.get(i).close();
            }
        }
    }

    /**
     * readIntsLater: the values as they were when it was called, although the stream overwrites the tensor afterwards
     * (behind a long GEMM, so that the overwrite is still queued when the read starts), and the host gets them without
     * waiting for that later work; a second read finishes the first, whose values stay with its supplier.
     */
    @Test
    void readsLaterReturnTheValuesOfTheirPlaceInTheStream() {
        SplittableRandom r = new SplittableRandom(11);
        int[] first = r.ints(5000, -1 << 30, 1 << 30).toArray(), second = r.ints(300, 0, 100).toArray();
        try (Tensor a = gpu.empty(DType.F32, 8192, 8192);
             Tensor c = gpu.empty(DType.F32, 8192, 8192);
             Tensor t = gpu.fromInts(first, first.length);
             Tensor u = gpu.fromInts(second, second.length)) {
            gpu.randomUniform(a, -1, 1, 3, 0);
            gpu.synchronize();
            var later = gpu.readIntsLater(t);
            busy(a, c);          // queued after the read: the supplier must not wait for it
            gpu.fill(t, 7);      // and this overwrite must not show in the values read
            int[] got = later.get();
            assertEquals(false, streamIdle(), "the read waited for the work queued after it");
            assertArrayEquals(first, got, "the values as they were when the read was queued");
            var other = gpu.readIntsLater(u);
            var again = gpu.readIntsLater(t);   // finishes the read of u first
            assertArrayEquals(second, other.get(), "an earlier read taken by a later one");
            int[] sevens = new int[first.length];
            java.util.Arrays.fill(sevens, 7);
            assertArrayEquals(sevens, again.get(), "after the fill");
        }
    }

    /**
     * Backend.beside: the side work sees what was queued before it (behind a long GEMM), the main stream's work after
     * the join sees the side work's results, a block freed inside the side work is not handed to the main stream before
     * the join (and is after it), and a GEMM inside is refused.
     */
    @Test
    void sideWorkRunsAfterWhatCameBeforeAndJoinsBeforeWhatComesAfter() {
        int n = 1 << 24;
        try (Tensor a = gpu.empty(DType.F32, 8192, 8192);
             Tensor c = gpu.empty(DType.F32, 8192, 8192);
             Tensor x = gpu.zeros(DType.F32, n);
             Tensor y = gpu.zeros(DType.F32, n);
             Tensor z = gpu.zeros(DType.F32, n)) {
            gpu.randomUniform(a, -1, 1, 3, 0);
            busy(a, c);
            gpu.fill(x, 3);                                   // queued behind the GEMM: the side work must wait for it
            long[] freed = new long[1];
            var side = gpu.beside(() -> {
                gpu.scale(x, 2, y);                           // y = 6
                Tensor tmp = gpu.empty(DType.F32, 1 << 20);
                freed[0] = tmp.storage().deviceAddress();
                tmp.close();
            });
            long otherAddress;
            try (Tensor other = gpu.empty(DType.F32, 1 << 20)) {
                otherAddress = other.storage().deviceAddress();
                assertEquals(false, otherAddress == freed[0], "a block freed by side work handed out before the join");
            }
            gpu.fill(z, 1);                                   // main-stream work beside the side work
            side.join();
            gpu.add(y, 1, z, 1, z);                           // after the join: 6 + 1
            float[] got = z.toFloats();
            for (int i = 0; i < n; i += 4099) assertEquals(7f, got[i], "element " + i);
            try (Tensor again = gpu.empty(DType.F32, 1 << 20); Tensor twice = gpu.empty(DType.F32, 1 << 20)) {
                long[] got2 = {again.storage().deviceAddress(), twice.storage().deviceAddress()};
                java.util.Arrays.sort(got2);
                long[] want = {freed[0], otherAddress};
                java.util.Arrays.sort(want);
                assertArrayEquals(want, got2, "after the join both freed blocks are reused");
            }
            var refused = org.junit.jupiter.api.Assertions.assertThrows(IllegalStateException.class, () -> gpu.beside(() -> busy(a, c)));
            org.junit.jupiter.api.Assertions.assertTrue(refused.getMessage().contains("GEMM"), refused.getMessage());
        }
    }
}
