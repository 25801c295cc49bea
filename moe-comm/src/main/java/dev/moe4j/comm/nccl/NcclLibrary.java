package dev.moe4j.comm.nccl;

import org.bytedeco.cuda.global.nccl;
import org.bytedeco.javacpp.Loader;

import java.util.Locale;

/**
 * Loads NCCL through the JavaCPP presets once, and explains what is missing when it cannot: NCCL exists only on
 * Linux, needs libnccl.so.2 (NCCL 2.18 or newer, for non-blocking init and communicator split) and the CUDA
 * runtime the presets were built for.
 */
public final class NcclLibrary {
    /** NCCL 2.18: ncclCommSplit and a usable non-blocking ncclConfig_t. */
    public static final int MIN_VERSION = 21800;

    private static volatile Integer version;
    private static volatile String unavailable;

    private NcclLibrary() {}

    /** Null when NCCL can be used here, else a sentence saying what is missing. Never throws. */
    public static synchronized String unavailableReason() {
        if (version != null) return null;
        if (unavailable != null) return unavailable;
        String os = System.getProperty("os.name", "?");
        String arch = System.getProperty("os.arch", "?");
        if (!os.toLowerCase(Locale.ROOT).contains("linux")) {
            return unavailable = "NCCL runs only on Linux with NVIDIA GPUs; this is " + os + " " + arch
                    + ". Use the in-process communicator (dev.moe4j.comm.InProcessWorld) for CPU runs.";
        }
        try {
            Loader.load(nccl.class);
            int[] v = new int[1];
            int rc = nccl.ncclGetVersion(v);
            if (rc != nccl.ncclSuccess) return unavailable = "ncclGetVersion failed with code " + rc;
            if (v[0] < MIN_VERSION) {
                return unavailable = "NCCL " + versionString(v[0]) + " is too old; MoE4J needs NCCL " + versionString(MIN_VERSION)
                        + " or newer (install a newer libnccl2 or set LD_LIBRARY_PATH to one)";
            }
            version = v[0];
            return null;
        } catch (UnsatisfiedLinkError | NoClassDefFoundError | ExceptionInInitializerError e) {
            Throwable root = e;
            while (root.getCause() != null) root = root.getCause();
            return unavailable = "cannot load NCCL: libnccl.so.2 (NCCL >= " + versionString(MIN_VERSION) + ") and the CUDA runtime "
                    + "libcudart.so.13 must be installed and on the loader path (ldconfig -p | grep nccl; apt install libnccl2, "
                    + "or set LD_LIBRARY_PATH), with the org.bytedeco:cuda linux-x86_64 jar on the class path. Cause: " + root;
        }
    }

    /** Loads NCCL or throws {@link IllegalStateException} with {@link #unavailableReason()}. Returns the version code. */
    public static int load() {
        String why = unavailableReason();
        if (why != null) throw new IllegalStateException(why);
        return version;
    }

    /** One line for a doctor command: the NCCL version found, or why NCCL cannot be used. */
    public static String describe() {
        String why = unavailableReason();
        return why == null ? "NCCL " + versionString(version) + " (headers " + versionString(nccl.NCCL_VERSION_CODE) + ")" : "NCCL unavailable: " + why;
    }

    /** 22809 -> "2.28.9". */
    public static String versionString(int code) {
        return (code / 10000) + "." + (code / 100 % 100) + "." + (code % 100);
    }
}
