package dev.moe4j.core.data;

import java.nio.charset.StandardCharsets;

/** One token per UTF-8 byte: vocabulary of 256, nothing to load. */
public final class ByteTokenizer implements Tokenizer {
    public static final ByteTokenizer INSTANCE = new ByteTokenizer();

    private ByteTokenizer() {}

    @Override
    public int[] encode(String text) {
        byte[] b = text.getBytes(StandardCharsets.UTF_8);
        int[] ids = new int[b.length];
        for (int i = 0; i < b.length; i++) ids[i] = b[i] & 0xff;
        return ids;
    }

    @Override
    public String decode(int[] ids) {
        byte[] b = new byte[ids.length];
        for (int i = 0; i < ids.length; i++) {
            if (ids[i] < 0 || ids[i] > 255) throw new IllegalArgumentException("token id " + ids[i] + " at position " + i + " is outside the byte vocabulary [0, 256)");
            b[i] = (byte) ids[i];
        }
        return new String(b, StandardCharsets.UTF_8);
    }

    @Override
    public int vocabSize() { return 256; }

    @Override
    public String toString() { return "ByteTokenizer(256)"; }
}
