package dev.moe4j.core.data;

/**
 * A read-only sequence of token ids, in memory or memory-mapped from token shards. Indices are longs so a
 * corpus may exceed 2^31 tokens.
 */
public interface TokenSequence {
    long length();

    /** Token at {@code i}, 0 <= i < length(). */
    int get(long i);

    /** Copies tokens [start, start + len) into {@code dst[off ..]}. */
    default void read(long start, int[] dst, int off, int len) {
        if (start < 0 || len < 0 || start + len > length()) {
            throw new IndexOutOfBoundsException("tokens [" + start + ", " + (start + len) + ") of a sequence of " + length());
        }
        for (int i = 0; i < len; i++) dst[off + i] = get(start + i);
    }

    /** Tokens [from, to) as a view. */
    default TokenSequence slice(long from, long to) {
        TokenSequence base = this;
        if (from < 0 || to < from || to > length()) {
            throw new IndexOutOfBoundsException("slice [" + from + ", " + to + ") of a sequence of " + length());
        }
        return new TokenSequence() {
            @Override public long length() { return to - from; }

            @Override public int get(long i) {
                if (i < 0 || i >= to - from) throw new IndexOutOfBoundsException("token " + i + " of a slice of " + (to - from));
                return base.get(from + i);
            }

            @Override public void read(long start, int[] dst, int off, int len) {
                if (start < 0 || len < 0 || start + len > to - from) {
                    throw new IndexOutOfBoundsException("tokens [" + start + ", " + (start + len) + ") of a slice of " + (to - from));
                }
                base.read(from + start, dst, off, len);
            }
        };
    }

    /** All tokens in a new array (must fit one). */
    default int[] toArray() {
        if (length() > Integer.MAX_VALUE - 8) throw new IllegalStateException(length() + " tokens do not fit one array");
        int[] out = new int[(int) length()];
        read(0, out, 0, out.length);
        return out;
    }

    /** A sequence over {@code tokens} (not copied). */
    static TokenSequence of(int[] tokens) {
        return new TokenSequence() {
            @Override public long length() { return tokens.length; }

            @Override public int get(long i) { return tokens[Math.toIntExact(i)]; }

            @Override public void read(long start, int[] dst, int off, int len) {
                if (start < 0 || len < 0 || start + len > tokens.length) {
                    throw new IndexOutOfBoundsException("tokens [" + start + ", " + (start + len) + ") of a sequence of " + tokens.length);
                }
                System.arraycopy(tokens, (int) start, dst, off, len);
            }
        };
    }
}
