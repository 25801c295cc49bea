package dev.moe4j.core.comm;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.Tensor;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;

/**
 * The default {@link Communicator#exchangeRows}: the blocks packed per peer into one buffer (a device copy per
 * block), one {@link Communicator#allToAllV}, and the received rows copied to their blocks. A side whose blocks
 * already lie contiguous in peer order over the whole tensor is used as it is.
 */
final class RowExchange {
    private RowExchange() {}

    static void viaAllToAllV(Communicator c, Tensor send, RowBlocks sendBlocks, Tensor recv, RowBlocks recvBlocks) {
        int P = c.size(), cols = send.cols();
        Backend b = c.backend();
        int[] sendRows = sendBlocks.rowsPerPeer(P), recvRows = recvBlocks.rowsPerPeer(P);
        List<int[]> packs = packing(sendBlocks, P), unpacks = packing(recvBlocks, P);   // {block row, packed row, rows}
        Tensor s2 = send.reshape(send.rows(), cols), r2 = recv.reshape(recv.rows(), cols);
        // Freed on return while a GPU may still run the copies: the allocator reuses them only for later work on the stream.
        Tensor packed = inPlace(packs, s2.rows()) ? null : b.empty(send.dtype(), Arrays.stream(sendRows).sum(), cols);
        Tensor landed = inPlace(unpacks, r2.rows()) ? null : b.empty(recv.dtype(), Arrays.stream(recvRows).sum(), cols);
        try {
            if (packed != null) for (int[] m : packs) b.copy(s2.rowSlice(m[0], m[2]), packed.rowSlice(m[1], m[2]));
            c.allToAllV(packed == null ? s2 : packed, sendRows, landed == null ? r2 : landed, recvRows);
            if (landed != null) for (int[] m : unpacks) b.copy(landed.rowSlice(m[1], m[2]), r2.rowSlice(m[0], m[2]));
        } finally {
            if (packed != null) packed.close();
            if (landed != null) landed.close();
        }
    }

    /** The non-empty blocks in peer order (list order within a peer) with their rows in the packed buffer. */
    private static List<int[]> packing(RowBlocks blocks, int P) {
        List<int[]> out = new ArrayList<>();
        int at = 0;
        for (int q = 0; q < P; q++) {
            for (int i : blocks.nonEmptyWith(q)) {
                out.add(new int[] {blocks.start(i), at, blocks.rows(i)});
                at += blocks.rows(i);
            }
        }
        return out;
    }

    /** Whether the packed buffer would be the tensor itself: every block in place and all rows covered. */
    private static boolean inPlace(List<int[]> moves, int rows) {
        int covered = 0;
        for (int[] m : moves) {
            if (m[0] != m[1]) return false;
            covered += m[2];
        }
        return covered == rows;
    }
}
