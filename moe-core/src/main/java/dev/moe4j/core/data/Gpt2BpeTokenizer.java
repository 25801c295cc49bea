package dev.moe4j.core.data;

import com.fasterxml.jackson.core.JsonParser;
import com.fasterxml.jackson.core.JsonProcessingException;
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.nio.charset.MalformedInputException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * GPT-2's byte-level BPE, loaded from a {@code vocab.json} (token string -> id) and a {@code merges.txt}
 * (one merge "left right" per line, best first, optional "#version" first line), as Hugging Face and
 * OpenAI ship them.
 *
 * <p>Encoding: the text is split by GPT-2's pre-tokenizer regex (contractions, letters, digits, other
 * symbols, each optionally led by one space; runs of whitespace); each piece's UTF-8 bytes are mapped to
 * printable characters by GPT-2's byte-to-unicode table; then, repeatedly, the adjacent pair with the best
 * (lowest) merge rank is merged everywhere in the piece, until no pair has a rank. Pieces are cached.
 * Special tokens such as {@code <|endoftext|>} are not recognized in input text: they encode as plain text.
 */
public final class Gpt2BpeTokenizer implements Tokenizer {
    /**
     * GPT-2's pre-tokenizer. UNICODE_CHARACTER_CLASS makes \s match Unicode whitespace, as Python's
     * {@code regex} module (which GPT-2 uses) does.
     */
    static final Pattern PRETOKENIZE = Pattern.compile(
            "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
            Pattern.UNICODE_CHARACTER_CLASS);

    private static final int CACHE_LIMIT = 1 << 16;

    /** BYTE_TO_CHAR[b]: the printable character standing for byte b. */
    private static final char[] BYTE_TO_CHAR = new char[256];
    private static final Map<Character, Integer> CHAR_TO_BYTE = new HashMap<>();

    static {
        // Printable bytes stand for themselves; the other 68 get code points 256, 257, ... in byte order.
        int next = 0;
        for (int b = 0; b < 256; b++) {
            boolean printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            BYTE_TO_CHAR[b] = (char) (printable ? b : 256 + next++);
            CHAR_TO_BYTE.put(BYTE_TO_CHAR[b], b);
        }
    }

    private final Map<String, Integer> vocab;
    private final String[] idToToken;
    private final Map<String, Integer> mergeRank;   // key: left + ' ' + right (byte-level tokens hold no space)
    private final Map<String, int[]> cache = new ConcurrentHashMap<>();

    private Gpt2BpeTokenizer(Map<String, Integer> vocab, String[] idToToken, Map<String, Integer> mergeRank) {
        this.vocab = vocab;
        this.idToToken = idToToken;
        this.mergeRank = mergeRank;
    }

    /** Loads {@code vocab.json} and {@code merges.txt} from {@code dir}. */
    public static Gpt2BpeTokenizer fromDirectory(Path dir) throws IOException {
        return load(dir.resolve("vocab.json"), dir.resolve("merges.txt"));
    }

    /**
     * Loads a vocabulary and its merges. Every failure (missing file, bad JSON, a malformed merge line, a
     * merge whose parts or result are not in the vocabulary, a byte with no token) is an {@link IOException}
     * naming the file and, for merges, the line.
     */
    public static Gpt2BpeTokenizer load(Path vocabJson, Path mergesTxt) throws IOException {
        Map<String, Integer> vocab = readVocab(vocabJson);
        int size = 0;
        for (int id : vocab.values()) size = Math.max(size, id + 1);
        String[] idToToken = new String[size];
        for (Map.Entry<String, Integer> e : vocab.entrySet()) {
            String other = idToToken[e.getValue()];
            if (other != null) {
                throw new IOException(vocabJson + ": tokens '" + other + "' and '" + e.getKey() + "' share id " + e.getValue());
            }
            idToToken[e.getValue()] = e.getKey();
        }
        for (int b = 0; b < 256; b++) {
            if (!vocab.containsKey(String.valueOf(BYTE_TO_CHAR[b]))) {
                throw new IOException(vocabJson + ": no token for byte 0x" + Integer.toHexString(b) + " ('" + BYTE_TO_CHAR[b]
                        + "'); a byte-level vocabulary needs all 256");
            }
        }
        return new Gpt2BpeTokenizer(vocab, idToToken, readMerges(mergesTxt, vocab));
    }

    private static Map<String, Integer> readVocab(Path file) throws IOException {
        String text = readText(file, "vocabulary (vocab.json)");
        JsonNode root;
        try {
            root = new ObjectMapper().enable(JsonParser.Feature.STRICT_DUPLICATE_DETECTION).readTree(text);
        } catch (JsonProcessingException e) {
            throw new IOException(file + ": vocabulary is not valid JSON: " + e.getOriginalMessage(), e);
        }
        if (root == null || !root.isObject() || root.isEmpty()) {
            throw new IOException(file + ": vocabulary must be a non-empty JSON object of token -> id");
        }
        Map<String, Integer> vocab = new HashMap<>();
        for (Iterator<Map.Entry<String, JsonNode>> it = root.fields(); it.hasNext(); ) {
            Map.Entry<String, JsonNode> e = it.next();
            JsonNode v = e.getValue();
            if (!v.isInt() || v.asInt() < 0) {
                throw new IOException(file + ": id of token '" + e.getKey() + "' must be a non-negative integer, got " + v);
            }
            vocab.put(e.getKey(), v.asInt());
        }
        return vocab;
    }

    private static Map<String, Integer> readMerges(Path file, Map<String, Integer> vocab) throws IOException {
        String text = readText(file, "merges (merges.txt)");
        String[] lines = text.split("\r?\n", -1);
        Map<String, Integer> rank = new HashMap<>();
        for (int i = 0; i < lines.length; i++) {
            String line = lines[i];
            if (line.isEmpty() || (i == 0 && line.startsWith("#version"))) continue;
            String where = file + " line " + (i + 1);
            int sp = line.indexOf(' ');
            if (sp <= 0 || sp == line.length() - 1 || line.indexOf(' ', sp + 1) >= 0) {
                throw new IOException(where + ": expected two tokens separated by one space, got \"" + line + "\"");
            }
            String left = line.substring(0, sp), right = line.substring(sp + 1);
            for (String part : new String[] {left, right, left + right}) {
                if (!vocab.containsKey(part)) throw new IOException(where + ": token '" + part + "' of merge \"" + line + "\" is not in the vocabulary");
            }
            if (rank.putIfAbsent(line, rank.size()) != null) throw new IOException(where + ": merge \"" + line + "\" appears twice");
        }
        return rank;
    }

    private static String readText(Path file, String what) throws IOException {
        try {
            return Files.readString(file, StandardCharsets.UTF_8);
        } catch (NoSuchFileException e) {
            throw new NoSuchFileException(file.toString(), null, what + " file not found");
        } catch (MalformedInputException e) {
            throw new IOException(file + ": " + what + " is not valid UTF-8", e);
        }
    }

    @Override
    public int vocabSize() { return idToToken.length; }

    /** The id of a token string (in byte-level form), or -1. */
    public int tokenId(String token) { return vocab.getOrDefault(token, -1); }

    /** The token string (in byte-level form) of an id. */
    public String token(int id) {
        checkId(id, 0);
        return idToToken[id];
    }

    /** The pieces GPT-2's pre-tokenizer cuts {@code text} into (each piece is BPE-encoded on its own). */
    public static List<String> preTokenize(String text) {
        List<String> out = new ArrayList<>();
        Matcher m = PRETOKENIZE.matcher(text);
        while (m.find()) out.add(m.group());
        return out;
    }

    @Override
    public int[] encode(String text) {
        int[] buf = new int[Math.max(16, text.length())];
        int n = 0;
        Matcher m = PRETOKENIZE.matcher(text);
        while (m.find()) {
            int[] ids = cache.get(m.group());
            if (ids == null) {
                ids = bpe(m.group());
                if (cache.size() >= CACHE_LIMIT) cache.clear();
                cache.put(m.group(), ids);
            }
            if (n + ids.length > buf.length) buf = java.util.Arrays.copyOf(buf, Math.max(2 * buf.length, n + ids.length));
            System.arraycopy(ids, 0, buf, n, ids.length);
            n += ids.length;
        }
        return java.util.Arrays.copyOf(buf, n);
    }

    /** BPE of one pre-token: merge the best-ranked adjacent pair everywhere, until no pair has a rank. */
    private int[] bpe(String piece) {
        byte[] bytes = piece.getBytes(StandardCharsets.UTF_8);
        List<String> word = new ArrayList<>(bytes.length);
        for (byte b : bytes) word.add(String.valueOf(BYTE_TO_CHAR[b & 0xff]));
        while (word.size() > 1) {
            int best = Integer.MAX_VALUE;
            String bl = null, br = null;
            for (int i = 0; i + 1 < word.size(); i++) {
                Integer r = mergeRank.get(word.get(i) + ' ' + word.get(i + 1));
                if (r != null && r < best) {
                    best = r;
                    bl = word.get(i);
                    br = word.get(i + 1);
                }
            }
            if (bl == null) break;
            // Merge every occurrence of (bl, br), scanning left to right without overlap.
            List<String> next = new ArrayList<>(word.size());
            for (int i = 0; i < word.size(); ) {
                if (i + 1 < word.size() && word.get(i).equals(bl) && word.get(i + 1).equals(br)) {
                    next.add(bl + br);
                    i += 2;
                } else {
                    next.add(word.get(i++));
                }
            }
            word = next;
        }
        int[] ids = new int[word.size()];
        for (int i = 0; i < ids.length; i++) ids[i] = vocab.get(word.get(i));   // present: checked at load
        return ids;
    }

    @Override
    public String decode(int[] ids) {
        ByteArrayOutputStream out = new ByteArrayOutputStream(ids.length * 4);
        for (int i = 0; i < ids.length; i++) {
            checkId(ids[i], i);
            String tok = idToToken[ids[i]];
            for (int c = 0; c < tok.length(); c++) {
                Integer b = CHAR_TO_BYTE.get(tok.charAt(c));
                if (b != null) {
                    out.write(b);
                } else {
                    // A token outside the byte alphabet (an added special token): its own UTF-8 text.
                    int cp = tok.codePointAt(c);
                    out.writeBytes(new String(Character.toChars(cp)).getBytes(StandardCharsets.UTF_8));
                    c += Character.charCount(cp) - 1;
                }
            }
        }
        return out.toString(StandardCharsets.UTF_8);
    }

    private void checkId(int id, int pos) {
        if (id < 0 || id >= idToToken.length || idToToken[id] == null) {
            throw new IllegalArgumentException("token id " + id + " at position " + pos + " is not in the vocabulary (size " + idToToken.length + ")");
        }
    }

    /** The byte-level character standing for byte {@code b} (GPT-2's byte-to-unicode table). */
    public static char byteChar(int b) { return BYTE_TO_CHAR[b]; }

    @Override
    public String toString() { return "Gpt2BpeTokenizer(" + vocabSize() + " tokens, " + mergeRank.size() + " merges)"; }
}
