package dev.moe4j.core.tensor;

/**
 * Element types a tensor can hold. F64 exists for the CPU backend's float64 reference mode
 * (finite-difference gradient checks); GPU backends reject it.
 */
public enum DType {
    F32(4), BF16(2), I32(4), F64(8);

    private final int bytes;

    DType(int bytes) { this.bytes = bytes; }

    /** Size of one element in bytes. */
    public int bytes() { return bytes; }

    public boolean isFloating() { return this != I32; }

    /** Round a value to what this type can store (bf16: round to nearest even; I32: truncate toward zero). */
    public double round(double v) {
        return switch (this) {
            case F64 -> v;
            case F32 -> (float) v;
            case BF16 -> BFloat16.round((float) v);
            case I32 -> (int) v;
        };
    }
}
