package dev.moe4j.core.data;

import java.util.Iterator;
import java.util.NoSuchElementException;

/**
 * The held-out tokens in fixed order: window w covers inputs [w*T, w*T + T) and targets one token later,
 * windows grouped B to a batch. Only whole batches are produced; the tail that does not fill one (fewer
 * than B*T + 1 tokens) is left out, and {@link #tokensCovered()} says how many targets are scored.
 */
public final class ValidationBatches implements Iterable<Batch> {
    private final TokenSequence tokens;
    private final int batchSize;
    private final int seqLen;
    private final int numBatches;

    public ValidationBatches(TokenSequence tokens, int batchSize, int seqLen) {
        if (batchSize <= 0) throw new IllegalArgumentException("batchSize must be > 0, got " + batchSize);
        if (seqLen <= 0) throw new IllegalArgumentException("seqLen must be > 0, got " + seqLen);
        long windows = (tokens.length() - 1) / seqLen;
        long batches = Math.max(0, windows) / batchSize;
        if (batches == 0) {
            throw new IllegalArgumentException("validation split has " + tokens.length() + " tokens, fewer than batchSize * seqLen + 1 = "
                    + ((long) batchSize * seqLen + 1) + " needed for one batch");
        }
        this.tokens = tokens;
        this.batchSize = batchSize;
        this.seqLen = seqLen;
        this.numBatches = (int) Math.min(Integer.MAX_VALUE, batches);
    }

    public int numBatches() { return numBatches; }

    /** Targets scored by a full pass: numBatches * B * T. */
    public long tokensCovered() { return (long) numBatches * batchSize * seqLen; }

    /** Batch {@code i}, 0 <= i < numBatches(). */
    public Batch batch(int i) {
        if (i < 0 || i >= numBatches) throw new IndexOutOfBoundsException("validation batch " + i + " of " + numBatches);
        int[] in = new int[batchSize * seqLen];
        int[] tg = new int[batchSize * seqLen];
        int[] row = new int[seqLen + 1];
        for (int b = 0; b < batchSize; b++) {
            long start = ((long) i * batchSize + b) * seqLen;
            tokens.read(start, row, 0, seqLen + 1);
            System.arraycopy(row, 0, in, b * seqLen, seqLen);
            System.arraycopy(row, 1, tg, b * seqLen, seqLen);
        }
        return new Batch(in, tg, batchSize, seqLen);
    }

    @Override
    public Iterator<Batch> iterator() {
        return new Iterator<>() {
            private int next;

            @Override public boolean hasNext() { return next < numBatches; }

            @Override public Batch next() {
                if (!hasNext()) throw new NoSuchElementException();
                return batch(next++);
            }
        };
    }
}
