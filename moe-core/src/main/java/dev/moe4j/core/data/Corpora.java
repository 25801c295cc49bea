package dev.moe4j.core.data;

import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;

/** The corpus shipped with the library, and the unigram baselines a trained model must beat. */
public final class Corpora {
    /** Classpath resource (next to this class) of the default corpus. */
    public static final String DEFAULT_CORPUS_RESOURCE = "tinyshakespeare.txt";

    private static volatile String defaultCorpus;

    private Corpora() {}

    /**
     * Tiny Shakespeare (1,115,394 characters of Shakespeare's plays, public domain; as collected for
     * karpathy/char-rnn), read from the classpath: needs no download.
     */
    public static String defaultCorpus() {
        String s = defaultCorpus;
        if (s == null) {
            try (InputStream in = Corpora.class.getResourceAsStream(DEFAULT_CORPUS_RESOURCE)) {
                if (in == null) throw new IllegalStateException("resource " + DEFAULT_CORPUS_RESOURCE + " is missing from the moe-core jar");
                s = new String(in.readAllBytes(), StandardCharsets.UTF_8);
            } catch (IOException e) {
                throw new UncheckedIOException("cannot read resource " + DEFAULT_CORPUS_RESOURCE, e);
            }
            defaultCorpus = s;
        }
        return s;
    }

    /**
     * The entropy, in nats, of the empirical unigram distribution of {@code tokens}:
     * H = -sum_v p(v) ln p(v) with p(v) = count(v) / n. A model whose loss does not fall below this has learned
     * nothing beyond token frequencies.
     */
    public static double unigramEntropy(TokenSequence tokens) {
        long n = tokens.length();
        if (n == 0) throw new IllegalArgumentException("unigram entropy of an empty token sequence is undefined");
        long[] counts = counts(tokens, 0);
        double h = 0;
        for (long c : counts) {
            if (c > 0) {
                double p = (double) c / n;
                h -= p * Math.log(p);
            }
        }
        return h;
    }

    public static double unigramEntropy(int[] tokens) {
        return unigramEntropy(TokenSequence.of(tokens));
    }

    /**
     * The cross-entropy, in nats per token, of {@code eval} under the unigram model fitted on {@code train}
     * with add-one (Laplace) smoothing over {@code vocabSize} tokens: the validation loss of the best
     * frequency-only model, the fair bar for a validation loss.
     */
    public static double unigramCrossEntropy(TokenSequence train, TokenSequence eval, int vocabSize) {
        if (vocabSize <= 0) throw new IllegalArgumentException("vocabSize must be > 0, got " + vocabSize);
        if (eval.length() == 0) throw new IllegalArgumentException("cross-entropy over an empty evaluation sequence is undefined");
        long[] counts = counts(train, vocabSize);
        double denom = train.length() + (double) vocabSize;
        double sum = 0;
        for (long i = 0; i < eval.length(); i++) {
            int t = eval.get(i);
            if (t < 0 || t >= vocabSize) throw new IllegalArgumentException("token " + t + " at position " + i + " is outside [0, " + vocabSize + ")");
            sum -= Math.log((counts[t] + 1) / denom);
        }
        return sum / eval.length();
    }

    private static long[] counts(TokenSequence tokens, int minSize) {
        long[] counts = new long[minSize > 0 ? minSize : 256];
        for (long i = 0; i < tokens.length(); i++) {
            int t = tokens.get(i);
            if (t < 0) throw new IllegalArgumentException("negative token id " + t + " at position " + i);
            if (t >= counts.length) {
                if (minSize > 0) throw new IllegalArgumentException("token " + t + " at position " + i + " is outside [0, " + minSize + ")");
                counts = java.util.Arrays.copyOf(counts, Math.max(t + 1, 2 * counts.length));
            }
            counts[t]++;
        }
        return counts;
    }
}
