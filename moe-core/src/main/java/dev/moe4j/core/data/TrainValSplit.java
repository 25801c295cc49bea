package dev.moe4j.core.data;

/** A corpus cut in two: the first tokens for training, the last {@code valFraction} held out for validation. */
public record TrainValSplit(TokenSequence train, TokenSequence val) {
    /** The default held-out fraction: 10%. */
    public static final double DEFAULT_VAL_FRACTION = 0.1;

    /** Splits with the default 10% held out. */
    public static TrainValSplit of(TokenSequence all) {
        return of(all, DEFAULT_VAL_FRACTION);
    }

    /**
     * The last floor(length * valFraction) tokens become the validation split, the rest the training split.
     * valFraction must be in [0, 1).
     */
    public static TrainValSplit of(TokenSequence all, double valFraction) {
        if (!(valFraction >= 0 && valFraction < 1)) throw new IllegalArgumentException("valFraction must be in [0, 1), got " + valFraction);
        long n = all.length();
        long nVal = (long) Math.floor(n * valFraction);
        if (n - nVal <= 0) throw new IllegalArgumentException("corpus of " + n + " tokens leaves no training tokens at valFraction " + valFraction);
        return new TrainValSplit(all.slice(0, n - nVal), all.slice(n - nVal, n));
    }
}
