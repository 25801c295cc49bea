package dev.moe4j.core.io;

import com.fasterxml.jackson.core.JsonParser;
import com.fasterxml.jackson.core.JsonProcessingException;
import com.fasterxml.jackson.databind.DeserializationFeature;
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.BFloat16;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Shape;
import dev.moe4j.core.tensor.Tensor;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.MappedByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.security.MessageDigest;
import java.util.ArrayList;
import java.util.Collections;
import java.util.Comparator;
import java.util.Iterator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;

/**
 * A safetensors file opened for reading: the header is parsed and every structural rule is checked on
 * {@link #open}, then tensors are read on demand from memory-mapped windows of the file.
 *
 * <p>Checked on open (each failure is a {@link SafeTensorsFormatException} naming the file and the fault):
 * the file holds the 8-byte header length; that length is at most {@link SafeTensors#MAX_HEADER_BYTES} and
 * inside the file; the header is UTF-8 JSON, an object whose {@code __metadata__} maps strings to strings and
 * whose other entries each have a known dtype, a shape of non-negative dimensions and two data offsets; each
 * range's length equals shape product x dtype size; the ranges lie inside the data section, do not overlap
 * and cover it with no gap or trailing byte. If the metadata holds {@link SafeTensors#CHECKSUM_KEY}, the
 * SHA-256 of the data section must match it (files from other tools carry no checksum and are accepted).
 *
 * <p>Not thread-safe for {@link #close}; reads from several threads are fine.
 */
public final class SafeTensorsFile implements AutoCloseable {
    /** Mapped window size: a multiple of 8 so no element straddles two windows. */
    private static final long WINDOW = 1L << 30;
    private static final ObjectMapper JSON = new ObjectMapper()
            .enable(JsonParser.Feature.STRICT_DUPLICATE_DETECTION)
            .enable(DeserializationFeature.FAIL_ON_TRAILING_TOKENS);

    /** One tensor's entry: dtype, shape and byte range relative to the start of the data section. */
    public record TensorInfo(String name, DType dtype, Shape shape, long begin, long end) {
        public long byteSize() { return end - begin; }
    }

    private final Path path;
    private final FileChannel channel;
    private final long dataStart;
    private final long dataBytes;
    private final Map<String, String> metadata;
    private final Map<String, TensorInfo> tensors;   // in data-offset order

    private SafeTensorsFile(Path path, FileChannel channel, long dataStart, long dataBytes,
                            Map<String, String> metadata, Map<String, TensorInfo> tensors) {
        this.path = path;
        this.channel = channel;
        this.dataStart = dataStart;
        this.dataBytes = dataBytes;
        this.metadata = metadata;
        this.tensors = tensors;
    }

    /** Opens and validates {@code file}, verifying the data checksum when the file carries one. */
    public static SafeTensorsFile open(Path file) throws IOException {
        return open(file, true);
    }

    /**
     * Opens and validates {@code file}; with {@code verifyChecksum} false the (one full read) checksum pass
     * is skipped even when the file carries a checksum.
     */
    public static SafeTensorsFile open(Path file, boolean verifyChecksum) throws IOException {
        FileChannel ch;
        try {
            ch = FileChannel.open(file, StandardOpenOption.READ);
        } catch (NoSuchFileException e) {
            throw new NoSuchFileException(file.toString(), null, "safetensors file not found");
        }
        try {
            SafeTensorsFile f = parse(file, ch);
            if (verifyChecksum) f.verifyChecksum();
            return f;
        } catch (IOException | RuntimeException e) {
            ch.close();
            throw e;
        }
    }

    private static SafeTensorsFile parse(Path file, FileChannel ch) throws IOException {
        long size = ch.size();
        if (size < 8) throw new SafeTensorsFormatException(file, "file is " + size + " bytes, too short for the 8-byte header length");
        ByteBuffer lenBuf = ByteBuffer.allocate(8).order(ByteOrder.LITTLE_ENDIAN);
        readFully(ch, lenBuf, 0);
        long n = lenBuf.flip().getLong();   // unsigned: a negative long is > 2^63
        if (n < 0 || n > SafeTensors.MAX_HEADER_BYTES) {
            throw new SafeTensorsFormatException(file, "header length " + Long.toUnsignedString(n) + " exceeds the cap of " + SafeTensors.MAX_HEADER_BYTES + " bytes (corrupt or not a safetensors file)");
        }
        if (8 + n > size) {
            throw new SafeTensorsFormatException(file, "header length " + n + " runs past the end of the file (" + size + " bytes; truncated?)");
        }
        ByteBuffer hb = ByteBuffer.allocate((int) n);
        readFully(ch, hb, 8);
        String text;
        try {
            text = StandardCharsets.UTF_8.newDecoder()
                    .onMalformedInput(CodingErrorAction.REPORT).onUnmappableCharacter(CodingErrorAction.REPORT)
                    .decode(hb.flip()).toString();
        } catch (CharacterCodingException e) {
            throw new SafeTensorsFormatException(file, "header is not valid UTF-8", e);
        }
        JsonNode root;
        try {
            root = JSON.readTree(text);
        } catch (JsonProcessingException e) {
            throw new SafeTensorsFormatException(file, "header is not valid JSON: " + e.getOriginalMessage(), e);
        }
        if (root == null || !root.isObject()) throw new SafeTensorsFormatException(file, "header is not a JSON object");

        long dataStart = 8 + n;
        long dataBytes = size - dataStart;
        Map<String, String> meta = new LinkedHashMap<>();
        List<TensorInfo> infos = new ArrayList<>();
        for (Iterator<Map.Entry<String, JsonNode>> it = root.fields(); it.hasNext(); ) {
            Map.Entry<String, JsonNode> field = it.next();
            String name = field.getKey();
            JsonNode v = field.getValue();
            if (name.equals(SafeTensors.METADATA_KEY)) {
                if (!v.isObject()) throw new SafeTensorsFormatException(file, "__metadata__ must be an object of strings, got " + v.getNodeType());
                for (Iterator<Map.Entry<String, JsonNode>> m = v.fields(); m.hasNext(); ) {
                    Map.Entry<String, JsonNode> kv = m.next();
                    if (!kv.getValue().isTextual()) {
                        throw new SafeTensorsFormatException(file, "__metadata__ value of '" + kv.getKey() + "' must be a string, got " + kv.getValue().getNodeType());
                    }
                    meta.put(kv.getKey(), kv.getValue().asText());
                }
            } else {
                infos.add(tensorInfo(file, name, v, dataBytes));
            }
        }

        // The ranges, in offset order, must tile [0, dataBytes) exactly.
        infos.sort(Comparator.comparingLong(TensorInfo::begin).thenComparingLong(TensorInfo::end));
        long expect = 0;
        TensorInfo prev = null;
        for (TensorInfo t : infos) {
            if (t.begin() < expect) {
                throw new SafeTensorsFormatException(file, "data ranges of tensors '" + prev.name() + "' [" + prev.begin() + ", " + prev.end()
                        + ") and '" + t.name() + "' [" + t.begin() + ", " + t.end() + ") overlap");
            }
            if (t.begin() > expect) {
                throw new SafeTensorsFormatException(file, "bytes [" + expect + ", " + t.begin() + ") of the data section belong to no tensor (gap before '" + t.name() + "')");
            }
            expect = t.end();
            prev = t;
        }
        if (expect != dataBytes) {
            throw new SafeTensorsFormatException(file, "the data section has " + dataBytes + " bytes but the tensors cover " + expect + " (trailing bytes)");
        }
        Map<String, TensorInfo> byName = new LinkedHashMap<>();
        for (TensorInfo t : infos) byName.put(t.name(), t);
        return new SafeTensorsFile(file, ch, dataStart, dataBytes, Collections.unmodifiableMap(meta), Collections.unmodifiableMap(byName));
    }

    private static TensorInfo tensorInfo(Path file, String name, JsonNode v, long dataBytes) throws SafeTensorsFormatException {
        String where = "tensor '" + name + "'";
        if (!v.isObject()) throw new SafeTensorsFormatException(file, where + ": entry must be an object, got " + v.getNodeType());
        JsonNode dt = v.get("dtype"), sh = v.get("shape"), off = v.get("data_offsets");
        if (dt == null || !dt.isTextual()) throw new SafeTensorsFormatException(file, where + ": missing or non-string \"dtype\"");
        DType dtype = SafeTensors.parseDType(dt.asText());
        if (dtype == null) {
            throw new SafeTensorsFormatException(file, where + ": unknown or unsupported dtype \"" + dt.asText() + "\" (supported: F32, BF16, I32, F64)");
        }
        if (sh == null || !sh.isArray()) throw new SafeTensorsFormatException(file, where + ": missing or non-array \"shape\"");
        int[] dims = new int[sh.size()];
        long numel = 1;
        for (int i = 0; i < dims.length; i++) {
            JsonNode d = sh.get(i);
            if (!d.isIntegralNumber() || !d.canConvertToLong() || d.asLong() < 0) {
                throw new SafeTensorsFormatException(file, where + ": shape " + sh + " has an invalid dimension " + d);
            }
            if (d.asLong() > Integer.MAX_VALUE) throw new SafeTensorsFormatException(file, where + ": dimension " + d + " is larger than this library supports (" + Integer.MAX_VALUE + ")");
            dims[i] = d.asInt();
            try {
                numel = Math.multiplyExact(numel, (long) dims[i]);
            } catch (ArithmeticException e) {
                throw new SafeTensorsFormatException(file, where + ": shape " + sh + " overflows");
            }
        }
        if (off == null || !off.isArray() || off.size() != 2 || !off.get(0).isIntegralNumber() || !off.get(1).isIntegralNumber()
                || !off.get(0).canConvertToLong() || !off.get(1).canConvertToLong()) {
            throw new SafeTensorsFormatException(file, where + ": \"data_offsets\" must be [begin, end], got " + off);
        }
        long begin = off.get(0).asLong(), end = off.get(1).asLong();
        if (begin < 0 || end < begin) throw new SafeTensorsFormatException(file, where + ": data_offsets [" + begin + ", " + end + "] are not 0 <= begin <= end");
        if (end > dataBytes) {
            throw new SafeTensorsFormatException(file, where + ": data_offsets [" + begin + ", " + end + "] run past the end of the data section ("
                    + dataBytes + " bytes; truncated?)");
        }
        long need;
        try {
            need = Math.multiplyExact(numel, (long) dtype.bytes());
        } catch (ArithmeticException e) {
            throw new SafeTensorsFormatException(file, where + ": shape " + sh + " overflows");
        }
        if (end - begin != need) {
            throw new SafeTensorsFormatException(file, where + ": " + dtype + Shape.of(dims) + " needs " + need + " bytes but data_offsets [" + begin + ", " + end + "] hold " + (end - begin));
        }
        return new TensorInfo(name, dtype, Shape.of(dims), begin, end);
    }

    private static void readFully(FileChannel ch, ByteBuffer b, long pos) throws IOException {
        while (b.hasRemaining()) {
            int r = ch.read(b, pos);
            if (r < 0) throw new IOException("unexpected end of file at byte " + pos);
            pos += r;
        }
    }

    /** Recomputes the SHA-256 of the data section and compares it with the metadata's, if there is one. */
    public void verifyChecksum() throws IOException {
        String want = metadata.get(SafeTensors.CHECKSUM_KEY);
        if (want == null) return;
        MessageDigest sha = SafeTensorsWriter.sha256();
        forEachWindow(0, dataBytes, (buf, first) -> sha.update(buf));
        String got = SafeTensors.hex(sha.digest());
        if (!got.equalsIgnoreCase(want)) {
            throw new SafeTensorsFormatException(path, "checksum mismatch: the data section's SHA-256 is " + got + " but the metadata ("
                    + SafeTensors.CHECKSUM_KEY + ") says " + want + " (file corrupt or modified)");
        }
    }

    public Path path() { return path; }

    /** The string metadata (including the checksum entry when present), unmodifiable. */
    public Map<String, String> metadata() { return metadata; }

    /** One metadata value, or null. */
    public String metadata(String key) { return metadata.get(key); }

    /** True when the file carries the data checksum written by {@link SafeTensorsWriter}. */
    public boolean hasChecksum() { return metadata.containsKey(SafeTensors.CHECKSUM_KEY); }

    /** Every tensor, in data-offset order. */
    public List<TensorInfo> tensors() { return List.copyOf(tensors.values()); }

    /** Tensor names, in data-offset order. */
    public Set<String> names() { return tensors.keySet(); }

    public boolean contains(String name) { return tensors.containsKey(name); }

    /** The entry of {@code name}; throws naming the file if there is none. */
    public TensorInfo info(String name) {
        TensorInfo t = tensors.get(name);
        if (t == null) throw new IllegalArgumentException(path + ": no tensor named '" + name + "' (the file has " + tensors.size() + " tensors)");
        return t;
    }

    /** Values of a floating tensor (F32, BF16 or F64, the latter rounded to float). */
    public float[] readFloats(String name) throws IOException {
        return readFloats(name, 0, count(info(name)));
    }

    /** Elements [first, first + count) (row-major) of a floating tensor. */
    public float[] readFloats(String name, long first, int count) throws IOException {
        TensorInfo t = info(name);
        if (t.dtype() == DType.I32) throw wrongType(t, "readFloats", "a floating dtype");
        float[] out = new float[count];
        switch (t.dtype()) {
            case F32 -> forEachWindow(t, first, count, (b, at) -> b.asFloatBuffer().get(out, at, b.remaining() / 4));
            case BF16 -> forEachWindow(t, first, count, (b, at) -> {
                while (b.hasRemaining()) out[at++] = BFloat16.toFloat(b.getShort());
            });
            case F64 -> forEachWindow(t, first, count, (b, at) -> {
                while (b.hasRemaining()) out[at++] = (float) b.getDouble();
            });
            default -> throw new AssertionError();
        }
        return out;
    }

    /** Values of a floating tensor as doubles (exact for every floating dtype). */
    public double[] readDoubles(String name) throws IOException {
        return readDoubles(name, 0, count(info(name)));
    }

    /** Elements [first, first + count) of a floating tensor as doubles. */
    public double[] readDoubles(String name, long first, int count) throws IOException {
        TensorInfo t = info(name);
        if (t.dtype() == DType.I32) throw wrongType(t, "readDoubles", "a floating dtype");
        double[] out = new double[count];
        if (t.dtype() == DType.F64) {
            forEachWindow(t, first, count, (b, at) -> b.asDoubleBuffer().get(out, at, b.remaining() / 8));
        } else {
            float[] f = readFloats(name, first, count);
            for (int i = 0; i < count; i++) out[i] = f[i];
        }
        return out;
    }

    /** Values of an I32 tensor. */
    public int[] readInts(String name) throws IOException {
        return readInts(name, 0, count(info(name)));
    }

    /** Elements [first, first + count) of an I32 tensor. */
    public int[] readInts(String name, long first, int count) throws IOException {
        TensorInfo t = info(name);
        if (t.dtype() != DType.I32) throw wrongType(t, "readInts", "I32");
        int[] out = new int[count];
        forEachWindow(t, first, count, (b, at) -> b.asIntBuffer().get(out, at, b.remaining() / 4));
        return out;
    }

    /** The raw bit patterns of a BF16 tensor. */
    public short[] readBf16Bits(String name) throws IOException {
        TensorInfo t = info(name);
        if (t.dtype() != DType.BF16) throw wrongType(t, "readBf16Bits", "BF16");
        short[] out = new short[count(t)];
        forEachWindow(t, 0, out.length, (b, at) -> b.asShortBuffer().get(out, at, b.remaining() / 2));
        return out;
    }

    /** A new tensor on {@code backend} with the stored dtype, shape and values. */
    public Tensor load(String name, Backend backend) throws IOException {
        TensorInfo t = info(name);
        if (!backend.supports(t.dtype())) {
            throw new IllegalArgumentException(path + ": tensor '" + name + "' is " + t.dtype() + ", which backend " + backend.name() + " does not support");
        }
        int[] dims = t.shape().dims();
        return switch (t.dtype()) {
            case F32, BF16 -> backend.fromFloats(t.dtype(), readFloats(name), dims);
            case F64 -> backend.fromDoubles(DType.F64, readDoubles(name), dims);
            case I32 -> backend.fromInts(readInts(name), dims);
        };
    }

    /**
     * Copies tensor {@code name} into the existing {@code dst}, which must have the same dtype and shape
     * (a mismatch is an {@link IllegalArgumentException} naming the tensor and both types).
     */
    public void loadInto(String name, Tensor dst) throws IOException {
        TensorInfo t = info(name);
        if (dst == null || dst.isClosed()) throw new IllegalArgumentException("loadInto '" + name + "': destination tensor is " + (dst == null ? "null" : "closed"));
        if (t.dtype() != dst.dtype() || !t.shape().equals(dst.shape())) {
            throw new IllegalArgumentException(path + ": tensor '" + name + "' is " + t.dtype() + t.shape()
                    + " in the file but the destination is " + dst.dtype() + dst.shape());
        }
        try (Tensor host = load(name, dst.backend())) {
            dst.backend().copy(host, dst);
        }
    }

    /**
     * Copies rows [firstRow, firstRow + dst.dim(0)) of tensor {@code name} (split along its first dimension)
     * into {@code dst}: e.g. one rank's experts out of an [E, ...] expert bank saved whole. {@code dst} must
     * have the file's dtype and trailing dimensions.
     */
    public void loadRowsInto(String name, int firstRow, Tensor dst) throws IOException {
        TensorInfo t = info(name);
        if (dst == null || dst.isClosed()) throw new IllegalArgumentException("loadRowsInto '" + name + "': destination tensor is " + (dst == null ? "null" : "closed"));
        int[] fd = t.shape().dims(), dd = dst.shape().dims();
        boolean trailing = fd.length >= 1 && dd.length == fd.length
                && java.util.Arrays.equals(fd, 1, fd.length, dd, 1, dd.length);
        if (t.dtype() != dst.dtype() || !trailing) {
            throw new IllegalArgumentException(path + ": tensor '" + name + "' is " + t.dtype() + t.shape()
                    + " in the file; a row slice of it cannot fill the destination " + dst.dtype() + dst.shape());
        }
        if (firstRow < 0 || (long) firstRow + dd[0] > fd[0]) {
            throw new IllegalArgumentException(path + ": rows [" + firstRow + ", " + ((long) firstRow + dd[0]) + ") of tensor '" + name
                    + "' are outside its " + fd[0] + " rows");
        }
        long rowElems = fd[0] == 0 ? 0 : t.shape().numel() / fd[0];
        long first = firstRow * rowElems;
        int n = Math.toIntExact(dst.numel());
        Backend backend = dst.backend();
        try (Tensor host = switch (t.dtype()) {
            case F32, BF16 -> backend.fromFloats(t.dtype(), readFloats(name, first, n), dd);
            case F64 -> backend.fromDoubles(DType.F64, readDoubles(name, first, n), dd);
            case I32 -> backend.fromInts(readInts(name, first, n), dd);
        }) {
            backend.copy(host, dst);
        }
    }

    private static int count(TensorInfo t) {
        long n = t.shape().numel();
        if (n > Integer.MAX_VALUE - 8) throw new IllegalArgumentException("tensor '" + t.name() + "' has " + n + " elements, too many for one Java array");
        return (int) n;
    }

    private IllegalArgumentException wrongType(TensorInfo t, String op, String want) {
        return new IllegalArgumentException(path + ": " + op + "('" + t.name() + "') needs " + want + ", but the tensor is " + t.dtype() + t.shape());
    }

    @FunctionalInterface
    private interface WindowConsumer {
        /** {@code buf}: little-endian bytes of whole elements; {@code at}: index of its first element in the output. */
        void accept(ByteBuffer buf, int at) throws IOException;
    }

    /** Maps elements [first, first + count) of tensor t, window by window. */
    private void forEachWindow(TensorInfo t, long first, int count, WindowConsumer c) throws IOException {
        long numel = t.shape().numel();
        if (first < 0 || count < 0 || first + count > numel) {
            throw new IndexOutOfBoundsException(path + ": elements [" + first + ", " + (first + count) + ") of tensor '" + t.name()
                    + "' are outside its " + numel + " elements");
        }
        int size = t.dtype().bytes();
        forEachWindow(t.begin() + first * size, (long) count * size, (buf, byteOffset) -> c.accept(buf, (int) (byteOffset / size)));
    }

    @FunctionalInterface
    private interface ByteWindowConsumer {
        void accept(ByteBuffer buf, long byteOffset) throws IOException;
    }

    /** Maps [begin, begin+len) of the data section window by window (windows are multiples of 8 bytes). */
    private void forEachWindow(long begin, long len, ByteWindowConsumer c) throws IOException {
        if (!channel.isOpen()) throw new IllegalStateException(path + " was closed");
        for (long done = 0; done < len; done += WINDOW) {
            long n = Math.min(WINDOW, len - done);
            MappedByteBuffer m = channel.map(FileChannel.MapMode.READ_ONLY, dataStart + begin + done, n);
            m.order(ByteOrder.LITTLE_ENDIAN);
            c.accept(m, done);
        }
    }

    @Override
    public void close() throws IOException {
        channel.close();
    }

    @Override
    public String toString() {
        return "SafeTensorsFile(" + path + ", " + tensors.size() + " tensors, " + dataBytes + " data bytes)";
    }
}
