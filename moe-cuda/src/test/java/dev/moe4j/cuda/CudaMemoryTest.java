package dev.moe4j.cuda;

import dev.moe4j.core.backend.Activation;
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
}
