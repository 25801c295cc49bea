package dev.moe4j.core.data;

import com.fasterxml.jackson.databind.ObjectMapper;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.SplittableRandom;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

class TokenizerTest {
    @TempDir
    Path dir;

    /** Strings that cover ASCII, Latin-1, 3- and 4-byte UTF-8, combining marks and odd whitespace. */
    private static final List<String> SAMPLES = List.of(
            "", "a", "Hello world's  123!!", "don't we'll I'm they've you're it'd",
            "Ünïcödé ñ café — “quotes” ½ €100", "日本語のテキスト", "emoji 😀👍🏽 and 𝔘𝔫𝔦", "e\u0301 combining",
            "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n\nx", "\u00a0nbsp\u2003em space", "a\u0000b\u007f");

    @Test
    void byteTokenizerIsUtf8Bytes() {
        Tokenizer t = ByteTokenizer.INSTANCE;
        assertEquals(256, t.vocabSize());
        assertArrayEquals(new int[] {0x68, 0xC3, 0xA9}, t.encode("hé"));
        for (String s : SAMPLES) assertEquals(s, t.decode(t.encode(s)));
        var e = assertThrows(IllegalArgumentException.class, () -> t.decode(new int[] {65, 256}));
        assertTrue(e.getMessage().contains("token id 256 at position 1"), e.getMessage());
    }

    @Test
    void byteToUnicodeTableMatchesGpt2() {
        // GPT-2: printable bytes map to themselves, the rest to 256.. in order: 0x00 -> U+0100, space (0x20) -> U+0120 'Ġ',
        // 0x7F -> U+0121, 0xAD (soft hyphen) -> U+0143, newline -> 'Ċ' (U+010A).
        assertEquals('\u0100', Gpt2BpeTokenizer.byteChar(0));
        assertEquals('Ġ', Gpt2BpeTokenizer.byteChar(' '));
        assertEquals('Ċ', Gpt2BpeTokenizer.byteChar('\n'));
        assertEquals('\u0121', Gpt2BpeTokenizer.byteChar(0x7F));
        assertEquals('\u0143', Gpt2BpeTokenizer.byteChar(0xAD));
        assertEquals('A', Gpt2BpeTokenizer.byteChar('A'));
        assertEquals('é', Gpt2BpeTokenizer.byteChar(0xE9));
        java.util.Set<Character> seen = new java.util.HashSet<>();
        for (int b = 0; b < 256; b++) assertTrue(seen.add(Gpt2BpeTokenizer.byteChar(b)), "byte " + b + " has a unique char");
    }

    @Test
    void preTokenizerSplitsLikeGpt2() {
        assertEquals(List.of("Hello", " world", "'s", " ", " 123", "!!"), Gpt2BpeTokenizer.preTokenize("Hello world's  123!!"));
        // Whitespace before a non-space keeps its last character back: "\n\nx" -> "\n", "\n", "x"; "   y" -> "  ", " y".
        assertEquals(List.of("I", "'m", " ok", ".", "\n", "\n", "x", "  ", " y", "  "), Gpt2BpeTokenizer.preTokenize("I'm ok.\n\nx   y  "));
        assertEquals(List.of("a", "\u2003", " b"), Gpt2BpeTokenizer.preTokenize("a\u2003 b"));   // Unicode space is \s
    }

    @Test
    void mergesApplyByRankNotByPosition() throws IOException {
        // Rank 0: "e l", rank 1: "h e". In "hel" the better-ranked pair (e,l) wins although (h,e) comes first.
        Gpt2BpeTokenizer t = build(List.of("e l", "h e", "l l", "Ġ w", "o r", "Ġw or", "Ã ©"));
        assertArrayEquals(new int[] {'h', id(t, "el")}, t.encode("hel"));
        assertArrayEquals(new int[] {id(t, "he"), 'x'}, t.encode("hex"));
        // "lll": merge occurrences left to right without overlap -> [ll, l].
        assertArrayEquals(new int[] {id(t, "ll"), 'l'}, t.encode("lll"));
        // Chained merges: " wor" -> Ġ w o r -> Ġw o r -> Ġw or -> Ġwor.
        assertArrayEquals(new int[] {'a', id(t, "Ġwor"), 'd'}, t.encode("a word"));
        // A 2-byte character: é = C3 A9 -> 'Ã' '©' -> merged.
        assertArrayEquals(new int[] {id(t, "Ã©")}, t.encode("é"));
        // A character whose bytes are outside the printable range: ñ = C3 B1 -> 'Ã' '±' (no merge).
        assertArrayEquals(new int[] {0xC3, 0xB1}, t.encode("ñ"));
        // 😀 = F0 9F 98 80: 0x9F, 0x98, 0x80 map to chars >= 256, still one token per byte.
        assertArrayEquals(new int[] {0xF0, 0x9F, 0x98, 0x80}, t.encode("😀"));
        assertEquals(256 + 7, t.vocabSize());
    }

    @Test
    void roundTripOnSamplesAndRandomUnicode() throws IOException {
        Gpt2BpeTokenizer t = build(List.of("Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ã ©", "Ġ Ġ", "ĠĠ ĠĠ", "Ċ Ċ"));
        for (String s : SAMPLES) {
            int[] ids = t.encode(s);
            for (int id : ids) assertTrue(id >= 0 && id < t.vocabSize());
            assertEquals(s, t.decode(ids), "round trip of \"" + s + "\"");
        }
        assertArrayEquals(new int[] {id(t, "Ġthe")}, t.encode(" the"));
        assertArrayEquals(new int[] {id(t, "ĠĠĠĠ")}, t.encode("    "));
        assertArrayEquals(new int[] {id(t, "ĠĠ"), ' ', ' ', 'x'}, t.encode("    x"));   // pieces "   " and " x"
        SplittableRandom rnd = new SplittableRandom(3);
        int[] pool = {'a', 'e', 't', 'h', ' ', ' ', '\n', '\'', '9', 'é', 'ß', 0x4E2D, 0x1F600, 0x301, 0x2003, '!'};
        for (int trial = 0; trial < 200; trial++) {
            StringBuilder sb = new StringBuilder();
            int n = rnd.nextInt(30);
            for (int i = 0; i < n; i++) sb.appendCodePoint(pool[rnd.nextInt(pool.length)]);
            String s = sb.toString();
            assertEquals(s, t.decode(t.encode(s)), "round trip of \"" + s + "\"");
            assertEquals(s, t.decode(t.encode(s)), "cached second pass");
        }
    }

    @Test
    void decodeRejectsUnknownIdsAndReplacesBrokenUtf8() throws IOException {
        Gpt2BpeTokenizer t = build(List.of("h e"));
        var e = assertThrows(IllegalArgumentException.class, () -> t.decode(new int[] {1, 9999}));
        assertTrue(e.getMessage().contains("token id 9999 at position 1"), e.getMessage());
        assertEquals("\uFFFD", t.decode(new int[] {0xC3}));   // half of a 2-byte character
    }

    @Test
    void missingOrMalformedFilesGiveClearErrors() throws IOException {
        build(List.of("h e"));
        Path vocab = dir.resolve("vocab.json"), merges = dir.resolve("merges.txt");
        var nf = assertThrows(NoSuchFileException.class, () -> Gpt2BpeTokenizer.load(dir.resolve("nope.json"), merges));
        assertTrue(nf.getMessage().contains("nope.json"), nf.getMessage());

        Files.writeString(merges, "#version: 0.2\nh e\nhe\n");
        assertLoadError(vocab, merges, "merges.txt line 3: expected two tokens separated by one space, got \"he\"");
        Files.writeString(merges, "h e\nq z\n".replace("q", "\u4e2d"));
        assertLoadError(vocab, merges, "line 2: token '\u4e2d' of merge");
        Files.writeString(merges, "h e\nh e\n");
        assertLoadError(vocab, merges, "line 2: merge \"h e\" appears twice");

        Path bad = dir.resolve("bad.json");
        Files.writeString(bad, "{\"a\": 1,");
        assertLoadError(bad, merges, "vocabulary is not valid JSON");
        Files.writeString(bad, "{\"a\": -1}");
        assertLoadError(bad, merges, "id of token 'a' must be a non-negative integer");
        Files.writeString(bad, "{\"a\": 0, \"b\": 1}");
        assertLoadError(bad, merges, "no token for byte 0x0");
        Files.writeString(bad, "{\"a\": 0, \"b\": 0}");
        assertLoadError(bad, merges, "share id 0");
    }

    private static void assertLoadError(Path vocab, Path merges, String expected) {
        var e = assertThrows(IOException.class, () -> Gpt2BpeTokenizer.load(vocab, merges));
        assertTrue(e.getMessage().contains(expected), "expected '" + expected + "' in: " + e.getMessage());
    }

    /** Vocabulary: the 256 byte tokens with id = byte value, then one token per merge in order. */
    private Gpt2BpeTokenizer build(List<String> merges) throws IOException {
        Map<String, Integer> vocab = new LinkedHashMap<>();
        for (int b = 0; b < 256; b++) vocab.put(String.valueOf(Gpt2BpeTokenizer.byteChar(b)), b);
        for (String m : merges) vocab.put(m.replace(" ", ""), vocab.size());
        Files.writeString(dir.resolve("vocab.json"), new ObjectMapper().writeValueAsString(vocab), StandardCharsets.UTF_8);
        Files.writeString(dir.resolve("merges.txt"), "#version: 0.2\n" + String.join("\n", merges) + "\n", StandardCharsets.UTF_8);
        return Gpt2BpeTokenizer.fromDirectory(dir);
    }

    private static int id(Gpt2BpeTokenizer t, String token) {
        int id = t.tokenId(token);
        assertTrue(id >= 0, "token " + token + " in vocab");
        return id;
    }
}
