package dev.moe4j.core.data;

import dev.moe4j.core.backend.Philox;

/**
 * Draws training batches at random positions of a token sequence, as a pure function of (seed, step):
 * a run resumed at step s draws exactly the batch an uninterrupted run draws at s, with no sampler state
 * to save beyond the step number.
 *
 * <p>Row r of the global batch at step s starts at a position drawn uniformly from [0, length - seqLen)
 * by Philox4x32-10 with key = seed and counter = s * 2^24 + r (64 random bits, reduced modulo the range).
 * With data parallelism, rank k of W ranks takes global rows [k * B, (k + 1) * B), so W ranks of batch B
 * together see exactly the batch one rank of batch W * B sees.
 */
public final class BatchSampler {
    private static final int ROW_BITS = 24;
    private static final long MAX_STEP = (1L << (63 - ROW_BITS)) - 1;

    private final TokenSequence tokens;
    private final int batchSize;
    private final int seqLen;
    private final long seed;

    /**
     * @param tokens    the training tokens; at least seqLen + 1 of them
     * @param batchSize rows per batch (per rank), B > 0
     * @param seqLen    tokens per row, T > 0
     * @param seed      the run's data seed
     */
    public BatchSampler(TokenSequence tokens, int batchSize, int seqLen, long seed) {
        if (batchSize <= 0) throw new IllegalArgumentException("batchSize must be > 0, got " + batchSize);
        if (seqLen <= 0) throw new IllegalArgumentException("seqLen must be > 0, got " + seqLen);
        if (tokens.length() < (long) seqLen + 1) {
            throw new IllegalArgumentException("training corpus has " + tokens.length() + " tokens, fewer than seqLen + 1 = " + (seqLen + 1)
                    + " needed for one sequence and its targets");
        }
        this.tokens = tokens;
        this.batchSize = batchSize;
        this.seqLen = seqLen;
        this.seed = seed;
    }

    public int batchSize() { return batchSize; }

    public int seqLen() { return seqLen; }

    public long seed() { return seed; }

    /** The batch of step {@code step} (single rank). */
    public Batch batch(long step) {
        return batch(step, 0, 1);
    }

    /** Rank {@code rank}'s share (rows [rank * B, (rank + 1) * B) of the global batch) at {@code step}. */
    public Batch batch(long step, int rank, int worldSize) {
        if (worldSize <= 0) throw new IllegalArgumentException("worldSize must be > 0, got " + worldSize);
        if (rank < 0 || rank >= worldSize) throw new IllegalArgumentException("rank must be in [0, " + worldSize + "), got " + rank);
        if ((long) batchSize * worldSize > (1L << ROW_BITS)) {
            throw new IllegalArgumentException("global batch " + (long) batchSize * worldSize + " rows exceeds " + (1L << ROW_BITS));
        }
        int[] in = new int[batchSize * seqLen];
        int[] tg = new int[batchSize * seqLen];
        int[] row = new int[seqLen + 1];
        for (int b = 0; b < batchSize; b++) {
            long start = start(step, (long) rank * batchSize + b);
            tokens.read(start, row, 0, seqLen + 1);
            System.arraycopy(row, 0, in, b * seqLen, seqLen);
            System.arraycopy(row, 1, tg, b * seqLen, seqLen);
        }
        return new Batch(in, tg, batchSize, seqLen);
    }

    /** Start position of global row {@code row} at {@code step}: uniform in [0, length - seqLen). */
    public long start(long step, long row) {
        if (step < 0 || step > MAX_STEP) throw new IllegalArgumentException("step must be in [0, " + MAX_STEP + "], got " + step);
        if (row < 0 || row >= (1L << ROW_BITS)) throw new IllegalArgumentException("row must be in [0, " + (1L << ROW_BITS) + "), got " + row);
        int[] r = Philox.block(seed, (step << ROW_BITS) | row);
        long bits = ((long) r[0] << 32) | (r[1] & 0xffffffffL);
        return Long.remainderUnsigned(bits, tokens.length() - seqLen);
    }
}
