package dev.moe4j.examples;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import picocli.CommandLine;

import java.io.IOException;
import java.io.PrintWriter;
import java.io.StringWriter;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

class TrainCommandTest {
    private record Result(int code, String err) {}

    private static Result run(String... args) {
        CommandLine cl = Main.commandLine();
        StringWriter err = new StringWriter();
        cl.setErr(new PrintWriter(err));
        int code = cl.execute(args);
        return new Result(code, err.toString());
    }

    private static String[] tiny(Path out, String... extra) {
        String[] base = {"train", "--backend", "cpu", "--preset", "micro", "--batch-size", "4", "--seq-len", "16",
                "--eval-every", "3", "--eval-batches", "2", "--checkpoint-every", "3", "--no-progress", "--out", out.toString()};
        String[] all = new String[base.length + extra.length];
        System.arraycopy(base, 0, all, 0, base.length);
        System.arraycopy(extra, 0, all, base.length, extra.length);
        return all;
    }

    @Test
    void trainsOnTheBundledCorpusWritesMetricsAndResumes(@TempDir Path dir) throws IOException {
        Path out = dir.resolve("run");
        assertEquals(0, run(tiny(out, "--steps", "3")).code());
        assertTrue(Files.exists(out.resolve("checkpoint.safetensors")));
        Result again = run(tiny(out, "--steps", "3"));
        assertEquals(1, again.code());
        assertTrue(again.err().contains("pass --resume"), again.err());
        assertEquals(0, run(tiny(out, "--steps", "6", "--resume")).code());
        List<String> lines = Files.readAllLines(out.resolve("metrics.jsonl"));
        assertEquals(6, lines.size(), "one JSON line per step across both runs");
        ObjectMapper json = new ObjectMapper();
        for (int i = 0; i < 6; i++) {
            JsonNode n = json.readTree(lines.get(i));
            assertEquals(i, n.get("step").asInt());
            assertTrue(Double.isFinite(n.get("loss").asDouble()));
        }
        assertTrue(json.readTree(lines.get(5)).has("val_loss"), "validation at the last step");
    }

    @Test
    void badInputsGiveAClearError(@TempDir Path dir) {
        Result unknown = run("train", "--no-such-option");
        assertEquals(2, unknown.code());
        assertTrue(unknown.err().contains("Unknown option: '--no-such-option'"), unknown.err());

        Result missing = run(tiny(dir.resolve("r"), dir.resolve("nope.txt").toString()));
        assertEquals(1, missing.code(), missing.err());
        assertTrue(missing.err().contains("nope.txt"), missing.err());

        Result badPreset = run("train", "--backend", "cpu", "--preset", "huge", "--out", dir.resolve("r2").toString());
        assertEquals(1, badPreset.code());
        assertTrue(badPreset.err().contains("unknown preset 'huge'"), badPreset.err());

        Result badSteps = run(tiny(dir.resolve("r3"), "--steps", "0"));
        assertEquals(1, badSteps.code());
        assertTrue(badSteps.err().contains("--steps must be > 0, got 0"), badSteps.err());
    }
}
