package dev.moe4j.core.backend;

/**
 * Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the
 * counter-based generator every backend uses so that random ops give the same numbers on every device.
 *
 * <p>Element i of a random op with (seed, offset) uses counter = offset + i (low word, high word, 0, 0)
 * and key = seed (low word, high word); the CUDA kernels in native/ compute the same function.
 */
public final class Philox {
    private static final int M0 = 0xD2511F53, M1 = 0xCD9E8D57;
    private static final int W0 = 0x9E3779B9, W1 = 0xBB67AE85;

    private Philox() {}

    /** The four 32-bit outputs for one counter. */
    public static int[] block(long seed, long counter) {
        int c0 = (int) counter, c1 = (int) (counter >>> 32), c2 = 0, c3 = 0;
        int k0 = (int) seed, k1 = (int) (seed >>> 32);
        for (int round = 0; round < 10; round++) {
            long p0 = (M0 & 0xffffffffL) * (c0 & 0xffffffffL);
            long p1 = (M1 & 0xffffffffL) * (c2 & 0xffffffffL);
            int n0 = (int) (p1 >>> 32) ^ c1 ^ k0;
            int n1 = (int) p1;
            int n2 = (int) (p0 >>> 32) ^ c3 ^ k1;
            int n3 = (int) p0;
            c0 = n0; c1 = n1; c2 = n2; c3 = n3;
            k0 += W0; k1 += W1;
        }
        return new int[] {c0, c1, c2, c3};
    }

    /** Uniform in [0, 1) with 24 random bits (exactly representable in float32). */
    public static float uniform(long seed, long counter) {
        int x = block(seed, counter)[0];
        return (x >>> 8) * 0x1.0p-24f;
    }

    /** Standard normal by Box-Muller on the first two words of the block. */
    public static double normal(long seed, long counter) {
        int[] b = block(seed, counter);
        double u1 = ((b[0] >>> 8) + 1) * 0x1.0p-24;  // (0, 1]: log is finite
        double u2 = (b[1] >>> 8) * 0x1.0p-24;
        return Math.sqrt(-2.0 * Math.log(u1)) * Math.cos(2.0 * Math.PI * u2);
    }
}
