package dev.moe4j.comm.ep;

import dev.moe4j.comm.InProcessWorld;
import org.junit.jupiter.api.Test;

import java.util.List;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * The weak-scaling benchmark's smoke mode (2 in-process CPU ranks, tiny shape): one line per EP degree from rank
 * 0, positive throughput, a finite loss, and the hierarchical all-to-all training exactly as the flat one. Keeps
 * ScalingBench, which otherwise runs only on GPU hosts, from rotting.
 */
class ScalingBenchSmokeTest {
    private static final Pattern FIELD = Pattern.compile("\"(ep|dp|experts_per_layer|tokens_per_s_per_gpu|loss_last|steps_taken)\":([0-9.]+)");

    private static List<String> run(String... args) {
        ScalingBench.Options o = ScalingBench.parse(args);
        List<String> lines = new CopyOnWriteArrayList<>();
        InProcessWorld.run(2, comm -> {
            ScalingBench.bench(comm.backend(), comm, o, l -> { if (!l.isEmpty()) lines.add(l); });
            return null;
        });
        return lines;
    }

    private static double field(String line, String name) {
        Matcher m = FIELD.matcher(line);
        while (m.find()) if (m.group(1).equals(name)) return Double.parseDouble(m.group(2));
        throw new AssertionError(name + " missing in " + line);
    }

    @Test
    void oneLinePerDegreeAndHierarchicalEqualsFlat() {
        List<String> flat = run("--smoke");
        assertEquals(2, flat.size(), flat.toString());
        for (int i = 0; i < 2; i++) {
            String l = flat.get(i);
            int ep = i + 1;
            assertEquals(ep, field(l, "ep"), l);
            assertEquals(2 / ep, field(l, "dp"), l);
            assertEquals(2 * ep, field(l, "experts_per_layer"), l);   // 2 experts per GPU in the smoke shape
            assertTrue(field(l, "tokens_per_s_per_gpu") > 0, l);
            double loss = field(l, "loss_last");
            assertTrue(loss > 1 && loss < 10, l);                      // about ln(256) = 5.5 on random tokens
            assertEquals(2, field(l, "steps_taken"), l);               // 1 warm-up + 1 timed
        }
        List<String> hier = run("--smoke", "--node-size", "1");
        assertEquals(field(flat.get(1), "loss_last"), field(hier.get(1), "loss_last"), "hierarchical (node size 1) vs flat at EP=2");
    }

    @Test
    void badOptionsAreRefused() {
        assertThrows(IllegalArgumentException.class, () -> ScalingBench.parse(new String[] {"--ep", "0"}));
        assertThrows(IllegalArgumentException.class, () -> ScalingBench.parse(new String[] {"--layers"}));
        assertThrows(IllegalArgumentException.class, () -> ScalingBench.parse(new String[] {"--bogus", "1"}));
    }
}
