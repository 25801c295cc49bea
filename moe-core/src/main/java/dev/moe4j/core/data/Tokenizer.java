package dev.moe4j.core.data;

/**
 * Text to token ids and back. Implementations are immutable and thread-safe; for every valid string s
 * (no unpaired surrogates), {@code decode(encode(s)).equals(s)}.
 */
public interface Tokenizer {
    /** The token ids of {@code text}, each in [0, vocabSize). */
    int[] encode(String text);

    /**
     * The text of {@code ids}. Byte sequences that are not valid UTF-8 (e.g. a multi-byte character cut
     * in half) decode to U+FFFD. An id outside the vocabulary is an {@link IllegalArgumentException}.
     */
    String decode(int[] ids);

    /** One more than the largest token id: the size of the model's embedding table. */
    int vocabSize();
}
