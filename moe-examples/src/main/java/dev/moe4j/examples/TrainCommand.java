package dev.moe4j.examples;

import com.fasterxml.jackson.databind.ObjectMapper;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.backend.Backends;
import dev.moe4j.core.model.MoESettings;
import dev.moe4j.core.model.ModelSpec;
import dev.moe4j.core.model.Models;
import dev.moe4j.core.model.Presets;
import dev.moe4j.core.nn.GptConfig;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.optim.AdamW;
import dev.moe4j.core.optim.CosineSchedule;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.comm.HierarchicalCommunicator;
import dev.moe4j.comm.InProcessWorld;
import dev.moe4j.comm.nccl.NcclCommunicator;
import dev.moe4j.comm.rendezvous.DistributedEnv;
import dev.moe4j.core.comm.CommOptions;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.comm.ProcessGroups;
import dev.moe4j.core.comm.TimedCommunicator;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.train.BatchSource;
import dev.moe4j.core.train.Checkpoint;
import dev.moe4j.core.train.GradientSync;
import dev.moe4j.core.train.ShardedCheckpoint;
import dev.moe4j.core.train.RoutingStats;
import dev.moe4j.core.train.StepMetrics;
import dev.moe4j.core.train.Teacher;
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
import java.util.ArrayList;
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

    @Option(names = "--preset", defaultValue = "tiny-moe", description = "Model shape (default ${DEFAULT-VALUE}: GPT-MoE, 8 experts top-1 on every other layer): ${COMPLETION-CANDIDATES}.", completionCandidates = PresetNames.class)
    String preset;

    @Option(names = "--layers", description = "Override the preset's number of layers (e.g. a shallower Mixture-of-Students student).")
    Integer layers;

    @Option(names = "--experts", description = "Make the model GPT-MoE with this many experts per MoE layer (or override the preset's).")
    Integer experts;

    @Option(names = "--moe-every", defaultValue = "2", description = "With --experts or --pyramid: MoE on every N-th layer (default ${DEFAULT-VALUE}).")
    int moeEvery;

    @Option(names = "--moe-layers", split = ",", description = "With --experts: MoE on exactly these layers (0-based), instead of --moe-every.")
    List<Integer> moeLayers;

    @Option(names = "--pyramid", paramLabel = "EXPERTSxLAYERS,...", description = "PR-MoE expert counts per MoE layer, e.g. 32x10,64x2.")
    String pyramid;

    @Option(names = "--top-k", description = "Experts per token (DeepSpeed k; default 1).")
    Integer topK;

    @Option(names = "--capacity-factor", description = "Training capacity factor (default 1.0).")
    Double capacityFactor;

    @Option(names = "--residual", negatable = true, description = "Residual-MoE: a dense MLP beside the experts.")
    Boolean residual;

    @Option(names = "--dropless", negatable = true, description = "Dropless routing: no capacity, variable-size expert batches.")
    Boolean dropless;

    @Option(names = "--noisy-gate", description = "Jitter or RSample.")
    String noisyGate;

    @Option(names = "--aux-loss-coeff", description = "Load-balancing loss coefficient (default 0.01).")
    Double auxLossCoeff;

    @Option(names = "--zloss-coeff", description = "Router z-loss coefficient (default 0: off).")
    Double zLossCoeff;

    @Option(names = "--teacher", paramLabel = "CHECKPOINT", description = "Mixture-of-Students: distil from this trained checkpoint.")
    Path teacher;

    @Option(names = "--kd-alpha", defaultValue = "1.0", description = "Weight of the hard-label cross-entropy with --teacher (default ${DEFAULT-VALUE}).")
    float kdAlpha;

    @Option(names = "--kd-beta", defaultValue = "1.0", description = "Weight of the distillation KL with --teacher (default ${DEFAULT-VALUE}).")
    float kdBeta;

    @Option(names = "--kd-temperature", defaultValue = "1.0", description = "Distillation temperature (default ${DEFAULT-VALUE}).")
    float kdTemperature;

    @Option(names = "--kd-stop-step", description = "Staged KD: switch the KL term off from this step on (default: never).")
    Integer kdStopStep;

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

    @Option(names = "--ranks", defaultValue = "1", description = "Train with N in-process ranks (threads, one backend each) in expert + data parallelism (default ${DEFAULT-VALUE}).")
    int ranks;

    @Option(names = "--distributed", description = "One process per GPU over NCCL, ranks from the environment (torchrun, srun, mpirun or "
            + "dev.moe4j.comm.launch.Launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).")
    boolean distributed;

    @Option(names = "--ep", defaultValue = "1", description = "Expert-parallel degree with --ranks: experts of each MoE layer spread over groups of this many ranks (default ${DEFAULT-VALUE}).")
    int ep;

    @Option(names = "--node-size", defaultValue = "-1", description = "Hierarchical all-to-all in the expert-parallel groups with this many ranks "
            + "per node (0: flat). Default: with --distributed, LOCAL_WORLD_SIZE when an expert-parallel group spans several nodes, else flat.")
    int nodeSize;

    @Option(names = "--backend", defaultValue = "auto", description = "cpu, cuda or auto (default ${DEFAULT-VALUE}).")
    String backendName;

    @Option(names = "--dtype", description = "f32 or bf16 (default: bf16 on a GPU, f32 on the CPU).")
    String dtypeName;

    @Option(names = "--grad-dtype", defaultValue = "f32", description = "Gradient storage, f32 or bf16 (bf16 needs --dtype bf16; default ${DEFAULT-VALUE}).")
    String gradDtypeName;

    @Option(names = "--no-progress", description = "Print one line per evaluation instead of a progress bar.")
    boolean noProgress;

    private static final ObjectMapper JSON = new ObjectMapper();

    static final class PresetNames implements Iterable<String> {
        @Override public java.util.Iterator<String> iterator() { return Presets.names().iterator(); }
    }

    /** What a checkpoint must agree with to be resumed (model, dtype, data and tokenizer). */
    record RunConfig(ModelSpec model, String dtype, String data) {}

    @Override
    public Integer call() throws IOException {
        validate();
        // The global source hands out worldSize * gradAccum micro-batches per step; each rank takes its share.
        DataSetup.Prepared data = DataSetup.prepare(text, shards, vocab, merges, shardVocabSize, batchSize, seqLen, gradAccum * worldSize(), seed);
        ModelSpec spec = modelSpec(data.vocabSize());
        if (distributed) {
            // One process per GPU, started by torchrun / srun / mpirun / our Launcher: NCCL between the processes.
            DistributedEnv env = DistributedEnv.fromEnvironment();
            try (Backend backend = Backends.select(backendName).create(env.localRank());
                 Communicator world = NcclCommunicator.create(backend, env, CommOptions.defaults())) {
                return run(backend, world, data, spec);
            }
        }
        if (ranks == 1) {
            try (Backend backend = Backends.create(backendName)) {
                return run(backend, null, data, spec);
            }
        }
        // In-process ranks: one thread and one backend each, tokens and gradients exchanged by the in-process
        // communicator; each rank trains on its share of the same global batch.
        List<Integer> codes = InProcessWorld.run(ranks, CommOptions.defaults(), r -> Backends.create(backendName),
                world -> run(world.backend(), world, data, spec));
        return codes.get(0);
    }

    /** One rank's run ({@code world} null: a single process). Only rank 0 prints, logs and shows progress. */
    private int run(Backend backend, Communicator world, DataSetup.Prepared data, ModelSpec spec) throws IOException {
        boolean lead = world == null || world.rank() == 0;
        GptConfig cfg = spec.gpt();
        DType dtype = dtypeName == null ? (backend.name().startsWith("cpu") ? DType.F32 : DType.BF16) : parseDType("--dtype", dtypeName);
        List<TimedCommunicator> expertGroups = new ArrayList<>();
        List<HierarchicalCommunicator> hierarchical = new ArrayList<>();
        int node = nodeSize();
        try (ProcessGroups groups = world == null ? null : new ProcessGroups(world)) {
            ModelContext ctx = new ModelContext(backend, dtype, seed);
            ctx.setGradDType(parseDType("--grad-dtype", gradDtypeName));
            Models.Built built;
            if (groups == null) built = Models.build(ctx, spec);
            else built = Models.build(ctx, spec, e -> Math.min(ep, e), g -> {
                // Each MoE layer's expert-parallel group, flat or hierarchical, timed for the per-rank log.
                Communicator c = groups.expertParallel(g);
                if (node > 0) {
                    HierarchicalCommunicator h = new HierarchicalCommunicator(c, node);
                    hierarchical.add(h);
                    c = h;
                }
                TimedCommunicator t = new TimedCommunicator(c);
                expertGroups.add(t);
                return t;
            });
            ctx.allocateParameters();
            AdamW opt = new AdamW(ctx.params(), 0.9f, 0.95f, 1e-8f, weightDecay, clip);
            BatchSource source = world == null ? data.source() : BatchSource.rankShare(data.source(), world.rank(), world.size());
            Trainer trainer = new Trainer(built.gpt(), opt, source, new CosineSchedule(lr, minLr, warmup, steps), gradAccum);
            trainer.setMoELayers(built.moeLayers());
            if (groups != null) trainer.setGradientSync(new GradientSync(ctx.params(), groups));
            String configJson = JSON.writeValueAsString(new RunConfig(spec, dtype.name(), data.description()));
            if (teacher != null) trainer.setTeacher(loadTeacher(backend, dtype, data, lead));
            Checkpointer ckpt = groups == null ? new Checkpointer(out.resolve("checkpoint.safetensors"), null) : new Checkpointer(out.resolve("checkpoint"), groups);
            if (resume) {
                ckpt.load(trainer, configJson);
                if (lead) System.out.printf("resumed from %s at step %d%n", ckpt.path(), trainer.step());
            } else if (Files.exists(ckpt.path())) {
                throw new IllegalArgumentException(ckpt.path() + " exists: pass --resume to continue it, or choose another --out");
            }
            if (lead) {
                System.out.printf("model %s: %d layers, hidden %d, %d heads, vocabulary %d, %,d parameters%s, %s (%s gradients) on %s%n", spec.name(),
                        cfg.layers(), cfg.hidden(), cfg.heads(), cfg.vocabSize(), ctx.params().count(), world == null ? "" : " on rank 0", dtype,
                        ctx.gradDType(), backend.name());
                if (world != null) System.out.printf("ranks %d %s, expert parallel %d, %s all-to-all%n", world.size(), distributed ? "over NCCL" : "in-process", ep, node > 0 ? "hierarchical (node size " + node + ")" : "flat");
                if (spec.hasMoELayers()) {
                    MoESettings m = spec.moe();
                    System.out.printf("moe   experts per layer %s, top-%d, capacity factor %.2f%s%s, aux coefficient %.3g%n", m.expertsPerLayer(), m.k(),
                            m.capacityFactor(), m.dropless() ? ", dropless" : "", m.useResidual() ? ", residual" : "", m.auxLossCoeff());
                }
                System.out.printf("data  %s: %,d training and %,d validation tokens; unigram entropy %.3f nats%n",
                        data.description(), data.trainTokens(), data.validationTokens(), data.unigramEntropy());
            }
            return train(trainer, ckpt, configJson, data.unigramEntropy(), lead, world, expertGroups);
        } finally {
            for (HierarchicalCommunicator h : hierarchical) h.close();
        }
    }

    /** Where checkpoints go: one safetensors file for a single process, an expert-sharded folder for ranks. */
    private record Checkpointer(Path path, ProcessGroups groups) {
        void save(Trainer t, String configJson) throws IOException {
            if (groups == null) Checkpoint.save(path, t, configJson, Map.of());
            else ShardedCheckpoint.save(path, t, configJson, Map.of(), groups);
        }

        void load(Trainer t, String configJson) throws IOException {
            if (groups == null) Checkpoint.load(path, t, configJson);
            else ShardedCheckpoint.load(path, t, configJson);
        }
    }

    private int train(Trainer trainer, Checkpointer ckpt, String configJson, double unigram, boolean lead,
                      Communicator world, List<TimedCommunicator> expertGroups) throws IOException {
        double lastVal = Double.NaN;
        long tokens = 0;
        double seconds = 0;
        try (MetricsLog log = lead ? new MetricsLog(out.resolve("metrics.jsonl"), resume) : null;
             ProgressBar bar = noProgress || !lead ? null : new ProgressBarBuilder().setTaskName("train").setInitialMax(steps)
                     .setStyle(ProgressBarStyle.ASCII).continuousUpdate().build()) {
            if (bar != null) bar.stepTo(trainer.step());
            while (trainer.step() < steps) {
                boolean logRouting = (trainer.step() + 1) % evalEvery == 0 || trainer.step() + 1 == steps;
                StepMetrics m = trainer.trainStep(logRouting);
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
                if (m.kdLoss() != 0) rec.put("kd_loss", m.kdLoss());
                if (!m.routing().isEmpty()) rec.put("moe", routingRecords(m.routing()));
                if (world != null && logRouting) rec.put("ranks", perRank(world, m.routing(), expertGroups));   // a collective: every rank
                if (m.skipped() && lead) System.err.printf("step %d: loss %s / gradient norm %s is not finite; update skipped%n", m.step(), m.loss(), m.gradNorm());
                int done = trainer.step();
                if (done % evalEvery == 0 || done == steps) {
                    lastVal = trainer.validationLoss(evalBatches);   // on every rank: the MoE layers exchange tokens
                    rec.put("val_loss", lastVal);
                    if (bar == null && lead) System.out.printf("step %5d  loss %.4f  val %.4f  %.0f tok/s%n", done, m.loss(), lastVal, m.tokensPerSecond());
                }
                if (log != null) log.write(rec);
                if (bar != null) {
                    bar.stepTo(done);
                    bar.setExtraMessage(String.format(Locale.ROOT, "loss %.3f val %.3f %.0f tok/s", m.loss(), lastVal, m.tokensPerSecond()));
                }
                if (done % checkpointEvery == 0 || done == steps) ckpt.save(trainer, configJson);
            }
        }
        if (lead) System.out.printf(Locale.ROOT, "done: step %d, validation loss %.4f nats (unigram entropy %.4f), %.0f tokens/s, checkpoint %s%n",
                trainer.step(), lastVal, unigram, seconds > 0 ? tokens / seconds : 0, ckpt.path());
        return 0;
    }

    /** The preset with the command line's overrides (vocabulary and sequence length from the data). */
    private ModelSpec modelSpec(int vocabSize) {
        ModelSpec spec = Presets.get(preset).withVocab(vocabSize, seqLen);
        GptConfig g = spec.gpt();
        if (layers != null) {
            positive("--layers", layers);
            g = new GptConfig(g.vocabSize(), g.maxSeqLen(), layers, g.hidden(), g.heads(), g.ffnHidden(), g.activation());
            MoESettings m = spec.moe();
            if (m != null && experts == null && pyramid == null) {
                throw new IllegalArgumentException("--layers changes the depth of MoE preset " + preset + ": give --experts or --pyramid for the new layout");
            }
            spec = new ModelSpec(spec.name() + "-L" + layers, g, m);
        }
        MoESettings m = spec.moe();
        List<Integer> layout = null;
        if (pyramid != null) layout = MoESettings.pyramid(g.layers(), moeEvery, pyramid);
        else if (experts != null) {
            positive("--experts", experts);
            layout = moeLayers != null ? MoESettings.onLayers(g.layers(), moeLayers, experts) : MoESettings.every(g.layers(), moeEvery, experts);
        }
        if (layout != null) m = m == null ? MoESettings.defaults(layout) : m.withLayout(layout);
        boolean routingFlags = topK != null || capacityFactor != null || residual != null || dropless != null || noisyGate != null
                || auxLossCoeff != null || zLossCoeff != null;
        if (m == null) {
            if (routingFlags) throw new IllegalArgumentException("MoE options need an MoE model: give --experts N, --pyramid, or an MoE preset");
            return new ModelSpec(spec.name(), g, null);
        }
        m = new MoESettings(m.expertsPerLayer(), topK != null ? topK : m.k(), capacityFactor != null ? capacityFactor : m.capacityFactor(),
                m.evalCapacityFactor(), m.minCapacity(), residual != null ? residual : m.useResidual(), noisyGate != null ? noisyGate : m.noisyGatePolicy(),
                m.dropTokens(), m.useRts(), dropless != null ? dropless : m.dropless(), auxLossCoeff != null ? auxLossCoeff : m.auxLossCoeff(),
                zLossCoeff != null ? zLossCoeff : m.zLossCoeff(), m.sharedExperts());
        String name = spec.name() + (experts != null || pyramid != null ? "+moe" : "");
        return new ModelSpec(name, g, m);
    }

    /** Rebuilds the teacher from its checkpoint's stored configuration and loads its weights. */
    private Teacher loadTeacher(Backend backend, DType dtype, DataSetup.Prepared data, boolean lead) throws IOException {
        RunConfig tc = JSON.readValue(Checkpoint.readConfig(teacher), RunConfig.class);
        if (tc.model().gpt().vocabSize() != data.vocabSize()) {
            throw new IllegalArgumentException("teacher " + teacher + " has vocabulary " + tc.model().gpt().vocabSize() + " but the data has " + data.vocabSize());
        }
        ModelContext tctx = new ModelContext(backend, dtype, seed);
        Models.Built t = Models.build(tctx, tc.model());
        tctx.allocateParameters();
        Checkpoint.loadWeights(teacher, tctx.params());
        tctx.setTraining(false);
        if (lead) System.out.printf("teacher %s (%s, %,d parameters): alpha %.2f, beta %.2f, temperature %.2f, KD until step %s%n", teacher, tc.model().name(),
                tctx.params().count(), kdAlpha, kdBeta, kdTemperature, kdStopStep == null ? "the end" : kdStopStep);
        return new Teacher(t.gpt(), kdAlpha, kdBeta, kdTemperature, kdStopStep == null ? Integer.MAX_VALUE : kdStopStep);
    }

    /**
     * Every rank's expert load (its own tokens, per MoE layer) and host seconds in expert-parallel collectives
     * since the previous log line, gathered to all ranks (rank 0 logs them).
     */
    private static List<Map<String, Object>> perRank(Communicator world, List<RoutingStats> routing, List<TimedCommunicator> groups) {
        Backend b = world.backend();
        int p = world.size();
        double seconds = 0;
        for (TimedCommunicator t : groups) seconds += t.takeSeconds();
        int n = 0;
        for (RoutingStats r : routing) n += r.tokensPerExpert().length;
        int[] mine = new int[Math.max(n, 1)];
        int at = 0;
        for (RoutingStats r : routing) for (int c : r.tokensPerExpert()) mine[at++] = c;
        double[] allSeconds;
        int[] allCounts;
        try (Tensor s = b.fromFloats(DType.F32, new float[] {(float) seconds}, 1, 1); Tensor sAll = b.zeros(DType.F32, p, 1);
             Tensor c = b.fromInts(mine, 1, mine.length); Tensor cAll = b.zeros(DType.I32, p, mine.length)) {
            world.allGather(s, sAll);
            world.allGather(c, cAll);
            allSeconds = sAll.toDoubles();
            allCounts = cAll.toInts();
        }
        List<Map<String, Object>> list = new ArrayList<>();
        for (int r = 0; r < p; r++) {
            Map<String, Object> m = new LinkedHashMap<>();
            m.put("rank", r);
            m.put("all_to_all_s", allSeconds[r]);
            List<int[]> layers = new ArrayList<>();
            int o = r * mine.length;
            for (RoutingStats rs : routing) {
                int e = rs.tokensPerExpert().length;
                layers.add(java.util.Arrays.copyOfRange(allCounts, o, o + e));
                o += e;
            }
            m.put("tokens_per_expert", layers);
            list.add(m);
        }
        return list;
    }

    private static List<Map<String, Object>> routingRecords(List<RoutingStats> stats) {
        List<Map<String, Object>> list = new ArrayList<>();
        for (RoutingStats r : stats) {
            Map<String, Object> m = new LinkedHashMap<>();
            m.put("layer", r.block());
            m.put("tokens_per_expert", r.tokensPerExpert());
            m.put("dropped", r.droppedFraction());
            m.put("l_aux", r.lAux());
            list.add(m);
        }
        return list;
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
        positive("--ranks", ranks);
        positive("--ep", ep);
        if (distributed && ranks != 1) throw new IllegalArgumentException("--distributed takes its ranks from the environment; do not give --ranks");
        int world = worldSize();
        String what = distributed ? "the world size (" + world + ")" : "--ranks (" + ranks + ")";
        if (world % ep != 0) throw new IllegalArgumentException("--ep (" + ep + ") must divide " + what);
        if (nodeSize < -1 || (nodeSize > 0 && ep % nodeSize != 0)) {
            throw new IllegalArgumentException("--node-size must be 0 (flat) or divide --ep (" + ep + "), the size of the groups it splits into nodes, got " + nodeSize);
        }
    }

    /** The node size in effect: --node-size, or its default (see {@link #autoNodeSize}). */
    private int nodeSize() {
        if (nodeSize >= 0) return nodeSize;
        return distributed ? autoNodeSize(ep, DistributedEnv.fromEnvironment().localWorldSize()) : 0;
    }

    /**
     * The default node size of a --distributed run: hierarchical with the ranks of one node (LOCAL_WORLD_SIZE) when
     * an expert-parallel group of ep consecutive ranks spans whole nodes, else flat (a group inside one node gains
     * nothing from the extra transforms).
     */
    static int autoNodeSize(int ep, int localWorldSize) {
        return ep > localWorldSize && ep % localWorldSize == 0 ? localWorldSize : 0;
    }

    /** Ranks of this run: from the launcher's environment with --distributed, else --ranks. */
    private int worldSize() {
        return distributed ? DistributedEnv.fromEnvironment().worldSize() : ranks;
    }

    private static void positive(String name, int v) {
        if (v <= 0) throw new IllegalArgumentException(name + " must be > 0, got " + v);
    }

    private static DType parseDType(String option, String s) {
        return switch (s.toLowerCase(Locale.ROOT)) {
            case "f32", "fp32", "float32" -> DType.F32;
            case "bf16", "bfloat16" -> DType.BF16;
            default -> throw new IllegalArgumentException(option + " must be f32 or bf16, got " + s);
        };
    }

}
