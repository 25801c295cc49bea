package dev.moe4j.cuda;

import org.bytedeco.cuda.cudart.CUfunc_st;
import org.bytedeco.cuda.cudart.CUmod_st;
import org.bytedeco.cuda.cudart.CUstream_st;
import org.bytedeco.cuda.global.cudart;
import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.javacpp.PointerPointer;

import java.io.IOException;
import java.io.InputStream;
import java.util.HashMap;
import java.util.Map;

/**
 * The kernels of native/, compiled by the build into one fatbin (sm_80, sm_90 and compute_90 PTX) that is
 * packaged as the resource {@value #RESOURCE} and loaded with the driver API.
 *
 * <p>Arguments are written into one reusable host buffer of 8-byte slots; cuLaunchKernel copies them at
 * the call, so the buffer is free again when it returns. Launches are serialised on this object.
 */
final class Kernels implements AutoCloseable {
    static final String RESOURCE = "/dev/moe4j/cuda/moe4j.fatbin";
    private static final int MAX_ARGS = 32;

    private final CUmod_st module = new CUmod_st();
    private final Map<String, CUfunc_st> functions = new HashMap<>();
    private final Map<String, Integer> sharedOptIn = new HashMap<>();  // dynamic shared bytes allowed above 48 KiB
    private final BytePointer args = new BytePointer(MAX_ARGS * 8L);
    private final PointerPointer<?> argPtrs = new PointerPointer<>(MAX_ARGS);
    private boolean closed;

    /** The fatbin bytes, or null when the jar was built without nvcc. */
    static byte[] fatbin() {
        try (InputStream in = Kernels.class.getResourceAsStream(RESOURCE)) {
            return in == null ? null : in.readAllBytes();
        } catch (IOException e) {
            return null;
        }
    }

    Kernels() {
        byte[] image = fatbin();
        if (image == null) {
            throw new IllegalStateException("the CUDA kernels are missing: resource " + RESOURCE + " is not in the moe-cuda jar "
                    + "(it was built where nvcc was not found; rebuild moe-cuda with nvcc 12.8+ on the PATH)");
        }
        try (BytePointer data = new BytePointer(image)) {
            Cuda.checkDriver(cudart.cuModuleLoadData(module, data), "cuModuleLoadData(" + RESOURCE + ")");
        }
        for (int i = 0; i < MAX_ARGS; i++) argPtrs.put(i, Cuda.ptr(args.address() + 8L * i));
    }

    private CUfunc_st function(String name) {
        return functions.computeIfAbsent(name, n -> {
            CUfunc_st f = new CUfunc_st();
            Cuda.checkDriver(cudart.cuModuleGetFunction(f, module, n), "cuModuleGetFunction(" + n + ")");
            return f;
        });
    }

    /**
     * Launches {@code name} on a (gx, gy) grid of {@code block}-thread blocks. Each argument must have the
     * kernel parameter's Java counterpart: Long for pointers and i64, Integer for int, Float for float,
     * Double for double.
     */
    synchronized void launch(String name, int gx, int gy, int block, int sharedBytes, CUstream_st stream, Object... a) {
        if (closed) throw new IllegalStateException("the CUDA backend was closed");
        if (a.length > MAX_ARGS) throw new IllegalArgumentException(name + ": too many kernel arguments");
        for (int i = 0; i < a.length; i++) {
            long slot = 8L * i;
            args.putLong(slot, 0L);
            switch (a[i]) {
                case Long v -> args.putLong(slot, v);
                case Integer v -> args.putInt(slot, v);
                case Float v -> args.putFloat(slot, v);
                case Double v -> args.putDouble(slot, v);
                default -> throw new IllegalArgumentException(name + ": unsupported kernel argument " + a[i]);
            }
        }
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
        args.close();
        argPtrs.close();
    }
}
