package dev.moe4j.comm.ep;

import dev.moe4j.comm.InProcessWorld;
import dev.moe4j.core.comm.CommunicationException;
import dev.moe4j.core.comm.ProcessGroups;
import dev.moe4j.core.model.ModelSpec;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.train.Checkpoint;
import dev.moe4j.core.train.ShardedCheckpoint;
import dev.moe4j.core.train.Trainer;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;

import static dev.moe4j.comm.ep.EpFixtures.*;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * Expert-sharded checkpoints: saved by a world of M ranks at one expert-parallel degree, loaded by a world of N at
 * another (1 included), the run continues with the same losses as an uninterrupted single-process run on the same
 * global batches (4 micro-batch shares per step; float64, tolerance as in {@link ExpertParallelTrainingTest}).
 */
class ShardedCheckpointTest {
    static final String CONFIG = "{\"model\":\"ep-test\"}";
    static final int GLOBAL_MICRO = 4, FIRST = 4, STEPS = 8;

    /** world ranks at degree ep with GLOBAL_MICRO / world micro-batches: optionally load, train, optionally save. */
    private static List<List<Double>> world(ModelSpec spec, int world, int ep, Path load, int steps, Path save) {
        return world(spec, world, ep, GLOBAL_MICRO, load, steps, save);
    }

    private static List<List<Double>> world(ModelSpec spec, int world, int ep, int globalMicro, Path load, int steps, Path save) {
        return InProcessWorld.run(world, comm -> {
            try (ProcessGroups groups = new ProcessGroups(comm)) {
                ModelContext ctx = new ModelContext(comm.backend(), DType.F64, SEED);
                Trainer t = trainer(ctx, spec, groups, ep, globalMicro / world);
                if (load != null) ShardedCheckpoint.load(load, t, CONFIG);
                List<Double> l = run(t, steps);
                if (save != null) ShardedCheckpoint.save(save, t, CONFIG, Map.of(), groups);
                return l;
            }
        });
    }

    private static List<Double> single(ModelSpec spec, Path load, int steps, Path save) throws IOException {
        Trainer t = reference(spec, GLOBAL_MICRO);
        if (load != null) ShardedCheckpoint.load(load, t, CONFIG);
        List<Double> l = run(t, steps);
        if (save != null) ShardedCheckpoint.save(save, t, CONFIG, Map.of(), null);
        return l;
    }

    private static void assertContinues(List<Double> expected, List<Double> got, String what) {
        for (int i = 0; i < got.size(); i++) {
            assertEquals(expected.get(FIRST + i), got.get(i), 1e-9 * expected.get(FIRST + i), what + ": loss at step " + (FIRST + i));
        }
    }

    @Test
    void savedAtEp2InAWorldOf4LoadsAtEp1Ep2AndEp4AndContinuesTheSame(@TempDir Path dir) throws IOException {
        ModelSpec spec = spec(false, 2, true, true);
        List<Double> expected = run(reference(spec, GLOBAL_MICRO), STEPS);
        Path ckpt = dir.resolve("ep2");
        List<List<Double>> first = world(spec, 4, 2, null, FIRST, ckpt);
        for (int i = 0; i < FIRST; i++) assertEquals(expected.get(i), first.get(0).get(i), 1e-9 * expected.get(i));
        // ranks 0 and 1 hold the two halves of the experts; ranks 2 and 3 hold copies and write nothing
        assertTrue(Files.isRegularFile(ckpt.resolve(ShardedCheckpoint.COMMON)));
        assertTrue(Files.isRegularFile(ckpt.resolve("experts-s" + FIRST + "-r0.safetensors")));
        assertTrue(Files.isRegularFile(ckpt.resolve("experts-s" + FIRST + "-r1.safetensors")));
        assertFalse(Files.exists(ckpt.resolve("experts-s" + FIRST + "-r2.safetensors")));

        assertContinues(expected, single(spec, ckpt, STEPS - FIRST, null), "world 1");
        for (List<Double> l : world(spec, 2, 2, ckpt, STEPS - FIRST, null)) assertContinues(expected, l, "world 2 ep 2");
        for (List<Double> l : world(spec, 4, 4, ckpt, STEPS - FIRST, null)) assertContinues(expected, l, "world 4 ep 4");
    }

    @Test
    void savedByOneProcessLoadsIntoAWorldOf4AtEp4(@TempDir Path dir) throws IOException {
        ModelSpec spec = spec(true, 1, false, true);
        List<Double> expected = run(reference(spec, GLOBAL_MICRO), STEPS);
        Path ckpt = dir.resolve("single");
        List<Double> first = single(spec, null, FIRST, ckpt);
        assertEquals(expected.subList(0, FIRST), first);
        for (List<Double> l : world(spec, 4, 4, ckpt, STEPS - FIRST, null)) assertContinues(expected, l, "world 4 ep 4");
    }

    @Test
    void theSingleFileCheckpointRefusesShardsAndLoadsAWholeModelIntoExpertParallelRanks(@TempDir Path dir) throws IOException {
        // the single-file Checkpoint refuses to save a shard (it would look like a whole model), and names the fix
        ModelSpec spec = spec(true, 1, false, false);
        var e = assertThrows(CommunicationException.class, () -> InProcessWorld.run(2, comm -> {
            try (ProcessGroups groups = new ProcessGroups(comm)) {
                Trainer t = trainer(new ModelContext(comm.backend(), DType.F64, SEED), spec, groups, 2, 2);
                Checkpoint.save(dir.resolve("c.safetensors"), t, CONFIG, Map.of());
                return null;
            }
        }));
        assertTrue(e.getCause().getMessage().contains("ShardedCheckpoint"), e.getCause().getMessage());
        // a whole single-process checkpoint loads into expert-parallel ranks (each takes its rows)
        Trainer t = reference(spec, GLOBAL_MICRO);
        List<Double> expected = run(t, FIRST);
        Path file = dir.resolve("whole.safetensors");
        Checkpoint.save(file, t, CONFIG, Map.of());
        expected = new java.util.ArrayList<>(expected);
        expected.addAll(run(t, STEPS - FIRST));
        List<Double> exp = expected;
        List<List<Double>> got = InProcessWorld.run(4, comm -> {
            try (ProcessGroups groups = new ProcessGroups(comm)) {
                Trainer r = trainer(new ModelContext(comm.backend(), DType.F64, SEED), spec, groups, 4, 1);
                Checkpoint.load(file, r, CONFIG);
                return run(r, STEPS - FIRST);
            }
        });
        for (List<Double> l : got) assertContinues(exp, l, "whole file into world 4 ep 4");
    }

    @Test
    void aMissingExpertFileOrAnotherConfigIsAClearError(@TempDir Path dir) throws IOException {
        ModelSpec spec = spec(true, 1, false, false);
        Path ckpt = dir.resolve("c");
        world(spec, 2, 2, null, 1, ckpt);
        var cfg = assertThrows(IllegalArgumentException.class, () -> ShardedCheckpoint.load(ckpt, reference(spec, GLOBAL_MICRO), "{\"other\":1}"));
        assertTrue(cfg.getMessage().contains("another configuration"), cfg.getMessage());
        Files.delete(ckpt.resolve("experts-s1-r1.safetensors"));
        var missing = assertThrows(IOException.class, () -> ShardedCheckpoint.load(ckpt, reference(spec, GLOBAL_MICRO), CONFIG));
        assertTrue(missing.getMessage().contains("experts-s1-r1.safetensors") && missing.getMessage().contains("missing"), missing.getMessage());
        assertThrows(IOException.class, () -> ShardedCheckpoint.load(dir.resolve("nothing"), reference(spec, GLOBAL_MICRO), CONFIG));
    }

    @Test
    void savingAgainReplacesTheOlderExpertFiles(@TempDir Path dir) throws IOException {
        ModelSpec spec = spec(true, 1, false, false);
        Path ckpt = dir.resolve("c");
        world(spec, 2, 2, null, 1, ckpt);
        single(spec, ckpt, 2, ckpt);   // loads step 1, trains to step 3, saves into the same directory
        try (var files = Files.list(ckpt)) {
            List<String> names = files.map(p -> p.getFileName().toString()).filter(n -> n.startsWith("experts-")).sorted().toList();
            assertEquals(List.of("experts-s3-r0.safetensors"), names);
        }
    }

    @Test
    void savedByAWorldOf8AtEp8LoadsIntoAWorldOf2AtEp2(@TempDir Path dir) {
        ModelSpec spec = spec(false, 1, false, true);
        List<Double> expected = run(reference(spec, 8), STEPS);
        Path ckpt = dir.resolve("w8");
        List<List<Double>> first = world(spec, 8, 8, 8, null, FIRST, ckpt);
        for (int i = 0; i < FIRST; i++) assertEquals(expected.get(i), first.get(3).get(i), 1e-9 * expected.get(i));
        for (List<Double> l : world(spec, 2, 2, 8, ckpt, STEPS - FIRST, null)) assertContinues(expected, l, "world 2 ep 2 from world 8 ep 8");
    }
}
