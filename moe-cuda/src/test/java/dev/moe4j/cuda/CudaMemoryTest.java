package dev.moe4j.cuda;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.moe.MoE;
import dev.moe4j.core.moe.MoEOutput;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Scope;
import dev.moe4j.core.tensor.Tensor;
import org.junit.jupiter.api.Tag;
import org.junit.jupiter.api.Test;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

/** The caching allocator: a step's tensors, freed by their Scope, are reused, so device memory stops growing. */
@Tag("gpu")
class CudaMemoryTest extends GpuTestBase {

    private void step(Tensor w) {
        try (Scope s = Scope.open()) {
            Tensor x = gpu.empty(DType.BF16, 64, 256);
            gpu.randomNormal(x, 0, 1, 1, 0);
            Tensor h = gpu.empty(DType.BF16, 64, 512);
            gpu.matmul(x, false, w, false, h, 1f, 0f);
            Tensor a = gpu.empty(DType.BF16, 64, 256);
            gpu.activation(Activation.SWIGLU, h, a);
            Tensor loss = gpu.zeros(DType.F32, 1);
            gpu.sumSquares(a, loss, 0f);
            Tensor big = gpu.zeros(DType.F32, 3 << 20);  // a large-bucket block too
            gpu.scale(big, 2.0, big);
        }
    }

    @Test
    void thousandStepsDoNotGrowDeviceMemory() {
        Tensor w = gpu.zeros(DType.BF16, 256, 512);
        gpu.randomNormal(w, 0, 0.02, 2, 0);
        for (int i = 0; i < 5; i++) step(w);  // warm-up
        gpu.synchronize();
        long held = gpu.allocatedBytes(), mallocs = gpu.mallocCalls(), inUse = gpu.inUseBytes();
        for (int i = 0; i < 1000; i++) step(w);
        gpu.synchronize();
        System.out.printf("allocator after 1000 steps: held %d bytes (warm %d), cudaMalloc calls %d (warm %d)%n",
                gpu.allocatedBytes(), held, gpu.mallocCalls(), mallocs);
        assertEquals(held, gpu.allocatedBytes(), "allocatedBytes grew after warm-up");
        assertEquals(mallocs, gpu.mallocCalls(), "cudaMalloc was called after warm-up");
        assertEquals(inUse, gpu.inUseBytes(), "tensors leaked");
        assertTrue(held > 0);
        w.close();
    }

    /**
     * A dropless MoE layer pads its experts to the step's largest count, so its buffer sizes follow the routing;
     * the allocator's slack for large blocks keeps the cache from taking one block per size seen.
     */
    @Test
    void droplessStepsWithVaryingCapacityKeepMemoryBounded() {
        ModelContext ctx = new ModelContext(gpu, DType.BF16, 1);
        ctx.setTraining(true);
        MoE moe = MoE.builder().setContext(ctx).setHiddenSize(256).setFfnSize(512).optNumExperts(8).optK(2)
                .optDropless(true).optInitStd(0.5).build();
        ctx.allocateParameters();
        Tensor x = gpu.empty(DType.BF16, 4096, 256), dy = gpu.empty(DType.BF16, 4096, 256);
        gpu.randomNormal(dy, 0, 1e-3, 4, 0);
        java.util.Set<Integer> capacities = new java.util.HashSet<>();
        long heldWarm = 0, mallocsWarm = 0;
        for (int step = 0; step < 300; step++) {
            gpu.randomNormal(x, 0, 1, 3, (long) step * x.numel());   // new tokens, new routing, new padded capacity
            ctx.params().zeroGrad();
            try (Scope sc = Scope.open()) {
                MoEOutput o = moe.forward(x);
                capacities.add(java.util.Arrays.stream(o.counts().toInts()).max().orElseThrow());
                moe.backward(dy, 0.01f);
            }
            if (step == 50) {
                gpu.synchronize();
                heldWarm = gpu.allocatedBytes();
                mallocsWarm = gpu.mallocCalls();
            }
        }
        gpu.synchronize();
        System.out.printf("dropless: %d distinct capacities; held %d bytes at step 50, %d at 300; cudaMalloc calls %d, %d%n",
                capacities.size(), heldWarm, gpu.allocatedBytes(), mallocsWarm, gpu.mallocCalls());
        assertTrue(capacities.size() > 10, "the routing should vary the padded capacity, got " + capacities);
        assertTrue(gpu.allocatedBytes() <= heldWarm * 1.25, "device memory grew from " + heldWarm + " to " + gpu.allocatedBytes());
        x.close();
        dy.close();
        moe.close();
        ctx.params().close();
    }

    /** releaseCachedMemory gives the cached (freed) blocks back to the device and keeps those in use. */
    @Test
    void releaseCachedMemoryReturnsTheCacheAndKeepsWhatIsInUse() {
        Tensor kept = gpu.zeros(DType.F32, 1 << 20);
        gpu.zeros(DType.F32, 16 << 20).close();   // 64 MiB, cached on close
        gpu.synchronize();
        long held = gpu.allocatedBytes(), inUse = gpu.inUseBytes();
        assertTrue(held - inUse >= 64L << 20, "the closed tensor's block should be cached: held " + held + ", in use " + inUse);
        gpu.releaseCachedMemory();
        assertEquals(inUse, gpu.inUseBytes(), "in-use blocks untouched");
        assertEquals(inUse, gpu.allocatedBytes(), "every cached block returned");
        gpu.scale(kept, 2.0, kept);   // the kept tensor still works
        assertEquals(0.0, kept.toDoubles()[0]);
        kept.close();
    }
}
