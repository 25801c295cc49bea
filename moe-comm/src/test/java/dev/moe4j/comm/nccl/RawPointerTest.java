package dev.moe4j.comm.nccl;

import org.bytedeco.javacpp.LongPointer;
import org.junit.jupiter.api.Test;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;

/**
 * The pointers NCCL gets and the handles it hands back. (An anonymous Pointer subclass once assigned the
 * inherited, shadowing field to itself, so every buffer NCCL saw was NULL; and a JavaCPP by-pointer-pointer
 * temporary once received NCCL's late, asynchronous write of a split communicator's handle, so the split's
 * handle read as NULL.)
 */
class RawPointerTest {
    @Test
    void aRawPointerCarriesItsAddress() {
        assertEquals(0x7f00_1234_5000L, NcclCommunicator.pointer(0x7f00_1234_5000L).address());
        assertEquals(0L, NcclCommunicator.pointer(0L).address());
    }

    @Test
    void aHandleSlotReadsWhatIsWrittenToItsNativeMemoryLater() throws Exception {
        try (NcclCommunicator.HandleSlot slot = new NcclCommunicator.HandleSlot()) {
            assertNull(slot.handle(), "a fresh slot holds no handle");
            // What NCCL's init thread does when a non-blocking split completes: a store through the slot's address.
            long where = slot.pp.address();
            Thread writer = new Thread(() -> new LongPointer(NcclCommunicator.pointer(where)).put(0L, 0x7f00_0000_1230L));
            writer.start();
            writer.join();
            assertEquals(0x7f00_0000_1230L, slot.handle().address());
        }
    }
}
