package dev.moe4j.cuda;

import org.bytedeco.cuda.global.cublas;
import org.bytedeco.cuda.global.cudart;
import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.javacpp.Pointer;

/** Return-code checks (llm.c's cudaCheck / cublasCheck) and raw device pointers for the JavaCPP bindings. */
final class Cuda {
    private Cuda() {}

    /** A JavaCPP pointer holding a raw device address (no deallocator: the memory belongs to the allocator). */
    static final class DevPtr extends Pointer {
        DevPtr(long address) { this.address = address; }
    }

    static Pointer ptr(long address) { return new DevPtr(address); }

    /** Throws unless a CUDA runtime call returned cudaSuccess. */
    static void check(int rc, String call) {
        if (rc != 0) {
            String msg;
            try {
                BytePointer s = cudart.cudaGetErrorString(rc);
                msg = s == null ? "?" : s.getString();
            } catch (RuntimeException | LinkageError e) {
                msg = "?";
            }
            throw new CudaException(call + " failed: CUDA error " + rc + " (" + msg + ")");
        }
    }

    /** Throws unless a CUDA driver call returned CUDA_SUCCESS. */
    static void checkDriver(int rc, String call) {
        if (rc != 0) {
            String msg = "?";
            try (BytePointer p = new BytePointer((Pointer) null)) {
                org.bytedeco.javacpp.PointerPointer<BytePointer> out = new org.bytedeco.javacpp.PointerPointer<>(1);
                if (cudart.cuGetErrorString(rc, out) == 0 && out.get(0) != null) msg = out.getString(0);
                out.close();
            } catch (RuntimeException | LinkageError e) {
                // keep "?"
            }
            throw new CudaException(call + " failed: CUDA driver error " + rc + " (" + msg + ")");
        }
    }

    /** Throws unless a cuBLAS call returned CUBLAS_STATUS_SUCCESS. */
    static void checkBlas(int rc, String call) {
        if (rc != cublas.CUBLAS_STATUS_SUCCESS) {
            String msg;
            try {
                BytePointer s = cublas.cublasGetStatusString(rc);
                msg = s == null ? "?" : s.getString();
            } catch (RuntimeException | LinkageError e) {
                msg = "?";
            }
            throw new CudaException(call + " failed: cuBLAS status " + rc + " (" + msg + ")");
        }
    }
}
