package dev.moe4j.core.io;

import com.fasterxml.jackson.databind.ObjectMapper;
import dev.moe4j.core.tensor.BFloat16;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Shape;
import dev.moe4j.core.tensor.Tensor;

import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.AtomicMoveNotSupportedException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.nio.file.StandardOpenOption;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.function.Supplier;

/**
 * Collects named tensors and string metadata, then writes one safetensors file atomically.
 *
 * <pre>{@code
 * new SafeTensorsWriter()
 *     .metadata("step", "1200")
 *     .add("wte", wteTensor)                       // values read from the backend at write time
 *     .addInts("rng", new int[] {2}, () -> state)  // any host array, produced lazily
 *     .write(Path.of("ckpt/model.safetensors"));
 * }</pre>
 *
 * <p>Values are pulled from their sources while the file is written, one tensor at a time, so the host never
 * holds more than one tensor's copy. The file is written under a temporary name in the target's directory,
 * forced to disk, then renamed over the target in one atomic step: a crash or an exception at any moment
 * leaves either the old file or the new one under the final name, never a partial one. The hex SHA-256 of
 * the data section is stored in the metadata under {@link SafeTensors#CHECKSUM_KEY}.
 *
 * <p>Tensors are laid out by decreasing element size (then in the order added), so every tensor starts at an
 * offset aligned to its element size (the header is padded to a multiple of 8).
 */
public final class SafeTensorsWriter {
    private static final int CHUNK_BYTES = 1 << 20;
    private static final ObjectMapper JSON = new ObjectMapper();

    /** Encodes one tensor's values into the little-endian data stream. */
    @FunctionalInterface
    private interface Payload {
        void writeTo(Sink sink) throws IOException;
    }

    private record Entry(String name, DType dtype, Shape shape, Payload payload, int order) {
        long byteSize() { return Math.multiplyExact(shape.numel(), (long) dtype.bytes()); }
    }

    private final Map<String, String> metadata = new LinkedHashMap<>();
    private final Map<String, Entry> entries = new LinkedHashMap<>();

    /** Adds a metadata entry (both strings; the checksum key is reserved). Returns this. */
    public SafeTensorsWriter metadata(String key, String value) {
        if (key == null || value == null) throw new IllegalArgumentException("metadata key and value must not be null (key " + key + ")");
        if (key.equals(SafeTensors.CHECKSUM_KEY)) {
            throw new IllegalArgumentException("metadata key '" + key + "' is reserved for the data checksum the writer computes");
        }
        metadata.put(key, value);
        return this;
    }

    /** Adds all entries of {@code map} as metadata. Returns this. */
    public SafeTensorsWriter metadata(Map<String, String> map) {
        map.forEach(this::metadata);
        return this;
    }

    /**
     * Adds a backend tensor under {@code name}, with its own dtype and shape. Its values are copied to the
     * host ({@code toFloats/toInts/toDoubles}) only when the file is written; BF16 values are stored as their
     * exact bf16 bits. The tensor must stay open until {@link #write} returns.
     */
    public SafeTensorsWriter add(String name, Tensor t) {
        if (t == null) throw new IllegalArgumentException("tensor '" + name + "' is null");
        if (t.isClosed()) throw new IllegalArgumentException("tensor '" + name + "' was closed");
        return switch (t.dtype()) {
            case F32 -> addFloats(name, DType.F32, t.shape().dims(), t::toFloats);
            case BF16 -> addFloats(name, DType.BF16, t.shape().dims(), t::toFloats);
            case I32 -> addInts(name, t.shape().dims(), t::toInts);
            case F64 -> addDoubles(name, t.shape().dims(), t::toDoubles);
        };
    }

    /**
     * Adds float values as F32 or BF16 (BF16: rounded to nearest even; exact for values that are already
     * bf16). {@code values} is called once, while the file is written.
     */
    public SafeTensorsWriter addFloats(String name, DType dtype, int[] shape, Supplier<float[]> values) {
        if (dtype != DType.F32 && dtype != DType.BF16) {
            throw new IllegalArgumentException("tensor '" + name + "': addFloats writes F32 or BF16, got " + dtype);
        }
        Shape s = Shape.of(shape);
        return put(name, dtype, s, sink -> {
            float[] v = checkedLength(name, s, values.get());
            if (dtype == DType.F32) {
                sink.putFloats(v);
            } else {
                for (float x : v) sink.room(2).putShort(BFloat16.fromFloat(x));
            }
        });
    }

    /** Adds raw bf16 bit patterns as BF16, bit for bit. */
    public SafeTensorsWriter addBf16Bits(String name, int[] shape, Supplier<short[]> bits) {
        Shape s = Shape.of(shape);
        return put(name, DType.BF16, s, sink -> {
            short[] v = checkedLength(name, s, bits.get());
            for (short x : v) sink.room(2).putShort(x);
        });
    }

    /** Adds int values as I32. */
    public SafeTensorsWriter addInts(String name, int[] shape, Supplier<int[]> values) {
        Shape s = Shape.of(shape);
        return put(name, DType.I32, s, sink -> {
            int[] v = checkedLength(name, s, values.get());
            sink.putInts(v);
        });
    }

    /** Adds double values as F64. */
    public SafeTensorsWriter addDoubles(String name, int[] shape, Supplier<double[]> values) {
        Shape s = Shape.of(shape);
        return put(name, DType.F64, s, sink -> {
            double[] v = checkedLength(name, s, values.get());
            sink.putDoubles(v);
        });
    }

    private SafeTensorsWriter put(String name, DType dtype, Shape shape, Payload payload) {
        if (name == null || name.isEmpty()) throw new IllegalArgumentException("tensor name must be a non-empty string, got " + (name == null ? "null" : "\"\""));
        if (name.equals(SafeTensors.METADATA_KEY)) throw new IllegalArgumentException("tensor name '" + name + "' is reserved for the metadata");
        if (entries.containsKey(name)) throw new IllegalArgumentException("tensor '" + name + "' was already added");
        entries.put(name, new Entry(name, dtype, shape, payload, entries.size()));
        return this;
    }

    private static <A> A checkedLength(String name, Shape shape, A array) {
        if (array == null) throw new IllegalStateException("tensor '" + name + "': its value supplier returned null");
        int n = java.lang.reflect.Array.getLength(array);
        if (n != shape.numel()) {
            throw new IllegalStateException("tensor '" + name + "' has shape " + shape + " (" + shape.numel() + " elements) but its supplier gave " + n + " values");
        }
        return array;
    }

    /**
     * Writes the file atomically (see the class comment) and returns the hex SHA-256 of its data section.
     * On any failure the target is left as it was and the temporary file is removed.
     */
    public String write(Path target) throws IOException {
        Path abs = target.toAbsolutePath();
        Path dir = abs.getParent();
        Files.createDirectories(dir);
        List<Entry> layout = new ArrayList<>(entries.values());
        layout.sort(Comparator.comparingInt((Entry e) -> -e.dtype().bytes()).thenComparingInt(Entry::order));

        long[] begin = new long[layout.size()];
        long offset = 0;
        for (int i = 0; i < layout.size(); i++) {
            begin[i] = offset;
            offset = Math.addExact(offset, layout.get(i).byteSize());
        }
        long dataBytes = offset;

        // The checksum is known only after the data is written, and it sits in the header before the data:
        // reserve the header with a placeholder of the same length (64 hex digits), then rewrite it.
        byte[] placeholder = header(layout, begin, "0".repeat(64));
        Path tmp = Files.createTempFile(dir, "." + abs.getFileName() + ".", ".tmp");
        boolean done = false;
        try {
            String checksum;
            try (FileChannel ch = FileChannel.open(tmp, StandardOpenOption.WRITE, StandardOpenOption.TRUNCATE_EXISTING)) {
                MessageDigest sha = sha256();
                Sink sink = new Sink(ch, sha, 8L + placeholder.length);
                for (int i = 0; i < layout.size(); i++) {
                    Entry e = layout.get(i);
                    long before = sink.written();
                    try {
                        e.payload().writeTo(sink);
                    } catch (RuntimeException | IOException ex) {
                        throw new IOException("writing tensor '" + e.name() + "' to " + abs + " failed: " + ex.getMessage(), ex);
                    }
                    if (sink.written() - before != e.byteSize()) {
                        throw new IllegalStateException("tensor '" + e.name() + "' wrote " + (sink.written() - before) + " bytes, expected " + e.byteSize());
                    }
                }
                sink.flush();
                checksum = SafeTensors.hex(sha.digest());
                byte[] hdr = header(layout, begin, checksum);
                if (hdr.length != placeholder.length) throw new IllegalStateException("header length changed from " + placeholder.length + " to " + hdr.length);
                ByteBuffer head = ByteBuffer.allocate(8 + hdr.length).order(ByteOrder.LITTLE_ENDIAN);
                head.putLong(hdr.length).put(hdr).flip();
                long pos = 0;
                while (head.hasRemaining()) pos += ch.write(head, pos);
                if (ch.size() != 8L + hdr.length + dataBytes) throw new IllegalStateException("file has " + ch.size() + " bytes, expected " + (8L + hdr.length + dataBytes));
                ch.force(true);
            }
            try {
                Files.move(tmp, abs, StandardCopyOption.ATOMIC_MOVE, StandardCopyOption.REPLACE_EXISTING);
            } catch (AtomicMoveNotSupportedException ex) {
                throw new IOException("cannot write " + abs + " atomically: the file system does not support atomic rename", ex);
            }
            done = true;
            syncDirectory(dir);
            return checksum;
        } finally {
            if (!done) Files.deleteIfExists(tmp);
        }
    }

    /** The UTF-8 JSON header padded with spaces so that 8 + its length is a multiple of 8. */
    private byte[] header(List<Entry> layout, long[] begin, String checksum) {
        Map<String, Object> root = new LinkedHashMap<>();
        Map<String, String> meta = new LinkedHashMap<>(metadata);
        meta.put(SafeTensors.CHECKSUM_KEY, checksum);
        root.put(SafeTensors.METADATA_KEY, meta);
        for (int i = 0; i < layout.size(); i++) {
            Entry e = layout.get(i);
            Map<String, Object> info = new LinkedHashMap<>();
            info.put("dtype", SafeTensors.formatName(e.dtype()));
            info.put("shape", e.shape().dims());
            info.put("data_offsets", new long[] {begin[i], begin[i] + e.byteSize()});
            root.put(e.name(), info);
        }
        byte[] json;
        try {
            json = JSON.writeValueAsBytes(root);
        } catch (IOException ex) {
            throw new UncheckedIOException(ex);
        }
        int padded = (json.length + 7) / 8 * 8;
        byte[] out = new byte[padded];
        System.arraycopy(json, 0, out, 0, json.length);
        for (int i = json.length; i < padded; i++) out[i] = ' ';
        if (padded > SafeTensors.MAX_HEADER_BYTES) throw new IllegalStateException("header of " + padded + " bytes exceeds the cap " + SafeTensors.MAX_HEADER_BYTES);
        return out;
    }

    /** fsync the directory so the rename itself survives a power cut (a no-op where directories cannot be opened). */
    private static void syncDirectory(Path dir) {
        try (FileChannel d = FileChannel.open(dir, StandardOpenOption.READ)) {
            d.force(true);
        } catch (IOException | UnsupportedOperationException ignored) {
            // Some platforms cannot open a directory; the file itself was forced before the rename.
        }
    }

    static MessageDigest sha256() {
        try {
            return MessageDigest.getInstance("SHA-256");
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException("SHA-256 is not available in this JVM", e);
        }
    }

    /** Buffered little-endian writer to the channel at a running position, feeding the digest. */
    static final class Sink {
        private final FileChannel ch;
        private final MessageDigest sha;
        private final ByteBuffer buf = ByteBuffer.allocate(CHUNK_BYTES).order(ByteOrder.LITTLE_ENDIAN);
        private long pos;
        private long written;

        Sink(FileChannel ch, MessageDigest sha, long start) {
            this.ch = ch;
            this.sha = sha;
            this.pos = start;
        }

        /** The buffer, with room for at least {@code n} more bytes; the caller puts exactly n. */
        ByteBuffer room(int n) throws IOException {
            if (buf.remaining() < n) flush();
            written += n;
            return buf;
        }

        long written() { return written; }

        // Bulk puts through view buffers (which keep the little-endian order), a chunk at a time.
        void putFloats(float[] v) throws IOException {
            for (int off = 0; off < v.length; ) {
                int n = Math.min(v.length - off, room(4, v.length - off));
                buf.asFloatBuffer().put(v, off, n);
                advance(n, 4);
                off += n;
            }
        }

        void putInts(int[] v) throws IOException {
            for (int off = 0; off < v.length; ) {
                int n = Math.min(v.length - off, room(4, v.length - off));
                buf.asIntBuffer().put(v, off, n);
                advance(n, 4);
                off += n;
            }
        }

        void putDoubles(double[] v) throws IOException {
            for (int off = 0; off < v.length; ) {
                int n = Math.min(v.length - off, room(8, v.length - off));
                buf.asDoubleBuffer().put(v, off, n);
                advance(n, 8);
                off += n;
            }
        }

        /** Elements of {@code size} bytes that fit now (at least one), flushing first if none would. */
        private int room(int size, int wanted) throws IOException {
            if (buf.remaining() < size) flush();
            return Math.min(wanted, buf.remaining() / size);
        }

        private void advance(int n, int size) {
            buf.position(buf.position() + n * size);
            written += (long) n * size;
        }

        void flush() throws IOException {
            buf.flip();
            sha.update(buf.duplicate());
            while (buf.hasRemaining()) pos += ch.write(buf, pos);
            buf.clear();
        }
    }
}
