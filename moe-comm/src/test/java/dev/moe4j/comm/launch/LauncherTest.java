package dev.moe4j.comm.launch;

import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

import java.io.ByteArrayOutputStream;
import java.io.PrintStream;
import java.nio.file.Files;
import java.nio.file.Path;

import static org.junit.jupiter.api.Assertions.*;

class LauncherTest {

    @Test
    void setsTheTorchrunVariables(@TempDir Path dir) throws Exception {
        var buf = new ByteArrayOutputStream();
        int code = Launcher.run(new String[] {"--nproc-per-node", "3", "--master-port", "23456", "--",
                "sh", "-c", "echo \"$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT\" > " + dir + "/out.$RANK; echo hi"},
                new PrintStream(buf, true));
        assertEquals(0, code);
        for (int r = 0; r < 3; r++) {
            assertEquals(r + " 3 " + r + " 3 127.0.0.1 23456", Files.readString(dir.resolve("out." + r)).trim());
        }
        String out = buf.toString();
        assertTrue(out.contains("[0] hi") && out.contains("[2] hi"), out);
    }

    @Test
    void aFailedRankStopsTheOthers() {
        long t0 = System.nanoTime();
        int code = Launcher.run(new String[] {"--nproc-per-node", "3", "--grace-s", "1", "--",
                "sh", "-c", "if [ \"$RANK\" = 1 ]; then exit 3; fi; sleep 60"}, new PrintStream(new ByteArrayOutputStream()));
        long ms = (System.nanoTime() - t0) / 1_000_000;
        assertEquals(3, code);
        assertTrue(ms < 10_000, "took " + ms + " ms");
    }

    @Test
    void badOptionsAreExplained() {
        var e = assertThrows(IllegalArgumentException.class, () -> Launcher.parse(new String[] {"--", "true"}));
        assertEquals("--nproc-per-node must be >= 1 (it is required)", e.getMessage());
        e = assertThrows(IllegalArgumentException.class, () -> Launcher.parse(new String[] {"--nproc-per-node", "2"}));
        assertEquals("no command given after --", e.getMessage());
        e = assertThrows(IllegalArgumentException.class, () -> Launcher.parse(new String[] {"--nproc-per-node", "2", "--node-rank", "1", "--", "x"}));
        assertEquals("--node-rank must be in [0, 1), got 1", e.getMessage());
        var o = Launcher.parse(new String[] {"--nproc_per_node=4", "--nnodes", "2", "--node-rank", "1", "--", "a", "b"});
        assertEquals(4, o.nprocPerNode());
        assertEquals(29500, o.masterPort());
    }

    /** Two JVMs started by the launcher meet at the TCP store that rank 0 serves, found from the environment. */
    @Test
    void jvmRanksRendezvousThroughTheStore(@TempDir Path dir) throws Exception {
        String java = ProcessHandle.current().info().command().orElse("java");
        int code = Launcher.run(new String[] {"--nproc-per-node", "2", "--",
                java, "-cp", System.getProperty("java.class.path"), StoreProbe.class.getName(), dir.toString()},
                new PrintStream(new ByteArrayOutputStream()));
        assertEquals(0, code);
        assertEquals("0 2 0 2 from-0-of-2", Files.readString(dir.resolve("rank0")));
        assertEquals("1 2 1 2 from-0-of-2", Files.readString(dir.resolve("rank1")));
    }
}
