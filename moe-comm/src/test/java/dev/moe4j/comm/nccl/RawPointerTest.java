package dev.moe4j.comm.nccl;

import org.junit.jupiter.api.Test;

import static org.junit.jupiter.api.Assertions.assertEquals;

/**
 * The pointers NCCL gets must carry the tensor's address. (An anonymous Pointer subclass once assigned the
 * inherited, shadowing field to itself, so every buffer NCCL saw was NULL: illegal memory accesses on the GPU.)
 */
class RawPointerTest {
    @Test
    void aRawPointerCarriesItsAddress() {
        assertEquals(0x7f00_1234_5000L, NcclCommunicator.pointer(0x7f00_1234_5000L).address());
        assertEquals(0L, NcclCommunicator.pointer(0L).address());
    }
}
