package dev.moe4j.core.io;

import dev.moe4j.core.tensor.DType;

import java.util.HexFormat;

/**
 * Constants of the safetensors format (https://github.com/huggingface/safetensors):
 *
 * <pre>
 *   [8 bytes]  N, the header length, unsigned little-endian
 *   [N bytes]  UTF-8 JSON: {"__metadata__": {str: str}, "name": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...}
 *              padded with spaces so that 8 + N is a multiple of 8
 *   [rest]     the data section: every tensor's little-endian bytes at [b, e) relative to its start,
 *              the ranges tiling the section with no gap, overlap or trailing byte
 * </pre>
 *
 * Writing: {@link SafeTensorsWriter}; reading: {@link SafeTensorsFile}.
 */
public final class SafeTensors {
    private SafeTensors() {}

    /** The largest header we accept (the same cap as the reference implementation). */
    public static final long MAX_HEADER_BYTES = 100_000_000L;

    /** Metadata key under which the writer stores the hex SHA-256 of the data section; the reader verifies it. */
    public static final String CHECKSUM_KEY = "moe4j.data_sha256";

    /** The JSON key of the string-to-string metadata map. */
    public static final String METADATA_KEY = "__metadata__";

    /** The format's name of a dtype: F32, BF16, I32, F64. */
    public static String formatName(DType dtype) {
        return dtype.name();
    }

    /** The dtype of a format dtype name, or null if this library does not handle it. */
    static DType parseDType(String name) {
        return switch (name) {
            case "F32" -> DType.F32;
            case "BF16" -> DType.BF16;
            case "I32" -> DType.I32;
            case "F64" -> DType.F64;
            default -> null;
        };
    }

    static String hex(byte[] digest) {
        return HexFormat.of().formatHex(digest);
    }
}
