package dev.moe4j.cuda;

/** A failed CUDA runtime, driver or cuBLAS call; the message names the call and the error. */
public final class CudaException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    public CudaException(String message) { super(message); }
}
