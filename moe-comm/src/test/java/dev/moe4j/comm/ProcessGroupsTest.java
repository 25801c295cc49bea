package dev.moe4j.comm;

import dev.moe4j.core.comm.CommOptions;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.comm.ProcessGroups;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

import java.time.Duration;

import static org.junit.jupiter.api.Assertions.*;

/** Expert-parallel / expert-data-parallel groups laid out as deepspeed.utils.groups builds them. */
class ProcessGroupsTest {

    /** DeepSpeed's own layout (groups.py, _create_expert_and_data_parallel, E + D, no pipeline), world 8. */
    static int[][][] deepSpeedWorld8(int ep) {
        return switch (ep) {
            case 1 -> new int[][][] {{{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}}, {{0, 1, 2, 3, 4, 5, 6, 7}}};
            case 2 -> new int[][][] {{{0, 1}, {2, 3}, {4, 5}, {6, 7}}, {{0, 2, 4, 6}, {1, 3, 5, 7}}};
            case 4 -> new int[][][] {{{0, 1, 2, 3}, {4, 5, 6, 7}}, {{0, 4}, {1, 5}, {2, 6}, {3, 7}}};
            case 8 -> new int[][][] {{{0, 1, 2, 3, 4, 5, 6, 7}}, {{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}}};
            default -> throw new IllegalArgumentException();
        };
    }

    @ParameterizedTest
    @ValueSource(ints = {1, 2, 4, 8})
    void layoutsMatchDeepSpeed(int ep) {
        assertArrayEquals(deepSpeedWorld8(ep)[0], ProcessGroups.expertParallelRanks(8, ep));
        assertArrayEquals(deepSpeedWorld8(ep)[1], ProcessGroups.expertDataParallelRanks(8, ep));
    }

    @Test
    void dataBeforeExpertLayoutMatchesDeepSpeed() {
        // use_data_before_expert_parallel_: EDP = range(i*stride, (i+1)*stride), EP = range(i, world, stride)
        assertArrayEquals(new int[][] {{0, 4}, {1, 5}, {2, 6}, {3, 7}}, ProcessGroups.expertParallelRanks(8, 2, true));
        assertArrayEquals(new int[][] {{0, 1, 2, 3}, {4, 5, 6, 7}}, ProcessGroups.expertDataParallelRanks(8, 2, true));
    }

    @ParameterizedTest
    @ValueSource(ints = {1, 2, 4, 8})
    void communicatorsHoldTheRightRanks(int ep) {
        int[][][] want = deepSpeedWorld8(ep);
        InProcessWorld.run(8, CommOptions.withTimeout(Duration.ofSeconds(20)), world -> {
            try (ProcessGroups g = new ProcessGroups(world)) {
                assertSame(world, g.dataParallel());
                check(world, g.expertParallel(ep), want[0]);
                check(world, g.expertDataParallel(ep), want[1]);
                assertSame(g.expertParallel(ep), g.expertParallel(ep), "cached");
                // Expert gradients are summed only inside the expert-data-parallel group.
                try (Tensor t = world.backend().fromDoubles(DType.F64, new double[] {world.rank()}, 1)) {
                    g.expertDataParallel(ep).allReduce(t);
                    int me = world.rank();
                    double s = 0;
                    for (int[] grp : want[1]) for (int r : grp) if (contains(grp, me)) s += r;
                    assertEquals(s, t.toDoubles()[0]);
                }
            }
            return null;
        });
    }

    private static void check(Communicator world, Communicator sub, int[][] groups) {
        int me = world.rank();
        int[] mine = null;
        for (int[] g : groups) if (contains(g, me)) mine = g;
        assertNotNull(mine);
        assertEquals(mine.length, sub.size());
        try (Tensor r = world.backend().fromInts(new int[] {me}, 1); Tensor all = world.backend().zeros(DType.I32, sub.size())) {
            sub.allGather(r, all);
            assertArrayEquals(mine, all.toInts(), "group of world rank " + me);
        }
    }

    private static boolean contains(int[] a, int x) {
        for (int v : a) if (v == x) return true;
        return false;
    }

    @Test
    void epSizeMustDivideWorld() {
        var e = assertThrows(IllegalArgumentException.class, () -> ProcessGroups.expertParallelRanks(8, 3));
        assertEquals("epSize 3 must divide the world size 8 (divisors: [1, 2, 4, 8])", e.getMessage());
        e = assertThrows(IllegalArgumentException.class, () -> ProcessGroups.expertParallelRanks(8, 16));
        assertEquals("epSize must be in [1, 8] (the world size), got 16", e.getMessage());
        e = assertThrows(IllegalArgumentException.class, () -> ProcessGroups.expertDataParallelRanks(8, 0));
        assertEquals("epSize must be in [1, 8] (the world size), got 0", e.getMessage());
    }
}
