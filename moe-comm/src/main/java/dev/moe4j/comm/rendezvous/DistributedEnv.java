package dev.moe4j.comm.rendezvous;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;

/**
 * Where this process sits in a multi-process job, read from the variables a launcher sets:
 * <ul>
 *   <li>torchrun / torch.distributed.run and our own launcher: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
 *       MASTER_ADDR, MASTER_PORT;</li>
 *   <li>Open MPI (mpirun): OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE; MASTER_ADDR must be passed
 *       (mpirun -x MASTER_ADDR=host), MASTER_PORT defaults to 29500;</li>
 *   <li>Slurm (srun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_TASKS_PER_NODE with SLURM_NODEID;
 *       MASTER_ADDR defaults to the first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST, MASTER_PORT to
 *       15000 + SLURM_JOB_ID % 20000 (every task of the job computes the same).</li>
 * </ul>
 * The first family whose rank and size variables are both present wins, in the order above; with none, the
 * process is rank 0 of 1.
 *
 * @param storePort the port of the rendezvous store rank 0 serves: MASTER_PORT, or MASTER_PORT + 1 under
 *                  torchrun's elastic agent (TORCHELASTIC_USE_AGENT_STORE=True), which holds MASTER_PORT itself;
 *                  MOE4J_STORE_PORT overrides both
 */
public record DistributedEnv(int rank, int worldSize, int localRank, int localWorldSize,
                             String masterAddr, int masterPort, int storePort, String source) {

    public static final int DEFAULT_PORT = 29500;

    public DistributedEnv {
        if (worldSize < 1) throw new IllegalArgumentException(source + ": world size must be >= 1, got " + worldSize);
        if (rank < 0 || rank >= worldSize) throw new IllegalArgumentException(source + ": rank must be in [0, " + worldSize + "), got " + rank);
        if (localWorldSize < 1 || localWorldSize > worldSize) {
            throw new IllegalArgumentException(source + ": local world size must be in [1, " + worldSize + "], got " + localWorldSize);
        }
        if (localRank < 0 || localRank >= localWorldSize) {
            throw new IllegalArgumentException(source + ": local rank must be in [0, " + localWorldSize + "), got " + localRank);
        }
        port(source, "MASTER_PORT", masterPort);
        port(source, "store port", storePort);
    }

    private static void port(String source, String name, int p) {
        if (p < 1 || p > 65535) throw new IllegalArgumentException(source + ": " + name + " must be in [1, 65535], got " + p);
    }

    /** A single process: rank 0 of 1 on 127.0.0.1. */
    public static DistributedEnv single() {
        return new DistributedEnv(0, 1, 0, 1, "127.0.0.1", DEFAULT_PORT, DEFAULT_PORT, "single process");
    }

    /** From this process's environment. */
    public static DistributedEnv fromEnvironment() { return from(System.getenv()); }

    /** From the given variables (for tests). */
    public static DistributedEnv from(Map<String, String> env) {
        if (has(env, "RANK") && has(env, "WORLD_SIZE")) return torchrun(env);
        if (has(env, "OMPI_COMM_WORLD_RANK") && has(env, "OMPI_COMM_WORLD_SIZE")) return openMpi(env);
        if (has(env, "SLURM_PROCID") && has(env, "SLURM_NTASKS")) return slurm(env);
        return single();
    }

    /** The node index, assuming every node runs localWorldSize ranks numbered node by node. */
    public int nodeRank() { return rank / localWorldSize; }

    /** True for the rank that serves the rendezvous store. */
    public boolean isStoreServer() { return rank == 0; }

    private static DistributedEnv torchrun(Map<String, String> env) {
        return launcherVariables(env, "torchrun variables", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE");
    }

    private static DistributedEnv openMpi(Map<String, String> env) {
        return launcherVariables(env, "Open MPI variables", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE");
    }

    /** A launcher that names world size, rank, local rank and local size (local ones default to a single node). */
    private static DistributedEnv launcherVariables(Map<String, String> env, String src, String sizeVar, String rankVar,
                                                    String localRankVar, String localSizeVar) {
        int size = integer(env, src, sizeVar, null);
        int rank = integer(env, src, rankVar, null);
        int local = integer(env, src, localRankVar, rank);
        int localSize = integer(env, src, localSizeVar, size);
        return withMaster(env, src, rank, size, local, localSize, DEFAULT_PORT);
    }

    private static DistributedEnv slurm(Map<String, String> env) {
        String src = "Slurm variables";
        int size = integer(env, src, "SLURM_NTASKS", null);
        int rank = integer(env, src, "SLURM_PROCID", null);
        int local = integer(env, src, "SLURM_LOCALID", 0);
        int localSize;
        if (has(env, "SLURM_TASKS_PER_NODE")) {
            List<Integer> perNode = tasksPerNode(env.get("SLURM_TASKS_PER_NODE"));
            int node = integer(env, src, "SLURM_NODEID", 0);
            if (node < 0 || node >= perNode.size()) {
                throw new IllegalArgumentException(src + ": SLURM_NODEID " + node + " is outside SLURM_TASKS_PER_NODE '" + env.get("SLURM_TASKS_PER_NODE") + "'");
            }
            localSize = perNode.get(node);
        } else {
            localSize = integer(env, src, "SLURM_NTASKS_PER_NODE", size);
        }
        Map<String, String> e = env;
        if (!has(env, "MASTER_ADDR")) {
            String list = has(env, "SLURM_STEP_NODELIST") ? env.get("SLURM_STEP_NODELIST")
                    : has(env, "SLURM_JOB_NODELIST") ? env.get("SLURM_JOB_NODELIST") : env.get("SLURM_NODELIST");
            if (list != null && !list.isBlank()) {
                e = new java.util.HashMap<>(env);
                e.put("MASTER_ADDR", firstHost(list));
            }
        }
        int defPort = DEFAULT_PORT;
        if (has(env, "SLURM_JOB_ID")) defPort = 15000 + (int) (Long.parseLong(env.get("SLURM_JOB_ID").trim()) % 20000);
        return withMaster(e, src, rank, size, local, localSize, defPort);
    }

    private static DistributedEnv withMaster(Map<String, String> env, String src, int rank, int size, int local, int localSize, int defPort) {
        String addr = env.get("MASTER_ADDR");
        if (addr == null || addr.isBlank()) {
            if (size > 1) {
                throw new IllegalArgumentException(src + ": MASTER_ADDR is not set; it must name the host of rank 0 (e.g. export MASTER_ADDR=node0"
                        + (src.startsWith("Open MPI") ? ", and pass it with mpirun -x MASTER_ADDR" : "") + ")");
            }
            addr = "127.0.0.1";
        }
        int port = integer(env, src, "MASTER_PORT", defPort);
        int store = "True".equalsIgnoreCase(env.getOrDefault("TORCHELASTIC_USE_AGENT_STORE", "")) ? port + 1 : port;
        store = integer(env, src, "MOE4J_STORE_PORT", store);
        return new DistributedEnv(rank, size, local, localSize, addr.trim(), port, store, src);
    }

    private static boolean has(Map<String, String> env, String k) {
        String v = env.get(k);
        return v != null && !v.isBlank();
    }

    private static int integer(Map<String, String> env, String src, String name, Integer def) {
        String v = env.get(name);
        if (v == null || v.isBlank()) {
            if (def == null) throw new IllegalArgumentException(src + ": " + name + " is not set");
            return def;
        }
        try {
            return Integer.parseInt(v.trim());
        } catch (NumberFormatException e) {
            throw new IllegalArgumentException(src + ": " + name + " must be an integer, got '" + v + "'");
        }
    }

    /** "2(x3),1" -> [2, 2, 2, 1]. */
    static List<Integer> tasksPerNode(String spec) {
        List<Integer> out = new ArrayList<>();
        for (String part : spec.trim().split(",")) {
            try {
                int x = part.indexOf("(x");
                if (x < 0) {
                    out.add(Integer.parseInt(part.trim()));
                } else {
                    int n = Integer.parseInt(part.substring(0, x).trim());
                    int rep = Integer.parseInt(part.substring(x + 2, part.indexOf(')', x)).trim());
                    for (int i = 0; i < rep; i++) out.add(n);
                }
            } catch (RuntimeException e) {
                throw new IllegalArgumentException("SLURM_TASKS_PER_NODE: cannot parse '" + spec + "' (expected e.g. '2(x3),1')");
            }
        }
        return out;
    }

    /** The first host of a Slurm host list: "node[01-04,07],gpu5" -> "node01". */
    static String firstHost(String list) {
        String s = list.trim();
        int depth = 0, end = s.length();
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            if (c == '[') depth++;
            else if (c == ']') depth--;
            else if (c == ',' && depth == 0) { end = i; break; }
        }
        String first = s.substring(0, end);
        int lb = first.indexOf('[');
        if (lb < 0) return first;
        int rb = first.indexOf(']', lb);
        if (rb < 0) throw new IllegalArgumentException("Slurm node list: unbalanced '[' in '" + list + "'");
        String range = first.substring(lb + 1, rb).split(",")[0];
        String start = range.split("-")[0];
        return first.substring(0, lb) + start + first.substring(rb + 1);
    }
}
