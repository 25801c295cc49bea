package dev.moe4j.core.comm;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * Expert-parallel and expert-data-parallel groups laid out as DeepSpeed builds them
 * ({@code deepspeed.utils.groups._create_expert_and_data_parallel}, no tensor or pipeline parallelism):
 * <ul>
 *   <li>expert-parallel groups: epSize consecutive ranks, [0..epSize), [epSize..2 epSize), ... — the ranks that
 *       exchange tokens by all-to-all and together hold one copy of every expert;</li>
 *   <li>expert-data-parallel groups: the ranks holding the same experts, {i, i+epSize, i+2 epSize, ...} for
 *       i in [0, epSize) — expert gradients are all-reduced only there;</li>
 *   <li>the data-parallel group: the whole world — every other gradient is all-reduced there.</li>
 * </ul>
 * With {@code dataBeforeExpert} (DeepSpeed's {@code use_data_before_expert_parallel_}) the roles of the two
 * strides swap: expert-data-parallel groups are consecutive blocks of world/epSize ranks and expert-parallel
 * groups are strided by world/epSize.
 *
 * <p>Groups are created on first use by {@link Communicator#split} (collective: every rank of the world must ask
 * for the same epSize values in the same order) and cached, so PR-MoE layers with different epSize share them.
 */
public final class ProcessGroups implements AutoCloseable {
    private final Communicator world;
    private final boolean dataBeforeExpert;
    private final Map<Integer, Communicator[]> byEpSize = new LinkedHashMap<>();

    public ProcessGroups(Communicator world) { this(world, false); }

    public ProcessGroups(Communicator world, boolean dataBeforeExpert) {
        if (world == null) throw new IllegalArgumentException("ProcessGroups: world is null");
        this.world = world;
        this.dataBeforeExpert = dataBeforeExpert;
    }

    /** The data-parallel group (the world). */
    public Communicator dataParallel() { return world; }

    /** This rank's expert-parallel group for epSize (created on first call; collective). */
    public Communicator expertParallel(int epSize) { return groups(epSize)[0]; }

    /** This rank's expert-data-parallel group for epSize (created on first call; collective). */
    public Communicator expertDataParallel(int epSize) { return groups(epSize)[1]; }

    private Communicator[] groups(int epSize) {
        Communicator[] g = byEpSize.get(epSize);
        if (g != null) return g;
        int[][] ep = expertParallelRanks(world.size(), epSize, dataBeforeExpert);
        int[][] edp = expertDataParallelRanks(world.size(), epSize, dataBeforeExpert);
        int me = world.rank();
        Communicator epComm = world.split(groupOf(ep, me), me);
        Communicator edpComm = world.split(groupOf(edp, me), me);
        g = new Communicator[] {epComm, edpComm};
        byEpSize.put(epSize, g);
        return g;
    }

    private static int groupOf(int[][] groups, int rank) {
        for (int i = 0; i < groups.length; i++) for (int r : groups[i]) if (r == rank) return i;
        throw new IllegalStateException("rank " + rank + " is in no group");
    }

    /** Checks that epSize is in [1, worldSize] and divides worldSize. */
    public static void validate(int worldSize, int epSize) {
        if (worldSize < 1) throw new IllegalArgumentException("worldSize must be >= 1, got " + worldSize);
        if (epSize < 1 || epSize > worldSize) {
            throw new IllegalArgumentException("epSize must be in [1, " + worldSize + "] (the world size), got " + epSize);
        }
        if (worldSize % epSize != 0) {
            throw new IllegalArgumentException("epSize " + epSize + " must divide the world size " + worldSize
                    + " (divisors: " + divisors(worldSize) + ")");
        }
    }

    private static List<Integer> divisors(int n) {
        List<Integer> d = new ArrayList<>();
        for (int i = 1; i <= n; i++) if (n % i == 0) d.add(i);
        return d;
    }

    /** Ranks of every expert-parallel group (E + D topology). */
    public static int[][] expertParallelRanks(int worldSize, int epSize) { return expertParallelRanks(worldSize, epSize, false); }

    /** Ranks of every expert-data-parallel group (E + D topology). */
    public static int[][] expertDataParallelRanks(int worldSize, int epSize) { return expertDataParallelRanks(worldSize, epSize, false); }

    public static int[][] expertParallelRanks(int worldSize, int epSize, boolean dataBeforeExpert) {
        validate(worldSize, epSize);
        int groups = worldSize / epSize;
        int[][] g = new int[groups][epSize];
        for (int i = 0; i < groups; i++) {
            for (int j = 0; j < epSize; j++) {
                // E + D: range(i*ep, (i+1)*ep); D + E: range(i, world, world/ep)
                g[i][j] = dataBeforeExpert ? i + j * groups : i * epSize + j;
            }
        }
        return g;
    }

    public static int[][] expertDataParallelRanks(int worldSize, int epSize, boolean dataBeforeExpert) {
        validate(worldSize, epSize);
        int stride = worldSize / epSize;
        int[][] g = new int[epSize][stride];
        for (int i = 0; i < epSize; i++) {
            for (int j = 0; j < stride; j++) {
                // E + D: range(i, world, ep); D + E: range(i*stride, (i+1)*stride)
                g[i][j] = dataBeforeExpert ? i * stride + j : i + j * epSize;
            }
        }
        return g;
    }

    /** Closes the sub-groups created here (not the world). */
    @Override
    public void close() {
        for (Communicator[] g : byEpSize.values()) for (Communicator c : g) if (c != null) c.close();
        byEpSize.clear();
    }
}
