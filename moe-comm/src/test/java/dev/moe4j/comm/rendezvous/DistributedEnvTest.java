package dev.moe4j.comm.rendezvous;

import org.junit.jupiter.api.Test;

import java.util.List;
import java.util.Map;

import static org.junit.jupiter.api.Assertions.*;

class DistributedEnvTest {

    @Test
    void torchrun() {
        var e = DistributedEnv.from(Map.of("RANK", "3", "WORLD_SIZE", "8", "LOCAL_RANK", "1", "LOCAL_WORLD_SIZE", "2",
                "MASTER_ADDR", "node0", "MASTER_PORT", "29400"));
        assertEquals(new DistributedEnv(3, 8, 1, 2, "node0", 29400, 29400, "torchrun variables"), e);
        assertEquals(1, e.nodeRank());
        assertFalse(e.isStoreServer());
    }

    @Test
    void torchrunAgentOwnsMasterPortSoStoreMovesUp() {
        var e = DistributedEnv.from(Map.of("RANK", "0", "WORLD_SIZE", "2", "LOCAL_RANK", "0", "LOCAL_WORLD_SIZE", "2",
                "MASTER_ADDR", "127.0.0.1", "MASTER_PORT", "29500", "TORCHELASTIC_USE_AGENT_STORE", "True"));
        assertEquals(29500, e.masterPort());
        assertEquals(29501, e.storePort());
        var o = DistributedEnv.from(Map.of("RANK", "0", "WORLD_SIZE", "2", "MASTER_ADDR", "h", "MOE4J_STORE_PORT", "4000"));
        assertEquals(4000, o.storePort());
    }

    @Test
    void openMpi() {
        var e = DistributedEnv.from(Map.of("OMPI_COMM_WORLD_RANK", "5", "OMPI_COMM_WORLD_SIZE", "8",
                "OMPI_COMM_WORLD_LOCAL_RANK", "1", "OMPI_COMM_WORLD_LOCAL_SIZE", "4", "MASTER_ADDR", "head"));
        assertEquals(new DistributedEnv(5, 8, 1, 4, "head", 29500, 29500, "Open MPI variables"), e);
        var err = assertThrows(IllegalArgumentException.class, () -> DistributedEnv.from(Map.of(
                "OMPI_COMM_WORLD_RANK", "0", "OMPI_COMM_WORLD_SIZE", "2")));
        assertTrue(err.getMessage().contains("MASTER_ADDR is not set") && err.getMessage().contains("mpirun -x MASTER_ADDR"), err.getMessage());
    }

    @Test
    void slurm() {
        var e = DistributedEnv.from(Map.of("SLURM_PROCID", "6", "SLURM_NTASKS", "7", "SLURM_LOCALID", "0",
                "SLURM_TASKS_PER_NODE", "2(x3),1", "SLURM_NODEID", "3", "SLURM_JOB_NODELIST", "gpu[07-10,12],login1",
                "SLURM_JOB_ID", "123456"));
        assertEquals(6, e.rank());
        assertEquals(7, e.worldSize());
        assertEquals(1, e.localWorldSize());
        assertEquals("gpu07", e.masterAddr());
        assertEquals(15000 + 123456 % 20000, e.masterPort());
        assertEquals("Slurm variables", e.source());
    }

    @Test
    void torchrunWinsOverSlurmAndNothingMeansSingle() {
        var e = DistributedEnv.from(Map.of("RANK", "1", "WORLD_SIZE", "2", "MASTER_ADDR", "a", "SLURM_PROCID", "0", "SLURM_NTASKS", "1"));
        assertEquals("torchrun variables", e.source());
        assertEquals(DistributedEnv.single(), DistributedEnv.from(Map.of()));
    }

    @Test
    void badValuesNameTheVariable() {
        var err = assertThrows(IllegalArgumentException.class, () -> DistributedEnv.from(Map.of("RANK", "x", "WORLD_SIZE", "2", "MASTER_ADDR", "a")));
        assertEquals("torchrun variables: RANK must be an integer, got 'x'", err.getMessage());
        err = assertThrows(IllegalArgumentException.class, () -> DistributedEnv.from(Map.of("RANK", "2", "WORLD_SIZE", "2", "MASTER_ADDR", "a")));
        assertEquals("torchrun variables: rank must be in [0, 2), got 2", err.getMessage());
        err = assertThrows(IllegalArgumentException.class, () -> DistributedEnv.from(Map.of("RANK", "0", "WORLD_SIZE", "2", "MASTER_ADDR", "a", "MASTER_PORT", "70000")));
        assertEquals("torchrun variables: MASTER_PORT must be in [1, 65535], got 70000", err.getMessage());
        err = assertThrows(IllegalArgumentException.class, () -> DistributedEnv.from(Map.of("RANK", "0", "WORLD_SIZE", "2")));
        assertTrue(err.getMessage().startsWith("torchrun variables: MASTER_ADDR is not set"), err.getMessage());
    }

    @Test
    void slurmHelpers() {
        assertEquals(List.of(2, 2, 2, 1), DistributedEnv.tasksPerNode("2(x3),1"));
        assertEquals(List.of(4), DistributedEnv.tasksPerNode("4"));
        assertEquals("node01", DistributedEnv.firstHost("node[01-04,07],gpu5"));
        assertEquals("a", DistributedEnv.firstHost("a,b"));
        assertEquals("gpu-3x", DistributedEnv.firstHost("gpu-[3-5]x"));
        assertEquals("single", DistributedEnv.firstHost("single"));
    }
}
