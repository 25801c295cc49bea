package dev.moe4j.core.tensor;

/** bfloat16 conversions: the upper 16 bits of an IEEE float32, rounded to nearest even. */
public final class BFloat16 {
    private BFloat16() {}

    /** float32 -> bf16 bits, round to nearest even; NaN stays NaN (quiet). */
    public static short fromFloat(float f) {
        int bits = Float.floatToRawIntBits(f);
        if ((bits & 0x7fffffff) > 0x7f800000) return (short) ((bits >>> 16) | 0x40);
        int rounding = 0x7fff + ((bits >>> 16) & 1);
        return (short) ((bits + rounding) >>> 16);
    }

    public static float toFloat(short b) {
        return Float.intBitsToFloat((b & 0xffff) << 16);
    }

    /** The float32 value nearest-even rounded to bf16 precision. */
    public static float round(float f) {
        return toFloat(fromFloat(f));
    }
}
