package dev.moe4j.core.data;

import java.io.IOException;
import java.nio.charset.MalformedInputException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.util.List;

/** Loading training corpora: plain UTF-8 text run through a {@link Tokenizer}, or pre-tokenized uint16 shards. */
public final class Datasets {
    private Datasets() {}

    /** The tokens of a UTF-8 text file (held in memory). Missing, empty or non-UTF-8 files are clear errors. */
    public static TokenSequence loadText(Path file, Tokenizer tokenizer) throws IOException {
        if (!Files.exists(file)) throw new NoSuchFileException(file.toString(), null, "text corpus not found");
        if (Files.isDirectory(file)) throw new IOException(file + ": text corpus is a directory, expected a file");
        String text;
        try {
            text = Files.readString(file, StandardCharsets.UTF_8);
        } catch (MalformedInputException e) {
            throw new IOException(file + ": text corpus is not valid UTF-8", e);
        }
        if (text.isEmpty()) throw new IOException(file + ": text corpus is empty");
        return fromText(text, tokenizer);
    }

    /** The tokens of {@code text}. */
    public static TokenSequence fromText(String text, Tokenizer tokenizer) {
        if (text.isEmpty()) throw new IllegalArgumentException("text corpus is empty");
        return TokenSequence.of(tokenizer.encode(text));
    }

    /** Pre-tokenized uint16 shards as one sequence; see {@link TokenShards#open}. */
    public static TokenShards loadShards(List<Path> files, int vocabSize) throws IOException {
        return TokenShards.open(files, vocabSize);
    }
}
