/**
 * Checkpoint file I/O: the safetensors format (readable by PyTorch and Hugging Face tools), written
 * atomically with a SHA-256 of the data in the metadata ({@link dev.moe4j.core.io.SafeTensorsWriter}) and
 * read by memory-mapping after validating every structural rule ({@link dev.moe4j.core.io.SafeTensorsFile}).
 */
package dev.moe4j.core.io;
