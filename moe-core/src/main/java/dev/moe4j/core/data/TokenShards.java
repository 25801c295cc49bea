package dev.moe4j.core.data;

import java.io.IOException;
import java.nio.ByteOrder;
import java.nio.MappedByteBuffer;
import java.nio.ShortBuffer;
import java.nio.channels.FileChannel;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.util.Arrays;
import java.util.List;

/**
 * Pre-tokenized corpora as nanoGPT writes them ({@code np.array(ids, dtype=np.uint16).tofile(path)}): raw
 * little-endian uint16 token ids, no header. Several shards are one sequence, in the order given. Files are
 * memory-mapped (in windows of at most 2^30 tokens), so a corpus larger than memory costs nothing to open
 * beyond one validation pass that checks every id is below the vocabulary size.
 */
public final class TokenShards implements TokenSequence {
    private static final long WINDOW_TOKENS = 1L << 30;

    private final List<Path> files;
    private final long[] starts;          // starts[f] = global index of file f's first token; starts[n] = total
    private final ShortBuffer[][] windows; // windows[f][w] = tokens [w * WINDOW_TOKENS, ...) of file f

    private TokenShards(List<Path> files, long[] starts, ShortBuffer[][] windows) {
        this.files = files;
        this.starts = starts;
        this.windows = windows;
    }

    /**
     * Opens the shards in order and checks them: each must exist, be non-empty, have an even byte count
     * and hold only ids below {@code vocabSize} (at most 65536); errors name the file and, for a bad id, its
     * position.
     */
    public static TokenShards open(List<Path> shardFiles, int vocabSize) throws IOException {
        if (shardFiles == null || shardFiles.isEmpty()) throw new IllegalArgumentException("token shards: no file given");
        if (vocabSize < 1 || vocabSize > 65536) throw new IllegalArgumentException("token shards: vocabSize must be in [1, 65536] for uint16 ids, got " + vocabSize);
        List<Path> files = List.copyOf(shardFiles);
        long[] starts = new long[files.size() + 1];
        ShortBuffer[][] windows = new ShortBuffer[files.size()][];
        for (int f = 0; f < files.size(); f++) {
            Path p = files.get(f);
            if (!Files.exists(p)) throw new NoSuchFileException(p.toString(), null, "token shard not found");
            try (FileChannel ch = FileChannel.open(p, StandardOpenOption.READ)) {
                long bytes = ch.size();
                if (bytes == 0) throw new IOException(p + ": token shard is empty");
                if (bytes % 2 != 0) throw new IOException(p + ": token shard has " + bytes + " bytes, not a whole number of uint16 tokens");
                long tokens = bytes / 2;
                int nw = (int) ((tokens + WINDOW_TOKENS - 1) / WINDOW_TOKENS);
                windows[f] = new ShortBuffer[nw];
                for (int w = 0; w < nw; w++) {
                    long first = w * WINDOW_TOKENS, n = Math.min(WINDOW_TOKENS, tokens - first);
                    MappedByteBuffer m = ch.map(FileChannel.MapMode.READ_ONLY, first * 2, n * 2);
                    ShortBuffer s = m.order(ByteOrder.LITTLE_ENDIAN).asShortBuffer();
                    for (int i = 0; i < n; i++) {
                        int id = Short.toUnsignedInt(s.get(i));
                        if (id >= vocabSize) {
                            throw new IOException(p + ": token id " + id + " at position " + (first + i) + " is >= the vocabulary size " + vocabSize);
                        }
                    }
                    windows[f][w] = s;
                }
                starts[f + 1] = starts[f] + tokens;
            }
        }
        return new TokenShards(files, starts, windows);
    }

    /** The shard files, in order. */
    public List<Path> files() { return files; }

    @Override
    public long length() { return starts[starts.length - 1]; }

    @Override
    public int get(long i) {
        if (i < 0 || i >= length()) throw new IndexOutOfBoundsException("token " + i + " of " + length());
        int f = Arrays.binarySearch(starts, i);
        if (f < 0) f = -f - 2;   // starts is strictly increasing (no empty shard): the file whose range holds i
        long local = i - starts[f];
        return Short.toUnsignedInt(windows[f][(int) (local / WINDOW_TOKENS)].get((int) (local % WINDOW_TOKENS)));
    }

    @Override
    public String toString() {
        return "TokenShards(" + files.size() + " files, " + length() + " tokens)";
    }

    /** Writes {@code ids} as a nanoGPT-style shard (raw little-endian uint16); for tests and data preparation. */
    public static void write(Path file, int[] ids) throws IOException {
        java.nio.ByteBuffer b = java.nio.ByteBuffer.allocate(ids.length * 2).order(ByteOrder.LITTLE_ENDIAN);
        for (int i = 0; i < ids.length; i++) {
            if (ids[i] < 0 || ids[i] > 65535) throw new IllegalArgumentException("token id " + ids[i] + " at position " + i + " does not fit uint16");
            b.putShort((short) ids[i]);
        }
        Files.write(file, b.array());
    }
}
