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
    void bf16GradientsTrainAnMoEModel(@TempDir Path dir) throws IOException {
        Path out = dir.resolve("run");
        Result r = run(tiny(out, "--steps", "3", "--experts", "4", "--dtype", "bf16", "--grad-dtype", "bf16"));
        assertEquals(0, r.code(), r.err());
        List<String> lines = Files.readAllLines(out.resolve("metrics.jsonl"));
        assertEquals(3, lines.size());
        for (String line : lines) assertTrue(Double.isFinite(new ObjectMapper().readTree(line).get("loss").asDouble()), line);
    }

    @Test
    void moeRunLogsRoutingAndAStudentDistilsFromIt(@TempDir Path dir) throws IOException {
        Path teacher = dir.resolve("teacher"), student = dir.resolve("student");
        assertEquals(0, run(tiny(teacher, "--steps", "3", "--experts", "4", "--top-k", "2")).code());
        ObjectMapper json = new ObjectMapper();
        JsonNode last = json.readTree(Files.readAllLines(teacher.resolve("metrics.jsonl")).get(2));
        JsonNode moe = last.get("moe").get(0);
        assertEquals(1, moe.get("layer").asInt(), "micro has 2 layers: MoE on the second with --moe-every 2");
        int routed = 0;
        for (JsonNode c : moe.get("tokens_per_expert")) routed += c.asInt();
        assertEquals(4 * 16 * 2, routed, "every token's two choices are counted");
        assertTrue(last.get("aux_loss").asDouble() > 0);

        Result r = run(tiny(student, "--steps", "4", "--layers", "1", "--teacher", teacher.resolve("checkpoint.safetensors").toString(),
                "--kd-stop-step", "2"));
        assertEquals(0, r.code(), r.err());
        List<String> lines = Files.readAllLines(student.resolve("metrics.jsonl"));
        for (int i = 0; i < 4; i++) {
            JsonNode n = json.readTree(lines.get(i));
            assertEquals(i < 2, n.has("kd_loss"), "KD term on before step 2 and off after, step " + i);
        }
    }

    @Test
    void inProcessExpertParallelRanksMatchOneProcessOnTheSameGlobalBatch(@TempDir Path dir) throws IOException {
        Path single = dir.resolve("single"), ranks = dir.resolve("ranks");
        assertEquals(0, run(tiny(single, "--steps", "4", "--experts", "4", "--grad-accum", "4")).code());
        Result r = run(tiny(ranks, "--steps", "2", "--experts", "4", "--ranks", "4", "--ep", "2", "--node-size", "2"));
        assertEquals(0, r.code(), r.err());
        assertTrue(Files.exists(ranks.resolve("checkpoint").resolve("common.safetensors")), "expert-sharded checkpoint");
        Result resumed = run(tiny(ranks, "--steps", "4", "--experts", "4", "--ranks", "4", "--ep", "2", "--node-size", "2", "--resume"));
        assertEquals(0, resumed.code(), resumed.err());
        ObjectMapper json = new ObjectMapper();
        List<String> a = Files.readAllLines(single.resolve("metrics.jsonl")), b = Files.readAllLines(ranks.resolve("metrics.jsonl"));
        assertEquals(4, b.size());
        for (int i = 0; i < 4; i++) {
            double la = json.readTree(a.get(i)).get("loss").asDouble(), lb = json.readTree(b.get(i)).get("loss").asDouble();
            assertEquals(la, lb, 1e-5 * Math.abs(la), "step " + i + ": 4 ranks at EP=2 (hierarchical, resumed at step 2) vs one process");
        }
        // The last step logs every rank's expert load (its own 4 x 16 tokens, top-1) and its time in all-to-alls.
        JsonNode ranksLog = json.readTree(b.get(3)).get("ranks");
        assertEquals(4, ranksLog.size());
        for (JsonNode rank : ranksLog) {
            int tokens = 0;
            for (JsonNode c : rank.get("tokens_per_expert").get(0)) tokens += c.asInt();
            assertEquals(64, tokens, "rank " + rank.get("rank") + " routes each of its tokens once");
            assertTrue(rank.get("all_to_all_s").asDouble() > 0, "time in the expert-parallel collectives");
        }
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

        Result moeFlagOnDense = run(tiny(dir.resolve("r4"), "--top-k", "2"));
        assertEquals(1, moeFlagOnDense.code());
        assertTrue(moeFlagOnDense.err().contains("MoE options need an MoE model"), moeFlagOnDense.err());

        Result badK = run(tiny(dir.resolve("r5"), "--experts", "2", "--top-k", "3"));
        assertEquals(1, badK.code());
        assertTrue(badK.err().contains("k"), badK.err());

        Result badEp = run(tiny(dir.resolve("r6"), "--experts", "4", "--ranks", "4", "--ep", "3"));
        assertEquals(1, badEp.code());
        assertTrue(badEp.err().contains("--ep (3) must divide --ranks (4)"), badEp.err());
        Result badNode = run(tiny(dir.resolve("r7"), "--experts", "4", "--ranks", "4", "--ep", "2", "--node-size", "4"));
        assertEquals(1, badNode.code());
        assertTrue(badNode.err().contains("--node-size must be 0 (flat) or divide --ep (2)"), badNode.err());

        Result badGradDType = run(tiny(dir.resolve("r8"), "--grad-dtype", "fp16"));
        assertEquals(1, badGradDType.code());
        assertTrue(badGradDType.err().contains("--grad-dtype must be f32 or bf16, got fp16"), badGradDType.err());
        Result bf16GradsOfF32Model = run(tiny(dir.resolve("r9"), "--dtype", "f32", "--grad-dtype", "bf16"));
        assertEquals(1, bf16GradsOfF32Model.code());
        assertTrue(bf16GradsOfF32Model.err().contains("gradient dtype BF16 does not fit model dtype F32"), bf16GradsOfF32Model.err());

        Result badSteps = run(tiny(dir.resolve("r3"), "--steps", "0"));
        assertEquals(1, badSteps.code());
        assertTrue(badSteps.err().contains("--steps must be > 0, got 0"), badSteps.err());

        // Last: on a machine with NCCL and a GPU this case is not an error, and the rest is skipped.
        Result noNccl = run(tiny(dir.resolve("r7"), "--distributed"));
        org.junit.jupiter.api.Assumptions.assumeTrue(noNccl.code() != 0, "this machine has NCCL and a GPU");
        assertEquals(1, noNccl.code());
        assertTrue(noNccl.err().contains("cannot load NCCL"), noNccl.err());
    }

    @Test
    void nodeSizeDefaultsToOneNodeWhenExpertGroupsSpanNodes() {
        assertEquals(8, TrainCommand.autoNodeSize(16, 8));   // 2 nodes of 8, EP 16: hierarchical
        assertEquals(0, TrainCommand.autoNodeSize(8, 8));    // a group inside one node: flat
        assertEquals(0, TrainCommand.autoNodeSize(2, 8));
        assertEquals(0, TrainCommand.autoNodeSize(12, 8));   // not whole nodes: flat
        assertEquals(4, TrainCommand.autoNodeSize(8, 4));
    }
}
