package dev.moe4j.comm.ep;

import dev.moe4j.comm.HierarchicalCommunicator;
import dev.moe4j.comm.InProcessWorld;
import dev.moe4j.comm.nccl.NcclCommunicator;
import dev.moe4j.comm.nccl.NcclLibrary;
import dev.moe4j.comm.rendezvous.DistributedEnv;
import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.backend.Backends;
import dev.moe4j.core.comm.CommOptions;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.comm.ProcessGroups;
import dev.moe4j.core.data.Batch;
import dev.moe4j.core.model.ModelSpec;
import dev.moe4j.core.model.Models;
import dev.moe4j.core.model.MoESettings;
import dev.moe4j.core.nn.GptConfig;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.optim.AdamW;
import dev.moe4j.core.optim.CosineSchedule;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.train.BatchSource;
import dev.moe4j.core.train.GradientSync;
import dev.moe4j.core.train.StepMetrics;
import dev.moe4j.core.train.Trainer;
import dev.moe4j.core.testing.BenchTiming;

import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import java.util.SplittableRandom;
import java.util.function.Consumer;
import java.util.function.IntFunction;

/**
 * Weak scaling of a GPT-MoE training step under expert + data parallelism (issue 7): the 1.3B+MoE-128 shape
 * (hidden 2048, 16 heads, FFN 8192, MoE on every other block, top-1, capacity factor 1.0) with a fixed number of
 * experts per GPU (default 16) and a fixed number of tokens per GPU (micro-batch 8 x 1024); at expert-parallel
 * degree E a MoE layer has 16 E experts spread over groups of E ranks, and the world is E-way expert parallel
 * times W/E-way data parallel. Each step is the full Trainer step (forward, backward, gradient all-reduce in the
 * expert-data-parallel and data-parallel groups, AdamW), timed with CUDA events on the backend's stream
 * ({@link BenchTiming}: warm-up steps, then the median). Rank 0 prints one JSON line per EP degree with tokens per
 * second per GPU; the efficiency is that figure over the same command's figure with a world of one.
 *
 * <pre>
 *   torchrun --no-python --nproc_per_node=8 java ... dev.moe4j.comm.ep.ScalingBench --ep 1,2,4,8 [--layers 12] [--node-size 4]
 *   java ... dev.moe4j.comm.ep.ScalingBench --ep 1            (no torchrun: a world of one GPU, the baseline)
 *   ScalingBench --smoke                                       (2 in-process CPU ranks, tiny shape: checks the path)
 * </pre>
 * Options: {@code --layers} (default 12: 24 layers of 16 experts do not fit one GPU with fp32 optimizer state),
 * {@code --experts-per-gpu}, {@code --micro-batch}, {@code --seq-len}, {@code --steps} (timed, default 10),
 * {@code --warmup} (default 3), {@code --node-size} (hierarchical all-to-all in the expert-parallel groups; 0 flat).
 */
public final class ScalingBench {
    private ScalingBench() {}

    record Options(List<Integer> eps, int layers, int hidden, int heads, int ffn, int vocab, int expertsPerGpu,
                   int microBatch, int seqLen, int steps, int warmup, int nodeSize, boolean smoke) {}

    static Options parse(String[] args) {
        List<Integer> eps = new ArrayList<>(List.of(1));
        int layers = 12, perGpu = 16, micro = 8, seq = 1024, steps = 10, warmup = 3, nodeSize = 0;
        boolean smoke = false;
        for (int i = 0; i < args.length; i++) {
            String a = args[i];
            if (a.equals("--smoke")) { smoke = true; continue; }
            if (i + 1 >= args.length) throw new IllegalArgumentException("ScalingBench: " + a + " needs a value");
            String v = args[++i];
            switch (a) {
                case "--ep" -> {
                    eps.clear();
                    for (String s : v.split(",")) eps.add(Integer.parseInt(s.trim()));
                }
                case "--layers" -> layers = Integer.parseInt(v);
                case "--experts-per-gpu" -> perGpu = Integer.parseInt(v);
                case "--micro-batch" -> micro = Integer.parseInt(v);
                case "--seq-len" -> seq = Integer.parseInt(v);
                case "--steps" -> steps = Integer.parseInt(v);
                case "--warmup" -> warmup = Integer.parseInt(v);
                case "--node-size" -> nodeSize = Integer.parseInt(v);
                default -> throw new IllegalArgumentException("ScalingBench: unknown option " + a);
            }
        }
        if (smoke) return new Options(List.of(1, 2), 2, 64, 4, 128, 256, 2, 2, 32, 1, 1, nodeSize, true);
        for (int e : eps) if (e < 1) throw new IllegalArgumentException("ScalingBench: --ep values must be >= 1, got " + e);
        if (layers < 2 || perGpu < 1 || micro < 1 || seq < 1 || steps < 1 || warmup < 0 || nodeSize < 0) {
            throw new IllegalArgumentException("ScalingBench: sizes must be positive (layers >= 2 for a MoE block)");
        }
        return new Options(eps, layers, 2048, 16, 8192, 50304, perGpu, micro, seq, steps, warmup, nodeSize, false);
    }

    public static void main(String[] args) throws Exception {
        Options o = parse(args);
        if (o.smoke) {
            System.out.println("ScalingBench smoke: 2 in-process CPU ranks, tiny shape, wall-clock timing");
            InProcessWorld.run(2, comm -> {
                bench(comm.backend(), comm, o, System.out::println);
                return null;
            });
            return;
        }
        int status = 0;
        if (System.getenv("WORLD_SIZE") == null) {
            try (Backend backend = Backends.select("cuda").create(0)) {
                bench(backend, null, o, System.out::println);
            }
            return;
        }
        DistributedEnv env = DistributedEnv.fromEnvironment();
        try {
            NcclLibrary.load();
            try (Backend backend = Backends.select("cuda").create(env.localRank());
                 NcclCommunicator comm = NcclCommunicator.create(backend, env, CommOptions.withTimeout(Duration.ofSeconds(300)))) {
                bench(backend, comm, o, System.out::println);
            }
        } catch (Throwable t) {
            System.err.println("ScalingBench rank " + env.rank() + " failed:");
            t.printStackTrace();
            status = 1;
        }
        System.exit(status);
    }

    /** Every EP degree of {@code o} in turn (world null: one process); rank 0 hands one JSON line each to {@code out}. */
    static void bench(Backend backend, Communicator world, Options o, Consumer<String> out) {
        int w = world == null ? 1 : world.size();
        for (int ep : o.eps) {
            if (w % ep != 0) throw new IllegalArgumentException("ScalingBench: --ep " + ep + " must divide the world size " + w);
            out.accept(run(backend, world, o, ep));
        }
    }

    private static String run(Backend backend, Communicator world, Options o, int ep) {
        int w = world == null ? 1 : world.size(), rank = world == null ? 0 : world.rank();
        int experts = o.expertsPerGpu * ep;
        GptConfig cfg = new GptConfig(o.vocab, o.seqLen, o.layers, o.hidden, o.heads, o.ffn, Activation.GELU);
        MoESettings moe = MoESettings.defaults(MoESettings.every(o.layers, 2, experts));
        ModelSpec spec = new ModelSpec("scaling-" + o.layers + "x" + o.hidden + "-E" + experts, cfg, moe);
        List<HierarchicalCommunicator> hierarchical = new ArrayList<>();
        ModelContext ctx = new ModelContext(backend, o.smoke ? DType.F32 : DType.BF16, 1234);
        ctx.setTraining(true);
        Models.Built built = null;
        try (ProcessGroups groups = world == null ? null : new ProcessGroups(world)) {
            Communicator[] epGroup = new Communicator[1];
            IntFunction<Communicator> expertGroup = groups == null ? null : g -> {
                if (epGroup[0] == null) {
                    Communicator c = groups.expertParallel(g);
                    if (o.nodeSize > 0 && g > 1) {
                        HierarchicalCommunicator h = new HierarchicalCommunicator(c, o.nodeSize);
                        hierarchical.add(h);
                        c = h;
                    }
                    epGroup[0] = c;
                }
                return epGroup[0];
            };
            built = Models.build(ctx, spec, e -> ep, expertGroup);
            ctx.allocateParameters();
            try (AdamW opt = AdamW.withDefaults(ctx.params())) {
                Trainer trainer = new Trainer(built.gpt(), opt, randomTokens(o.vocab, o.microBatch, o.seqLen, 42L + rank),
                        new CosineSchedule(3e-4f, 3e-5f, 2, 1000), 1);
                trainer.setMoELayers(built.moeLayers());
                if (groups != null) trainer.setGradientSync(new GradientSync(ctx.params(), groups));
                StepMetrics[] last = new StepMetrics[1];
                double ms = BenchTiming.medianMs(backend, o.warmup, o.steps, () -> last[0] = trainer.trainStep());
                int taken = trainer.step();
                long tokens = (long) o.microBatch * o.seqLen;
                if (world != null) world.barrier();
                if (rank != 0) return "";
                return String.format(Locale.ROOT,
                        "{\"impl\":\"moe4j\",\"bench\":\"weak scaling\",\"device\":\"%s\",\"world\":%d,\"ep\":%d,\"dp\":%d,\"node_size\":%d,"
                                + "\"layers\":%d,\"hidden\":%d,\"experts_per_layer\":%d,\"experts_per_gpu\":%d,\"tokens_per_gpu\":%d,"
                                + "\"params_per_gpu\":%d,\"warmup_steps\":%d,\"timed_steps\":%d,\"step_ms\":%.3f,\"tokens_per_s_per_gpu\":%.1f,"
                                + "\"loss_last\":%.6f,\"steps_taken\":%d}",
                        backend.name(), w, ep, w / ep, o.nodeSize, o.layers, o.hidden, experts, o.expertsPerGpu, tokens,
                        ctx.params().count(), o.warmup, o.steps, ms, tokens / (ms / 1e3), last[0].loss(), taken);
            }
        } finally {
            if (built != null) for (Models.MoELayer l : built.moeLayers()) l.moe().close();
            ctx.params().close();
            for (HierarchicalCommunicator h : hierarchical) h.close();
        }
    }

    /** Uniform random tokens, fresh for every (step, micro-batch), different on every rank. */
    static BatchSource randomTokens(int vocab, int batch, int seqLen, long seed) {
        return new BatchSource() {
            @Override public Batch train(int step, int micro) {
                SplittableRandom r = new SplittableRandom(seed * 1_000_003L + step * 1009L + micro);
                int[] in = new int[batch * seqLen], tg = new int[batch * seqLen];
                for (int i = 0; i < in.length; i++) in[i] = r.nextInt(vocab);
                for (int i = 0; i < in.length; i++) tg[i] = i + 1 < in.length && (i + 1) % seqLen != 0 ? in[i + 1] : r.nextInt(vocab);
                return new Batch(in, tg, batch, seqLen);
            }

            @Override public List<Batch> validation(int maxBatches) { return List.of(); }
        };
    }
}
