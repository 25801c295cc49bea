package dev.moe4j.cuda;

import org.bytedeco.cuda.cudart.CUfunc_st;
import org.bytedeco.cuda.cudart.CUmod_st;
import org.bytedeco.cuda.cudart.CUstream_st;
import org.bytedeco.cuda.cudart.CUtensorMap;
import org.bytedeco.cuda.global.cudart;
import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.javacpp.PointerPointer;

import java.io.IOException;
import java.io.InputStream;
import java.util.HashMap;
import java.util.Map;

/**
 * The kernels of native/, compiled by the build into one fatbin (sm_80, sm_90 and compute_90 PTX) that is
 * packaged as the resource {@value #RESOURCE} and loaded with the driver API; on a compute capability 9.0 device
 * (H100, H200) also the Hopper-only kernels ({@value #RESOURCE_SM90A}: wgmma and the bulk tensor copy, sm_90a).
 *
 * <p>Arguments are written into one reusable host buffer of 8-byte slots (tensor maps: 128-byte slots, encoded at
 * the launch); cuLaunchKernel copies them at the call, so the buffers are free again when it returns. Launches are
 * serialised on this object.
 */
final class Kernels implements AutoCloseable {
    static final String RESOURCE = "/dev/moe4j/cuda/moe4j.fatbin";
    static final String RESOURCE_SM90A = "/dev/moe4j/cuda/moe4j_sm90a.fatbin";
    private static final int MAX_ARGS = 32, MAX_MAPS = 4, MAP_BYTES = 128;

    private final CUmod_st module = new CUmod_st();
    private final CUmod_st hopper;   // null: not a compute capability 9.0 device, or the jar has no sm_90a fatbin
    private final int multiprocessors;
    private final Map<String, CUfunc_st> functions = new HashMap<>();
    private final Map<String, Integer> sharedOptIn = new HashMap<>();  // dynamic shared bytes allowed above 48 KiB
    private final BytePointer args = new BytePointer(MAX_ARGS * 8L);
    private final PointerPointer<?> argPtrs = new PointerPointer<>(MAX_ARGS);
    private final BytePointer mapSpace = new BytePointer(MAX_MAPS * MAP_BYTES + 64L);   // CUtensorMap is 64-byte aligned
    private final long maps = (mapSpace.address() + 63) & ~63L;
    private boolean closed;

    /**
     * A kernel argument passed by value as a CUtensorMap ({@code const __grid_constant__ CUtensorMap}): a bf16 (or
     * fp32) tensor of packed rows at {@code address} with {@code dims} (elements, innermost first), moved in boxes of
     * {@code box} elements with the 128-byte swizzle; loads past the dims read zeros, stores there write nothing.
     */
    record TensorMap(long address, boolean f32, long[] dims, int[] box) {}

    /** The fatbin bytes of a resource, or null when the jar was built without it. */
    static byte[] fatbin(String resource) {
        try (InputStream in = Kernels.class.getResourceAsStream(resource)) {
            return in == null ? null : in.readAllBytes();
        } catch (IOException e) {
            return null;
        }
    }

    /** Loads the kernels for the current device. */
    Kernels(int device) {
        byte[] image = fatbin(RESOURCE);
        if (image == null) {
            throw new IllegalStateException("the CUDA kernels are missing: resource " + RESOURCE + " is not in the moe-cuda jar "
                    + "(it was built where nvcc was not found; rebuild moe-cuda with nvcc 12.8+ on the PATH)");
        }
        load(module, image, RESOURCE);
        int[] v = new int[1];
        Cuda.check(cudart.cudaDeviceGetAttribute(v, cudart.cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute(multiprocessors)");
        multiprocessors = v[0];
        Cuda.check(cudart.cudaDeviceGetAttribute(v, cudart.cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute(major)");
        int major = v[0];
        Cuda.check(cudart.cudaDeviceGetAttribute(v, cudart.cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute(minor)");
        byte[] sm90a = major == 9 && v[0] == 0 ? fatbin(RESOURCE_SM90A) : null;
        CUmod_st h = null;
        if (sm90a != null) {
            h = new CUmod_st();
            try {
                load(h, sm90a, RESOURCE_SM90A);
            } catch (CudaException e) {   // the rest of the backend works without them: say so, once
                System.err.println("moe4j: the Hopper grouped GEMM kernels did not load (" + e.getMessage() + "); grouped products run on cuBLAS");
                h = null;
            }
        }
        hopper = h;
        for (int i = 0; i < MAX_ARGS; i++) argPtrs.put(i, Cuda.ptr(args.address() + 8L * i));
    }

    private static void load(CUmod_st into, byte[] image, String name) {
        try (BytePointer data = new BytePointer(image)) {
            Cuda.checkDriver(cudart.cuModuleLoadData(into, data), "cuModuleLoadData(" + name + ")");
        }
    }

    /** Whether the Hopper kernels (sm_90a: k_wg_*) are loaded. */
    boolean hopper() { return hopper != null; }

    /** The device's multiprocessor count (the grid of persistent kernels). */
    int multiprocessors() { return multiprocessors; }

    private CUfunc_st function(String name) {
        return functions.computeIfAbsent(name, n -> {
            CUfunc_st f = new CUfunc_st();
            CUmod_st m = n.startsWith("k_wg_") ? hopper : module;   // the sm_90a kernels' prefix
            if (m == null) throw new IllegalStateException(n + " is a Hopper (sm_90a) kernel: not loaded on this device");
            Cuda.checkDriver(cudart.cuModuleGetFunction(f, m, n), "cuModuleGetFunction(" + n + ")");
            return f;
        });
    }

    /** Encodes m into the 128-byte slot at address (cuTensorMapEncodeTiled: 128-byte swizzle, zero fill). */
    private static void encode(String kernel, TensorMap m, long address) {
        int rank = m.dims().length;
        long[] strides = new long[rank - 1];
        long stride = m.f32() ? 4 : 2;
        for (int i = 1; i < rank; i++) { stride *= m.dims()[i - 1]; strides[i - 1] = stride; }
        int[] elementStrides = new int[rank];
        java.util.Arrays.fill(elementStrides, 1);
        Cuda.checkDriver(cudart.cuTensorMapEncodeTiled(new CUtensorMap(Cuda.ptr(address)),
                        m.f32() ? cudart.CU_TENSOR_MAP_DATA_TYPE_FLOAT32 : cudart.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, rank,
                        Cuda.ptr(m.address()), m.dims(), strides, m.box(), elementStrides, cudart.CU_TENSOR_MAP_INTERLEAVE_NONE,
                        cudart.CU_TENSOR_MAP_SWIZZLE_128B, cudart.CU_TENSOR_MAP_L2_PROMOTION_L2_256B, cudart.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
                "cuTensorMapEncodeTiled(" + kernel + ", dims " + java.util.Arrays.toString(m.dims()) + ", box " + java.util.Arrays.toString(m.box()) + ")");
    }

    /**
     * Launches {@code name} on a (gx, gy) grid of {@code block}-thread blocks. Each argument must have the
     * kernel parameter's Java counterpart: Long for pointers and i64, Integer for int, Float for float,
     * Double for double, {@link TensorMap} for a CUtensorMap.
     */
    synchronized void launch(String name, int gx, int gy, int block, int sharedBytes, CUstream_st stream, Object... a) {
        if (closed) throw new IllegalStateException("the CUDA backend was closed");
        if (a.length > MAX_ARGS) throw new IllegalArgumentException(name + ": too many kernel arguments");
        int mapCount = 0;
        try {
            for (int i = 0; i < a.length; i++) {
                long slot = 8L * i;
                args.putLong(slot, 0L);
                switch (a[i]) {
                    case TensorMap m -> {
                        if (mapCount == MAX_MAPS) throw new IllegalArgumentException(name + ": too many tensor maps");
                        long at = maps + (long) MAP_BYTES * mapCount++;
                        encode(name, m, at);
                        argPtrs.put(i, Cuda.ptr(at));
                    }
                    case Long v -> args.putLong(slot, v);
                    case Integer v -> args.putInt(slot, v);
                    case Float v -> args.putFloat(slot, v);
                    case Double v -> args.putDouble(slot, v);
                    default -> throw new IllegalArgumentException(name + ": unsupported kernel argument " + a[i]);
                }
            }
            launch(name, gx, gy, block, sharedBytes, stream);
        } finally {
            // the slots of tensor maps back to their 8-byte argument slots
            if (mapCount > 0) for (int i = 0; i < a.length; i++) if (a[i] instanceof TensorMap) argPtrs.put(i, Cuda.ptr(args.address() + 8L * i));
        }
    }

    private void launch(String name, int gx, int gy, int block, int sharedBytes, CUstream_st stream) {
        CUfunc_st f = function(name);
        if (sharedBytes > 48 * 1024 && sharedOptIn.getOrDefault(name, 0) < sharedBytes) {
            Cuda.checkDriver(cudart.cuFuncSetAttribute(f, cudart.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, sharedBytes),
                    "cuFuncSetAttribute(" + name + ", MAX_DYNAMIC_SHARED_SIZE_BYTES, " + sharedBytes + ")");
            sharedOptIn.put(name, sharedBytes);
        }
        Cuda.checkDriver(cudart.cuLaunchKernel(f, gx, gy, 1, block, 1, 1, sharedBytes, stream, argPtrs, null),
                "cuLaunchKernel(" + name + ", grid " + gx + "x" + gy + ", block " + block + ", shared " + sharedBytes + ")");
    }

    @Override
    public synchronized void close() {
        if (closed) return;
        closed = true;
        cudart.cuModuleUnload(module);
        if (hopper != null) cudart.cuModuleUnload(hopper);
        args.close();
        mapSpace.close();
        argPtrs.close();
    }
}
