package dev.moe4j.cuda;

import org.junit.jupiter.api.Test;

import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.SplittableRandom;

import static org.junit.jupiter.api.Assertions.*;

/** The caching allocator's policy on a fake device (no GPU needed): reuse, accounting, bounded growth. */
class CudaAllocatorTest {
    private static final long MIB = 1L << 20;

    /** A device with a byte budget that records live blocks, so double frees and leaks show. */
    static final class FakeDevice implements CudaAllocator.Device {
        final long capacity;
        final Map<Long, Long> live = new HashMap<>();
        long used, next = 1L << 40;

        FakeDevice(long capacity) { this.capacity = capacity; }

        @Override public long malloc(long bytes) {
            if (used + bytes > capacity) return 0;
            long a = next;
            next += bytes;
            live.put(a, bytes);
            used += bytes;
            return a;
        }

        @Override public void free(long address) {
            Long b = live.remove(address);
            assertNotNull(b, "freed twice or never allocated: " + address);
            used -= b;
        }
    }

    @Test
    void freedBlocksAreReusedAndAccounted() {
        FakeDevice dev = new FakeDevice(1L << 40);
        CudaAllocator a = new CudaAllocator(dev, () -> {});
        long x = a.alloc(3 * MIB), y = a.alloc(1000);
        assertEquals(4 * MIB + 1024, a.heldBytes(), "3 MiB rounds to 4 MiB, 1000 B to 1024 B");
        assertEquals(a.heldBytes(), a.inUseBytes());
        a.free(x, 3 * MIB);
        a.free(y, 1000);
        assertEquals(0, a.inUseBytes());
        assertEquals(x, a.alloc(4 * MIB - 5), "the same rounded size takes the cached block");
        assertEquals(2, a.mallocCalls());
        assertThrows(IllegalStateException.class, () -> a.free(y + 512, 10), "an unknown block is refused");
    }

    @Test
    void aLargeRequestTakesASomewhatLargerCachedBlockButNotAMuchLargerOne() {
        FakeDevice dev = new FakeDevice(1L << 40);
        CudaAllocator a = new CudaAllocator(dev, () -> {});
        long big = a.alloc(100 * MIB);
        a.free(big, 100 * MIB);
        assertEquals(big, a.alloc(90 * MIB), "within 1.25x: reused");
        assertEquals(100 * MIB, a.inUseBytes(), "in use counts the block's real size");
        long other = a.alloc(70 * MIB);
        assertNotEquals(big, other);
        a.free(big, 90 * MIB);
        long small = a.alloc(60 * MIB);   // 100 MiB > 1.25 * 60 MiB: not taken
        assertNotEquals(big, small);
        assertEquals(3, a.mallocCalls());
        // small blocks only take their own size
        long s = a.alloc(600_000);
        a.free(s, 600_000);
        assertNotEquals(s, a.alloc(500_000));
    }

    /** Step-to-step varying sizes (a dropless layer's padded capacity) keep a bounded cache. */
    @Test
    void varyingShapesDoNotGrowTheCacheStepAfterStep() {
        FakeDevice dev = new FakeDevice(1L << 40);
        CudaAllocator a = new CudaAllocator(dev, () -> {});
        SplittableRandom r = new SplittableRandom(3);
        long heldAt200 = 0;
        for (int step = 0; step < 1000; step++) {
            List<long[]> blocks = new ArrayList<>();
            for (int t = 0; t < 6; t++) {
                long bytes = (long) ((200 + r.nextInt(40)) * MIB * (1 + t * 0.5));   // sizes drift by up to 20% per step
                blocks.add(new long[] {a.alloc(bytes), bytes});
            }
            for (long[] b : blocks) a.free(b[0], b[1]);
            if (step == 200) heldAt200 = a.heldBytes();
        }
        assertEquals(0, a.inUseBytes());
        assertEquals(heldAt200, a.heldBytes(), "no growth after warm-up");
        // one block per size seen would be about 20 sizes x 6 tensors; the slack keeps it to a few per tensor
        assertTrue(a.mallocCalls() <= 3 * 6, a.mallocCalls() + " blocks for 6 tensors");
        assertEquals(dev.used, a.heldBytes(), "held is what the device gave");
    }

    @Test
    void outOfMemoryEmptiesTheCacheOnceThenFailsClearly() {
        FakeDevice dev = new FakeDevice(10 * MIB);
        int[] syncs = {0};
        CudaAllocator a = new CudaAllocator(dev, () -> syncs[0]++);
        long x = a.alloc(6 * MIB);
        a.free(x, 6 * MIB);
        long y = a.alloc(8 * MIB);   // 6 MiB cached + 8 MiB > 10: the cache is emptied, then it fits
        assertEquals(1, syncs[0]);
        assertEquals(8 * MIB, dev.used);
        CudaException e = assertThrows(CudaException.class, () -> a.alloc(4 * MIB));
        assertTrue(e.getMessage().contains("out of device memory"), e.getMessage());
        a.free(y, 8 * MIB);
        a.emptyCache();
        assertEquals(0, dev.used);
        assertEquals(0, a.heldBytes());
    }
}
