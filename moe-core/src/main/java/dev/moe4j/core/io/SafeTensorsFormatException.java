package dev.moe4j.core.io;

import java.io.IOException;
import java.nio.file.Path;

/** A safetensors file that breaks the format (or fails its checksum); the message names the file and the fault. */
public class SafeTensorsFormatException extends IOException {
    private final Path file;

    public SafeTensorsFormatException(Path file, String problem) {
        super(file + ": " + problem);
        this.file = file;
    }

    public SafeTensorsFormatException(Path file, String problem, Throwable cause) {
        super(file + ": " + problem, cause);
        this.file = file;
    }

    /** The offending file. */
    public Path file() { return file; }
}
