package dev.moe4j.examples;

import com.fasterxml.jackson.core.JsonProcessingException;
import com.fasterxml.jackson.databind.ObjectMapper;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.backend.Backends;
import dev.moe4j.core.nn.Gpt;
import dev.moe4j.core.nn.GptConfig;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.nn.Presets;
import dev.moe4j.core.optim.AdamW;
import dev.moe4j.core.optim.CosineSchedule;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.train.Checkpoint;
import dev.moe4j.core.train.StepMetrics;
import dev.moe4j.core.train.Trainer;
import me.tongfei.progressbar.ProgressBar;
import me.tongfei.progressbar.ProgressBarBuilder;
import me.tongfei.progressbar.ProgressBarStyle;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;
import picocli.CommandLine.Parameters;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.Callable;

/** Trains a GPT language model from a text file (or the bundled corpus) or token shards. */
@Command(name = "train", mixinStandardHelpOptions = true, sortOptions = false,
        description = "Train a GPT model. With no data argument it trains on the bundled tiny-Shakespeare corpus.")
final class TrainCommand implements Callable<Integer> {
    @Parameters(arity = "0..1", paramLabel = "TEXT_FILE", description = "UTF-8 text to train on (default: bundled tiny Shakespeare).")
    Path text;

    @Option(names = "--shards", split = ",", paramLabel = "FILE", description = "Pre-tokenized uint16 token shards (nanoGPT .bin) instead of text.")
    List<Path> shards;

    @Option(names = "--vocab", paramLabel = "vocab.json", description = "GPT-2 BPE vocabulary (with --merges); default: byte-level tokens.")
    Path vocab;

    @Option(names = "--merges", paramLabel = "merges.txt", description = "GPT-2 BPE merges (with --vocab).")
    Path merges;

    @Option(names = "--vocab-size", description = "Vocabulary size for --shards (default: 50304 GPT-2 padded).", defaultValue = "50304")
    int shardVocabSize;

    @Option(names = "--preset", defaultValue = "tiny", description = "Model shape: ${COMPLETION-CANDIDATES}.", completionCandidates = PresetNames.class)
    String preset;

    @Option(names = "--steps", defaultValue = "400", description = "Optimizer steps (default ${DEFAULT-VALUE}).")
    int steps;

    @Option(names = "--batch-size", defaultValue = "16", description = "Sequences per micro-batch (default ${DEFAULT-VALUE}).")
    int batchSize;

    @Option(names = "--seq-len", defaultValue = "64", description = "Tokens per sequence (default ${DEFAULT-VALUE}).")
    int seqLen;

    @Option(names = "--grad-accum", defaultValue = "1", description = "Micro-batches per optimizer step (default ${DEFAULT-VALUE}).")
    int gradAccum;

    @Option(names = "--lr", defaultValue = "3e-3", description = "Peak learning rate (default ${DEFAULT-VALUE}).")
    float lr;

    @Option(names = "--min-lr", defaultValue = "3e-4", description = "Final learning rate of the cosine schedule (default ${DEFAULT-VALUE}).")
    float minLr;

    @Option(names = "--warmup", defaultValue = "40", description = "Warmup steps (default ${DEFAULT-VALUE}).")
    int warmup;

    @Option(names = "--weight-decay", defaultValue = "0.1", description = "AdamW weight decay on matrices (default ${DEFAULT-VALUE}).")
    float weightDecay;

    @Option(names = "--clip", defaultValue = "1.0", description = "Global gradient-norm clip, <= 0 for none (default ${DEFAULT-VALUE}).")
    float clip;

    @Option(names = "--seed", defaultValue = "1234", description = "Seed of initialisation and batch sampling (default ${DEFAULT-VALUE}).")
    long seed;

    @Option(names = "--eval-every", defaultValue = "100", description = "Validation every N steps (default ${DEFAULT-VALUE}).")
    int evalEvery;

    @Option(names = "--eval-batches", defaultValue = "16", description = "Validation batches (default ${DEFAULT-VALUE}).")
    int evalBatches;

    @Option(names = "--out", defaultValue = "runs/default", description = "Run folder: checkpoint.safetensors and metrics.jsonl (default ${DEFAULT-VALUE}).")
    Path out;

    @Option(names = "--checkpoint-every", defaultValue = "100", description = "Save a checkpoint every N steps and at the end (default ${DEFAULT-VALUE}).")
    int checkpointEvery;

    @Option(names = "--resume", description = "Continue from the run folder's checkpoint.")
    boolean resume;

    @Option(names = "--backend", defaultValue = "auto", description = "cpu, cuda or auto (default ${DEFAULT-VALUE}).")
    String backendName;

    @Option(names = "--dtype", description = "f32 or bf16 (default: bf16 on a GPU, f32 on the CPU).")
    String dtypeName;

    @Option(names = "--no-progress", description = "Print one line per evaluation instead of a progress bar.")
    boolean noProgress;

    static final class PresetNames implements Iterable<String> {
        @Override public java.util.Iterator<String> iterator() { return Presets.names().iterator(); }
    }

    /** What a checkpoint must agree with to be resumed (model shape, dtype, data and tokenizer). */
    record RunConfig(GptConfig model, String dtype, String data) {}

    @Override
    public Integer call() throws IOException {
        validate();
        DataSetup.Prepared data = DataSetup.prepare(text, shards, vocab, merges, shardVocabSize, batchSize, seqLen, gradAccum, seed);
        GptConfig cfg = Presets.withVocab(Presets.dense(preset), data.vocabSize(), seqLen);
        try (Backend backend = Backends.create(backendName)) {
            DType dtype = dtypeName == null ? (backend.name().startsWith("cpu") ? DType.F32 : DType.BF16) : parseDType(dtypeName);
            ModelContext ctx = new ModelContext(backend, dtype, seed);
            Gpt model = new Gpt(ctx, cfg);
            ctx.allocateParameters();
            AdamW opt = new AdamW(ctx.params(), 0.9f, 0.95f, 1e-8f, weightDecay, clip);
            Trainer trainer = new Trainer(model, opt, data.source(), new CosineSchedule(lr, minLr, warmup, steps), gradAccum);
            String configJson = configJson(new RunConfig(cfg, dtype.name(), data.description()));
            Path ckpt = out.resolve("checkpoint.safetensors");
            if (resume) {
                Checkpoint.load(ckpt, trainer, configJson);
                System.out.printf("resumed from %s at step %d%n", ckpt, trainer.step());
            } else if (Files.exists(ckpt)) {
                throw new IllegalArgumentException(ckpt + " exists: pass --resume to continue it, or choose another --out");
            }
            System.out.printf("model %s: %d layers, hidden %d, %d heads, vocabulary %d, %,d parameters, %s on %s%n", preset,
                    cfg.layers(), cfg.hidden(), cfg.heads(), cfg.vocabSize(), ctx.params().count(), dtype, backend.name());
            System.out.printf("data  %s: %,d training and %,d validation tokens; unigram entropy %.3f nats%n",
                    data.description(), data.trainTokens(), data.validationTokens(), data.unigramEntropy());
            return train(trainer, ckpt, configJson, data.unigramEntropy());
        }
    }

    private int train(Trainer trainer, Path ckpt, String configJson, double unigram) throws IOException {
        double lastVal = Double.NaN;
        long tokens = 0;
        double seconds = 0;
        try (MetricsLog log = new MetricsLog(out.resolve("metrics.jsonl"), resume);
             ProgressBar bar = noProgress ? null : new ProgressBarBuilder().setTaskName("train").setInitialMax(steps)
                     .setStyle(ProgressBarStyle.ASCII).continuousUpdate().build()) {
            if (bar != null) bar.stepTo(trainer.step());
            while (trainer.step() < steps) {
                StepMetrics m = trainer.trainStep();
                tokens += m.tokens();
                seconds += m.seconds();
                Map<String, Object> rec = new LinkedHashMap<>();
                rec.put("step", m.step());
                rec.put("loss", m.loss());
                rec.put("aux_loss", m.auxLoss());
                rec.put("grad_norm", m.gradNorm());
                rec.put("lr", m.lr());
                rec.put("tokens_per_s", m.tokensPerSecond());
                rec.put("skipped", m.skipped());
                if (m.skipped()) System.err.printf("step %d: loss %s / gradient norm %s is not finite; update skipped%n", m.step(), m.loss(), m.gradNorm());
                int done = trainer.step();
                if (done % evalEvery == 0 || done == steps) {
                    lastVal = trainer.validationLoss(evalBatches);
                    rec.put("val_loss", lastVal);
                    if (bar == null) System.out.printf("step %5d  loss %.4f  val %.4f  %.0f tok/s%n", done, m.loss(), lastVal, m.tokensPerSecond());
                }
                log.write(rec);
                if (bar != null) {
                    bar.stepTo(done);
                    bar.setExtraMessage(String.format(Locale.ROOT, "loss %.3f val %.3f %.0f tok/s", m.loss(), lastVal, m.tokensPerSecond()));
                }
                if (done % checkpointEvery == 0 || done == steps) Checkpoint.save(ckpt, trainer, configJson, Map.of());
            }
        }
        System.out.printf(Locale.ROOT, "done: step %d, validation loss %.4f nats (unigram entropy %.4f), %.0f tokens/s, checkpoint %s%n",
                trainer.step(), lastVal, unigram, seconds > 0 ? tokens / seconds : 0, ckpt);
        return 0;
    }

    private void validate() {
        positive("--steps", steps);
        positive("--batch-size", batchSize);
        positive("--seq-len", seqLen);
        positive("--grad-accum", gradAccum);
        positive("--eval-every", evalEvery);
        positive("--eval-batches", evalBatches);
        positive("--checkpoint-every", checkpointEvery);
        if (warmup < 0) throw new IllegalArgumentException("--warmup must be >= 0, got " + warmup);
        if ((vocab == null) != (merges == null)) throw new IllegalArgumentException("--vocab and --merges must be given together");
        if (shards != null && text != null) throw new IllegalArgumentException("give either TEXT_FILE or --shards, not both");
    }

    private static void positive(String name, int v) {
        if (v <= 0) throw new IllegalArgumentException(name + " must be > 0, got " + v);
    }

    private static DType parseDType(String s) {
        return switch (s.toLowerCase(Locale.ROOT)) {
            case "f32", "fp32", "float32" -> DType.F32;
            case "bf16", "bfloat16" -> DType.BF16;
            default -> throw new IllegalArgumentException("--dtype must be f32 or bf16, got " + s);
        };
    }

    private static String configJson(RunConfig c) {
        try {
            return new ObjectMapper().writeValueAsString(c);
        } catch (JsonProcessingException e) {
            throw new IllegalStateException(e);
        }
    }
}
