package dev.moe4j.cuda;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.backend.BackendProvider;
import org.bytedeco.cuda.global.cublas;
import org.bytedeco.cuda.global.cudart;
import org.bytedeco.javacpp.Loader;

/** Registers the CUDA backend (rank 100, above the CPU) when a driver, a GPU, cuBLAS and the kernels are present. */
public final class CudaBackendProvider implements BackendProvider {
    private static volatile String reason;
    private static volatile boolean probed;

    @Override public String name() { return "cuda"; }

    @Override public int rank() { return 100; }

    @Override
    public String unavailableReason() {
        if (!probed) {
            synchronized (CudaBackendProvider.class) {
                if (!probed) { reason = probe(); probed = true; }
            }
        }
        return reason;
    }

    /** Null when the backend can run, else what is missing. Never throws. */
    static String probe() {
        try {
            try {
                Loader.load(cudart.class);
            } catch (Throwable e) {
                return "the CUDA runtime could not be loaded (libcudart.so.13 from CUDA 13 and an NVIDIA driver are needed; "
                        + "put them on the loader path or LD_LIBRARY_PATH): " + e;
            }
            int[] v = new int[1];
            int rc = cudart.cudaDriverGetVersion(v);
            if (rc != 0 || v[0] == 0) return "no NVIDIA driver found (cudaDriverGetVersion returned " + rc + ", version " + v[0] + ")";
            if (v[0] < 13000) return "the NVIDIA driver supports CUDA " + v[0] / 1000 + "." + v[0] % 1000 / 10 + "; CUDA 13.0+ (driver 580+) is needed";
            int[] n = new int[1];
            rc = cudart.cudaGetDeviceCount(n);
            if (rc != 0) {
                cudart.cudaGetLastError();
                return "no usable CUDA GPU (cudaGetDeviceCount failed with error " + rc + ": " + cudart.cudaGetErrorString(rc).getString() + ")";
            }
            if (n[0] == 0) return "no CUDA GPU is visible (cudaGetDeviceCount = 0; check CUDA_VISIBLE_DEVICES)";
            try {
                Loader.load(cublas.class);
            } catch (Throwable e) {
                return "cuBLAS could not be loaded (libcublas.so.13 is missing; install the CUDA 13 cuBLAS library): " + e;
            }
            if (Kernels.fatbin(Kernels.RESOURCE) == null) {
                return "the CUDA kernels are missing: moe-cuda was built without nvcc, so " + Kernels.RESOURCE + " is not in its jar";
            }
            return null;
        } catch (Throwable e) {
            return "probing CUDA failed: " + e;
        }
    }

    @Override
    public Backend create(int device) {
        String why = unavailableReason();
        if (why != null) throw new IllegalStateException("the CUDA backend cannot run here: " + why);
        return new CudaBackend(device);
    }
}
