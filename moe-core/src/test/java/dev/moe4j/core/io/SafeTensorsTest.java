package dev.moe4j.core.io;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.cpu.CpuBackend;
import dev.moe4j.core.tensor.BFloat16;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Shape;
import dev.moe4j.core.tensor.Tensor;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.util.HexFormat;
import java.util.List;
import java.util.SplittableRandom;
import java.util.stream.Stream;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

class SafeTensorsTest {
    private final Backend cpu = new CpuBackend();

    @TempDir
    Path dir;

    // ------------------------------------------------------------------ round trips

    @Test
    void everyDtypeRoundTripsExactlyThroughBackendTensors() throws IOException {
        SplittableRandom rnd = new SplittableRandom(42);
        float[] f32 = new float[3 * 5 * 7];
        for (int i = 0; i < f32.length; i++) f32[i] = (float) (rnd.nextGaussian() * Math.exp(rnd.nextDouble(-20, 20)));
        f32[0] = -0.0f; f32[1] = Float.MIN_VALUE; f32[2] = Float.MAX_VALUE; f32[3] = Float.NEGATIVE_INFINITY;
        float[] bf = new float[4 * 9];
        for (int i = 0; i < bf.length; i++) bf[i] = BFloat16.round((float) rnd.nextGaussian());
        int[] i32 = new int[11];
        for (int i = 0; i < i32.length; i++) i32[i] = rnd.nextInt();
        i32[0] = Integer.MIN_VALUE; i32[1] = Integer.MAX_VALUE;
        double[] f64 = new double[2 * 3];
        for (int i = 0; i < f64.length; i++) f64[i] = rnd.nextGaussian() * 1e-300 + (i == 0 ? Math.PI : 0);

        Path file = dir.resolve("m.safetensors");
        try (Tensor a = cpu.fromFloats(DType.F32, f32, 3, 5, 7);
             Tensor b = cpu.fromFloats(DType.BF16, bf, 4, 9);
             Tensor c = cpu.fromInts(i32, 11);
             Tensor d = cpu.fromDoubles(DType.F64, f64, 2, 3);
             Tensor s = cpu.fromFloats(DType.F32, new float[] {2.5f});        // rank 0
             Tensor z = cpu.zeros(DType.BF16, 0, 3)) {                       // zero elements
            String sum = new SafeTensorsWriter()
                    .metadata("step", "1200").metadata("note", "ünï©ødé \"quoted\"")
                    .add("layer.0.w", a).add("bf", b).add("ids", c).add("f64", d).add("scalar", s).add("empty", z)
                    .write(file);
            assertEquals(64, sum.length());
        }

        try (SafeTensorsFile f = SafeTensorsFile.open(file)) {
            assertTrue(f.hasChecksum());
            assertEquals("1200", f.metadata("step"));
            assertEquals("ünï©ødé \"quoted\"", f.metadata("note"));
            assertEquals(Shape.of(3, 5, 7), f.info("layer.0.w").shape());
            assertEquals(DType.BF16, f.info("bf").dtype());
            assertEquals(Shape.of(), f.info("scalar").shape());
            assertEquals(6, f.names().size());

            assertBitsEqual(f32, f.readFloats("layer.0.w"));
            assertBitsEqual(bf, f.readFloats("bf"));
            assertArrayEquals(i32, f.readInts("ids"));
            assertArrayEquals(f64, f.readDoubles("f64"));
            assertArrayEquals(new float[] {2.5f}, f.readFloats("scalar"));
            assertEquals(0, f.readFloats("empty").length);

            try (Tensor a = f.load("layer.0.w", cpu); Tensor c = f.load("ids", cpu); Tensor d = f.load("f64", cpu)) {
                assertEquals(DType.F32, a.dtype());
                assertEquals(Shape.of(3, 5, 7), a.shape());
                assertBitsEqual(f32, a.toFloats());
                assertArrayEquals(i32, c.toInts());
                assertArrayEquals(f64, d.toDoubles());
            }
            try (Tensor b = cpu.zeros(DType.BF16, 4, 9)) {
                f.loadInto("bf", b);
                assertBitsEqual(bf, b.toFloats());
            }
        }
    }

    @Test
    void bf16BitsRoundTripExactlyIncludingNaNsAndInfinities() throws IOException {
        SplittableRandom rnd = new SplittableRandom(7);
        short[] bits = new short[1000];
        for (int i = 0; i < bits.length; i++) bits[i] = (short) rnd.nextInt(1 << 16);
        bits[0] = (short) 0x7fc1; bits[1] = (short) 0xff80; bits[2] = (short) 0x8000;
        Path file = dir.resolve("bits.safetensors");
        new SafeTensorsWriter().addBf16Bits("b", new int[] {10, 100}, () -> bits).write(file);
        try (SafeTensorsFile f = SafeTensorsFile.open(file)) {
            assertArrayEquals(bits, f.readBf16Bits("b"));
        }
    }

    @Test
    void writtenFileFollowsTheFormatByteForByte() throws IOException {
        // Parse our own output with nothing but the spec: proves other readers (PyTorch/HF) see the same.
        float[] w = {1.5f, -2f, 3.25f};
        int[] ids = {7, -1};
        Path file = dir.resolve("spec.safetensors");
        new SafeTensorsWriter().metadata("format", "pt")
                .addInts("ids", new int[] {2}, () -> ids)
                .addBf16Bits("h", new int[] {1}, () -> new short[] {(short) 0x3f80})
                .addFloats("w", DType.F32, new int[] {3, 1}, () -> w)
                .write(file);
        byte[] all = Files.readAllBytes(file);
        ByteBuffer bb = ByteBuffer.wrap(all).order(ByteOrder.LITTLE_ENDIAN);
        long n = bb.getLong(0);
        assertEquals(0, (8 + n) % 8, "header padded to 8");
        String header = new String(all, 8, (int) n, StandardCharsets.UTF_8);
        assertEquals(header.strip(), header.substring(0, header.strip().length()), "padding is trailing spaces");
        JsonNode root = new ObjectMapper().readTree(header);
        assertEquals("pt", root.get("__metadata__").get("format").asText());
        int data = 8 + (int) n;
        assertEquals(all.length - data, 3 * 4 + 2 * 4 + 2);

        JsonNode wi = root.get("w");
        assertEquals("F32", wi.get("dtype").asText());
        assertEquals("[3,1]", wi.get("shape").toString());
        int wb = wi.get("data_offsets").get(0).asInt();
        assertEquals(wb + 12, wi.get("data_offsets").get(1).asInt());
        for (int i = 0; i < 3; i++) assertEquals(w[i], bb.getFloat(data + wb + 4 * i));
        JsonNode ii = root.get("ids");
        assertEquals("I32", ii.get("dtype").asText());
        int ib = ii.get("data_offsets").get(0).asInt();
        assertEquals(7, bb.getInt(data + ib));
        assertEquals(-1, bb.getInt(data + ib + 4));
        JsonNode hi = root.get("h");
        assertEquals("BF16", hi.get("dtype").asText());
        assertEquals((short) 0x3f80, bb.getShort(data + hi.get("data_offsets").get(0).asInt()));

        String sha = HexFormat.of().formatHex(sha256(all, data, all.length - data));
        assertEquals(sha, root.get("__metadata__").get(SafeTensors.CHECKSUM_KEY).asText());
    }

    @Test
    void readsAHandBuiltFileWrittenPerTheSpec() throws IOException {
        // The layout a PyTorch/HF writer produces, built by hand: entries not in offset order, no checksum.
        String header = "{\"b\":{\"dtype\":\"BF16\",\"shape\":[1,2],\"data_offsets\":[20,24]},"
                + "\"__metadata__\":{\"format\":\"pt\"},"
                + "\"a\":{\"dtype\":\"F64\",\"shape\":[],\"data_offsets\":[0,8]},"
                + "\"c\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},"
                + "\"d\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[16,20]}}";
        byte[] data = {
                0, 0, 0, 0, 0, 0, (byte) 0xD0, 0x3F,        // a: F64 0.25
                0, 0, (byte) 0xC0, 0x3F, 0, 0, 0, (byte) 0xC0,  // c: F32 1.5, -2.0
                (byte) 0xF9, (byte) 0xFF, (byte) 0xFF, (byte) 0xFF, // d: I32 -7
                (byte) 0x80, 0x3F, 0x00, (byte) 0xBF,        // b: BF16 1.0, -0.5
        };
        Path file = handBuilt("hand.safetensors", header, data);
        try (SafeTensorsFile f = SafeTensorsFile.open(file)) {
            assertFalse(f.hasChecksum());
            assertEquals("pt", f.metadata("format"));
            assertEquals(List.of("a", "c", "d", "b"), List.copyOf(f.names()));
            assertArrayEquals(new double[] {0.25}, f.readDoubles("a"));
            assertArrayEquals(new float[] {1.5f, -2f}, f.readFloats("c"));
            assertArrayEquals(new int[] {-7}, f.readInts("d"));
            assertArrayEquals(new short[] {(short) 0x3F80, (short) 0xBF00}, f.readBf16Bits("b"));
            try (Tensor b = f.load("b", cpu)) {
                assertEquals(Shape.of(1, 2), b.shape());
                assertArrayEquals(new float[] {1f, -0.5f}, b.toFloats());
            }
        }
    }

    @Test
    void rowSlicesLoadIntoSmallerTensors() throws IOException {
        // An expert bank [E=4, 3, 2] saved whole, read back two experts at a time (re-sharding to another EP degree).
        float[] bank = new float[4 * 3 * 2];
        for (int i = 0; i < bank.length; i++) bank[i] = BFloat16.round(i * 0.37f - 3);
        int[] ids = new int[4 * 5];
        for (int i = 0; i < ids.length; i++) ids[i] = i * 31 - 7;
        Path file = dir.resolve("bank.safetensors");
        new SafeTensorsWriter()
                .addFloats("experts.w", DType.BF16, new int[] {4, 3, 2}, () -> bank)
                .addInts("experts.ids", new int[] {4, 5}, () -> ids)
                .write(file);
        try (SafeTensorsFile f = SafeTensorsFile.open(file);
             Tensor half = cpu.zeros(DType.BF16, 2, 3, 2);
             Tensor idRows = cpu.zeros(DType.I32, 3, 5)) {
            for (int first : new int[] {0, 1, 2}) {
                f.loadRowsInto("experts.w", first, half);
                assertArrayEquals(java.util.Arrays.copyOfRange(bank, first * 6, first * 6 + 12), half.toFloats(), "rows from " + first);
            }
            f.loadRowsInto("experts.ids", 1, idRows);
            assertArrayEquals(java.util.Arrays.copyOfRange(ids, 5, 20), idRows.toInts());
            assertArrayEquals(java.util.Arrays.copyOfRange(bank, 7, 10), f.readFloats("experts.w", 7, 3));

            var e = assertThrows(IllegalArgumentException.class, () -> f.loadRowsInto("experts.w", 3, half));
            assertTrue(e.getMessage().contains("rows [3, 5) of tensor 'experts.w' are outside its 4 rows"), e.getMessage());
            try (Tensor wrong = cpu.zeros(DType.BF16, 2, 2, 3)) {
                e = assertThrows(IllegalArgumentException.class, () -> f.loadRowsInto("experts.w", 0, wrong));
                assertTrue(e.getMessage().contains("BF16[4, 3, 2] in the file; a row slice of it cannot fill the destination BF16[2, 2, 3]"), e.getMessage());
            }
            assertThrows(IndexOutOfBoundsException.class, () -> f.readFloats("experts.w", 20, 5));
        }
    }

    // ------------------------------------------------------------------ corruption

    @Test
    void truncatedFileIsRejected() throws IOException {
        Path file = sample("t.safetensors");
        byte[] all = Files.readAllBytes(file);
        Files.write(file, java.util.Arrays.copyOf(all, all.length - 3));
        assertFormatError(file, "past the end of the data section");
        Files.write(file, java.util.Arrays.copyOf(all, 20));
        assertFormatError(file, "runs past the end of the file");
        Files.write(file, java.util.Arrays.copyOf(all, 5));
        assertFormatError(file, "too short for the 8-byte header length");
    }

    @Test
    void headerLengthTooLargeIsRejected() throws IOException {
        Path file = sample("h.safetensors");
        byte[] all = Files.readAllBytes(file);
        ByteBuffer.wrap(all).order(ByteOrder.LITTLE_ENDIAN).putLong(0, 1L << 40);
        Files.write(file, all);
        assertFormatError(file, "exceeds the cap");
        ByteBuffer.wrap(all).order(ByteOrder.LITTLE_ENDIAN).putLong(0, -8);   // 2^64 - 8 unsigned
        Files.write(file, all);
        assertFormatError(file, "18446744073709551608 exceeds the cap");
    }

    @Test
    void overlappingGappedAndOutOfRangeOffsetsAreRejected() throws IOException {
        byte[] data = new byte[16];
        assertFormatError(handBuilt("o.safetensors", "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                + "\"y\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]},"
                + "\"z\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[12,16]}}", data), "'x' [0, 8) and 'y' [4, 12) overlap");
        assertFormatError(handBuilt("p.safetensors", "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                + "\"y\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[8,20]}}", data), "'y': data_offsets [8, 20] run past the end");
        assertFormatError(handBuilt("g.safetensors", "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                + "\"y\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[12,16]}}", data), "bytes [8, 12) of the data section belong to no tensor");
        assertFormatError(handBuilt("r.safetensors", "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", data),
                "has 16 bytes but the tensors cover 8");
        assertFormatError(handBuilt("n.safetensors", "{\"x\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,0]}}", data),
                "are not 0 <= begin <= end");
    }

    @Test
    void unknownDtypeAndLengthMismatchAndBadJsonAreRejected() throws IOException {
        byte[] data = new byte[8];
        assertFormatError(handBuilt("u.safetensors", "{\"x\":{\"dtype\":\"Q7\",\"shape\":[2],\"data_offsets\":[0,8]}}", data),
                "tensor 'x': unknown or unsupported dtype \"Q7\"");
        assertFormatError(handBuilt("l.safetensors", "{\"x\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", data),
                "F32[3] needs 12 bytes but data_offsets [0, 8] hold 8");
        assertFormatError(handBuilt("j.safetensors", "{\"x\":{\"dtype\":\"F32\",", data), "header is not valid JSON");
        assertFormatError(handBuilt("a.safetensors", "[1, 2]", data), "header is not a JSON object");
        assertFormatError(handBuilt("m.safetensors", "{\"__metadata__\":{\"k\":3},\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", data),
                "__metadata__ value of 'k' must be a string");
        assertFormatError(handBuilt("d.safetensors", "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                + "\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", data), "Duplicate field 'x'");
        assertFormatError(handBuilt("s.safetensors", "{\"x\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", data),
                "invalid dimension -2");
    }

    @Test
    void wrongChecksumIsRejectedAndCanBeSkippedExplicitly() throws IOException {
        Path file = sample("c.safetensors");
        byte[] all = Files.readAllBytes(file);
        all[all.length - 1] ^= 1;   // flip one bit of the last tensor's data
        Files.write(file, all);
        assertFormatError(file, "checksum mismatch");
        try (SafeTensorsFile f = SafeTensorsFile.open(file, false)) {
            assertEquals(2, f.names().size());
            assertThrows(SafeTensorsFormatException.class, f::verifyChecksum);
        }
    }

    @Test
    void shapeOrDtypeMismatchOnLoadNamesTheTensorAndBothTypes() throws IOException {
        Path file = sample("s.safetensors");
        try (SafeTensorsFile f = SafeTensorsFile.open(file);
             Tensor wrongShape = cpu.zeros(DType.F32, 3, 2);
             Tensor wrongType = cpu.zeros(DType.BF16, 2, 3)) {
            var e = assertThrows(IllegalArgumentException.class, () -> f.loadInto("w", wrongShape));
            assertTrue(e.getMessage().contains("tensor 'w' is F32[2, 3] in the file but the destination is F32[3, 2]"), e.getMessage());
            e = assertThrows(IllegalArgumentException.class, () -> f.loadInto("w", wrongType));
            assertTrue(e.getMessage().contains("destination is BF16[2, 3]"), e.getMessage());
            e = assertThrows(IllegalArgumentException.class, () -> f.load("nope", cpu));
            assertTrue(e.getMessage().contains("no tensor named 'nope'"), e.getMessage());
            e = assertThrows(IllegalArgumentException.class, () -> f.readInts("w"));
            assertTrue(e.getMessage().contains("needs I32"), e.getMessage());
        }
        var e = assertThrows(NoSuchFileException.class, () -> SafeTensorsFile.open(dir.resolve("missing.safetensors")));
        assertTrue(e.getMessage().contains("missing.safetensors"));
    }

    // ------------------------------------------------------------------ atomicity

    @Test
    void failureMidWriteLeavesThePreviousFileIntactAndNoTempFiles() throws IOException {
        Path file = sample("ckpt.safetensors");
        byte[] before = Files.readAllBytes(file);
        float[] big = new float[1 << 19];   // > 1 MiB, so the first tensor reaches the disk before the failure
        var e = assertThrows(IOException.class, () -> new SafeTensorsWriter()
                .addFloats("first", DType.F32, new int[] {big.length}, () -> big)
                .addFloats("second", DType.F32, new int[] {4}, () -> { throw new IllegalStateException("simulated crash"); })
                .write(file));
        assertTrue(e.getMessage().contains("writing tensor 'second'") && e.getMessage().contains("simulated crash"), e.getMessage());
        assertArrayEquals(before, Files.readAllBytes(file));
        try (Stream<Path> s = Files.list(dir)) {
            assertEquals(List.of(file.getFileName()), s.map(Path::getFileName).toList());
        }
        // A supplier giving the wrong number of values is caught the same way.
        assertThrows(IOException.class, () -> new SafeTensorsWriter()
                .addInts("x", new int[] {3}, () -> new int[2]).write(file));
        assertArrayEquals(before, Files.readAllBytes(file));
        // And a good write replaces it.
        new SafeTensorsWriter().addInts("x", new int[] {1}, () -> new int[] {5}).write(file);
        try (SafeTensorsFile f = SafeTensorsFile.open(file)) {
            assertArrayEquals(new int[] {5}, f.readInts("x"));
        }
    }

    @Test
    void writerRejectsBadArgumentsBeforeWriting() {
        SafeTensorsWriter w = new SafeTensorsWriter().addInts("x", new int[] {1}, () -> new int[] {1});
        assertThrows(IllegalArgumentException.class, () -> w.addInts("x", new int[] {1}, () -> new int[] {1}));
        assertThrows(IllegalArgumentException.class, () -> w.addInts("__metadata__", new int[] {1}, () -> new int[] {1}));
        assertThrows(IllegalArgumentException.class, () -> w.metadata(SafeTensors.CHECKSUM_KEY, "x"));
        assertThrows(IllegalArgumentException.class, () -> w.addFloats("y", DType.I32, new int[] {1}, () -> new float[1]));
        Tensor closed = cpu.zeros(DType.F32, 2);
        closed.close();
        assertThrows(IllegalArgumentException.class, () -> w.add("z", closed));
    }

    // ------------------------------------------------------------------ helpers

    /** A valid file with w: F32[2, 3] and b: BF16[4]. */
    private Path sample(String name) throws IOException {
        Path file = dir.resolve(name);
        new SafeTensorsWriter()
                .addFloats("w", DType.F32, new int[] {2, 3}, () -> new float[] {1, 2, 3, 4, 5, 6})
                .addFloats("b", DType.BF16, new int[] {4}, () -> new float[] {0.5f, -1, 2, 8})
                .write(file);
        return file;
    }

    /** A file from a header string (padded with spaces to 8) and raw data bytes. */
    private Path handBuilt(String name, String header, byte[] data) throws IOException {
        byte[] h = header.getBytes(StandardCharsets.UTF_8);
        int n = (h.length + 7) / 8 * 8;
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        out.writeBytes(ByteBuffer.allocate(8).order(ByteOrder.LITTLE_ENDIAN).putLong(n).array());
        out.writeBytes(h);
        for (int i = h.length; i < n; i++) out.write(' ');
        out.writeBytes(data);
        Path file = dir.resolve(name);
        Files.write(file, out.toByteArray());
        return file;
    }

    private static void assertFormatError(Path file, String expected) {
        var e = assertThrows(SafeTensorsFormatException.class, () -> SafeTensorsFile.open(file).close());
        assertTrue(e.getMessage().startsWith(file.toString()), "names the file: " + e.getMessage());
        assertTrue(e.getMessage().contains(expected), "expected '" + expected + "' in: " + e.getMessage());
    }

    private static void assertBitsEqual(float[] want, float[] got) {
        assertEquals(want.length, got.length);
        for (int i = 0; i < want.length; i++) {
            assertEquals(Float.floatToRawIntBits(want[i]), Float.floatToRawIntBits(got[i]), "element " + i + ": " + want[i] + " vs " + got[i]);
        }
    }

    private static byte[] sha256(byte[] a, int off, int len) {
        try {
            MessageDigest md = MessageDigest.getInstance("SHA-256");
            md.update(a, off, len);
            return md.digest();
        } catch (Exception e) {
            throw new AssertionError(e);
        }
    }
}
