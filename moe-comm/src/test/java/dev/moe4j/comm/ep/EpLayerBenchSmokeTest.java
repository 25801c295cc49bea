package dev.moe4j.comm.ep;

import dev.moe4j.comm.InProcessWorld;
import org.junit.jupiter.api.Test;

import java.util.Arrays;
import java.util.List;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * The expert-parallel layer benchmark's smoke mode (2 in-process CPU ranks, tiny shapes, one timed step): every
 * config and mode reports from rank 0 only, with positive times and their ratio, no failure lines, and dropless
 * drops nothing. Keeps EpLayerBench, which otherwise runs only on the 2-GPU host, from rotting.
 */
class EpLayerBenchSmokeTest {
    private static final Pattern NUM = Pattern.compile("\"(ep2_ms|local_ms|ratio|ep_dropped|local_dropped)\":([0-9.]+)");

    @Test
    void everyConfigAndModeReportsOnce() {
        List<String> lines = new CopyOnWriteArrayList<>();
        InProcessWorld.run(2, comm -> {
            EpLayerBench.bench(comm, Arrays.asList(EpLayerBench.SMOKE), 1, lines::add);
            return null;
        });
        assertEquals(2 * EpLayerBench.SMOKE.length, lines.size(), "one line per config and mode: " + lines);
        for (String l : lines) {
            assertFalse(l.contains("\"error\""), l);
            assertTrue(l.contains("\"ranks\":2") && l.contains("\"experts\":4") && l.contains("\"experts_per_gpu\":2"), l);
            Matcher m = NUM.matcher(l);
            double ep = -1, local = -1, ratio = -1, dropped = -1;
            while (m.find()) {
                double v = Double.parseDouble(m.group(2));
                switch (m.group(1)) {
                    case "ep2_ms" -> ep = v;
                    case "local_ms" -> local = v;
                    case "ratio" -> ratio = v;
                    default -> dropped = Math.max(dropped, v);
                }
            }
            assertTrue(ep > 0 && local > 0, l);
            assertEquals(ep / local, ratio, 0.01 * ratio + 1e-3, l);
            if (l.contains("dropless")) assertEquals(0.0, dropped, l);
            assertTrue(l.contains("\"all_to_all\":\"peer windows where offered, else flat\""), l);
            assertTrue(l.contains("\"grad_dtype\":\"bf16\""), "bf16 gradients by default, as the PyTorch peer: " + l);
        }
    }

    @Test
    void overlapModeRunsAndSaysSo() {
        List<String> lines = new CopyOnWriteArrayList<>();
        InProcessWorld.run(2, comm -> {
            EpLayerBench.bench(comm, Arrays.asList(EpLayerBench.SMOKE), 1, 0, true, lines::add);
            return null;
        });
        assertEquals(2 * EpLayerBench.SMOKE.length, lines.size(), "one line per config and mode: " + lines);
        for (String l : lines) {
            assertFalse(l.contains("\"error\""), l);
            assertTrue(l.contains("\"overlap\":true"), l);
        }
    }

    @Test
    void hierarchicalModeReportsItsAllToAll() {
        List<String> lines = new CopyOnWriteArrayList<>();
        InProcessWorld.run(2, comm -> {
            EpLayerBench.bench(comm, Arrays.asList(EpLayerBench.SMOKE), 1, 1, lines::add);
            return null;
        });
        assertEquals(2 * EpLayerBench.SMOKE.length, lines.size(), "one line per config and mode: " + lines);
        for (String l : lines) {
            assertFalse(l.contains("\"error\""), l);
            assertTrue(l.contains("\"all_to_all\":\"hierarchical, node size 1\""), l);
        }
    }
}
