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
import dev.moe4j.core.moe.MoE;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.testing.MoESteps;
import dev.moe4j.core.testing.BenchTiming;

import java.time.Duration;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Locale;
import java.util.Set;
import java.util.function.Consumer;

/**
 * The expert-parallel MoE layer benchmark of issue 6 (b): forward + backward of one MoE layer (bf16, training,
 * GELU experts without bias, plain top-k: no RTS, no second-expert sampling; bf16 gradients as the PyTorch peer's,
 * {@code -Dmoe4j.bench.gradDType=f32} for fp32) at EP = world size, in capacity mode (factor 1.0) and dropless,
 * against the same process's layer with the same local experts and no communication (E = experts per GPU, epSize 1). Each GPU holds S = 8192 tokens and El experts: the shares of 350M+MoE-128 and
 * 1.3B+MoE-128 (16 per GPU at EP 2, k = 1) and of 1.3B+MoE-64-top2 (8 per GPU, k = 2). Both layers do the same
 * expert work per GPU (S*k rows); the difference is the gate over E instead of El experts and the four row
 * exchanges (all-to-alls, or stores into peer windows), plus, dropless, one count exchange (an all-gather, or through
 * a window) and host read per layer.
 *
 * <p>Timing ({@link BenchTiming}): 200 warm-up steps, then the median of 20, each step between CUDA events on the
 * backend's stream (the NCCL collectives run on it). Rank 0 prints one JSON line per config and mode;
 * moe-comm/src/test/python/ep_layer_reference.py is the PyTorch peer (same configs, same method).
 *
 * <p>Usage, one process per GPU (moe-comm/GPU-TESTS.md, the bundle's run-ep-bench.sh):
 * {@code torchrun --no-python --nproc_per_node=2 java ... dev.moe4j.comm.ep.EpLayerBench [--iters N] [config...]}.
 * Without WORLD_SIZE in the environment, or with {@code --smoke}, it runs a 2-rank in-process CPU world at tiny
 * shapes (timed by the wall clock), which proves the whole path without a GPU.
 */
public final class EpLayerBench {
    /** One config: S tokens per GPU, hidden M, FFN F, El experts per GPU, top-k. */
    record Config(String name, int s, int m, int f, int expertsPerRank, int k) {}

    static final Config[] CONFIGS = {
        new Config("350M+MoE-128", 8192, 1024, 4096, 16, 1),
        new Config("1.3B+MoE-128", 8192, 2048, 8192, 16, 1),
        new Config("1.3B+MoE-64-top2", 8192, 2048, 8192, 8, 2),
    };

    static final Config[] SMOKE = {
        new Config("smoke-top1", 64, 16, 32, 2, 1),
        new Config("smoke-top2", 64, 16, 32, 2, 2),
    };

    static final int WARMUP = 200;   // enough for the JIT to finish the step's Java path (20 was not: MoeLayerBench)

    public static void main(String[] args) throws Exception {
        boolean smoke = System.getenv("WORLD_SIZE") == null;
        int iters = 20, nodeSize = 0;
        boolean overlap = false;
        Set<String> only = new HashSet<>();
        for (int i = 0; i < args.length; i++) {
            switch (args[i]) {
                case "--smoke" -> smoke = true;
                case "--iters" -> {
                    if (i + 1 >= args.length) throw new IllegalArgumentException("EpLayerBench: --iters needs a value (>= 1)");
                    iters = Integer.parseInt(args[++i]);
                    if (iters < 1) throw new IllegalArgumentException("EpLayerBench: --iters must be >= 1, got " + iters);
                }
                case "--overlap" -> overlap = true;
                case "--node-size" -> {
                    if (i + 1 >= args.length) throw new IllegalArgumentException("EpLayerBench: --node-size needs a value (>= 1)");
                    nodeSize = Integer.parseInt(args[++i]);
                    if (nodeSize < 1) throw new IllegalArgumentException("EpLayerBench: --node-size must be >= 1, got " + nodeSize);
                }
                default -> only.add(args[i]);
            }
        }
        List<Config> configs = new ArrayList<>();
        for (Config c : smoke ? SMOKE : CONFIGS) if (only.isEmpty() || only.contains(c.name)) configs.add(c);
        if (configs.isEmpty()) throw new IllegalArgumentException("EpLayerBench: no config named " + only + "; known: " + names(smoke ? SMOKE : CONFIGS));
        final int reps = iters, node = nodeSize;
        final boolean ov = overlap;
        if (smoke) {
            System.out.println("EpLayerBench smoke: 2 in-process CPU ranks, tiny shapes, wall-clock timing");
            InProcessWorld.run(2, comm -> {
                bench(comm, configs, reps, node, ov, System.out::println);
                return null;
            });
            return;
        }
        DistributedEnv env = DistributedEnv.fromEnvironment();
        int status = 0;
        try {
            NcclLibrary.load();
            try (Backend backend = Backends.select("cuda").create(env.localRank());
                 NcclCommunicator comm = NcclCommunicator.create(backend, env, CommOptions.withTimeout(Duration.ofSeconds(300)))) {
                bench(comm, configs, reps, node, ov, System.out::println);
            }
        } catch (Throwable t) {
            System.err.println("EpLayerBench rank " + env.rank() + " failed:");
            t.printStackTrace();
            status = 1;
        }
        System.exit(status);  // no lingering non-daemon threads, and torchrun sees a failure
    }

    private static String names(Config[] cs) {
        List<String> l = new ArrayList<>();
        for (Config c : cs) l.add(c.name);
        return l.toString();
    }

    /**
     * Every config in both modes, EP layer then local layer; rank 0 hands one JSON line per config and mode to
     * {@code out}, any rank a line for a config that failed on it. Collective: every rank calls it.
     */
    static void bench(Communicator world, List<Config> configs, int reps, Consumer<String> out) {
        bench(world, configs, reps, 0, false, out);
    }

    static void bench(Communicator world, List<Config> configs, int reps, int nodeSize, Consumer<String> out) {
        bench(world, configs, reps, nodeSize, false, out);
    }

    /** As above; nodeSize > 0: the expert-parallel group's all-to-alls hierarchical with that many ranks per node. */
    /** overlap: the EP layer pipelines its exchanges with its experts in stages (MoE.Builder.optOverlapAllToAll; -Dmoe4j.ep.chunks stages). */
    static void bench(Communicator world, List<Config> configs, int reps, int nodeSize, boolean overlap, Consumer<String> out) {
        Backend b = world.backend();
        int p = world.size();
        DType gradDType = MoESteps.gradDType();
        try (ProcessGroups groups = new ProcessGroups(world)) {
            Communicator flat = groups.expertParallel(p);
            HierarchicalCommunicator hier = nodeSize > 0 ? new HierarchicalCommunicator(flat, nodeSize) : null;
            Communicator ep = hier != null ? hier : flat;
            for (Config c : configs) {
                for (boolean dropless : new boolean[] {false, true}) {
                    String mode = dropless ? "dropless" : "capacity 1.0";
                    try {
                        Result epr = run(b, ep, c, dropless, reps, overlap, gradDType);
                        world.barrier();
                        Result local = run(b, null, c, dropless, reps, false, gradDType);
                        world.barrier();
                        if (world.rank() == 0) {
                            out.accept(String.format(Locale.ROOT, "{\"impl\":\"moe4j\",\"config\":\"%s\",\"mode\":\"%s\",\"ranks\":%d,\"tokens_per_gpu\":%d,"
                                            + "\"hidden\":%d,\"ffn\":%d,\"experts\":%d,\"experts_per_gpu\":%d,\"k\":%d,\"ep%d_ms\":%.3f,\"local_ms\":%.3f,\"ep_fwd_ms\":%.3f,\"ep_bwd_ms\":%.3f,\"local_fwd_ms\":%.3f,\"local_bwd_ms\":%.3f,\"ep_fwd_host_ms\":%.3f,\"local_fwd_host_ms\":%.3f,"
                                            + "\"ratio\":%.3f,\"ep_dropped\":%.4f,\"local_dropped\":%.4f,\"all_to_all\":\"%s\",\"overlap\":%b,\"stages\":%d,\"grad_dtype\":\"%s\",\"device\":\"%s\"}",
                                    c.name, mode, p, c.s, c.m, c.f, c.expertsPerRank * p, c.expertsPerRank, c.k, p, epr.ms, local.ms, epr.fwdMs, epr.bwdMs, local.fwdMs, local.bwdMs, epr.fwdHostMs, local.fwdHostMs,
                                    epr.ms / local.ms, epr.dropped, local.dropped, nodeSize > 0 ? "hierarchical, node size " + nodeSize
                                            : !overlap && !"false".equals(System.getProperty("moe4j.ep.peerExchange")) ? "peer windows where offered, else flat" : "flat", overlap,
                                    overlap ? Math.min(Math.max(1, Integer.getInteger("moe4j.ep.chunks", 2)), c.expertsPerRank) : 1,
                                    gradDType.name().toLowerCase(Locale.ROOT), b.name()));
                        }
                    } catch (RuntimeException | OutOfMemoryError e) {
                        // report and go on; a broken communicator makes the next config fail fast too
                        out.accept(String.format(Locale.ROOT, "{\"impl\":\"moe4j\",\"config\":\"%s\",\"mode\":\"%s\",\"rank\":%d,\"error\":\"%s\"}",
                                c.name, mode, world.rank(), String.valueOf(e).replace('"', '\'')));
                    }
                }
            }
            if (hier != null) hier.close();
        }
    }

    /** ms: the step's median; fwdMs, bwdMs: forward and backward medians, each timed on its own (a wait between them). */
    record Result(double ms, double dropped, double fwdMs, double bwdMs, double fwdHostMs) {}

    /**
     * One layer's median step time: ep != null: El experts here of El*P in the group (gate over all of them);
     * ep == null: the El local experts alone (gate over El, no communication).
     */
    static Result run(Backend b, Communicator ep, Config c, boolean dropless, int reps, boolean overlap, DType gradDType) {
        int epSize = ep == null ? 1 : ep.size();
        // the same seed on every rank: the same gate, and each rank's experts are its rows of the whole tensors
        ModelContext ctx = new ModelContext(b, DType.BF16, 1);
        ctx.setGradDType(gradDType);
        ctx.setTraining(true);
        MoE.Builder builder = MoE.builder().setContext(ctx).setHiddenSize(c.m).setFfnSize(c.f)
                .optNumExperts(c.expertsPerRank * epSize).optK(c.k).optActivation(Activation.GELU)
                .optCapacityFactor(1.0).optDropless(dropless).optUseRts(false).optTop2SecondExpertSampling(false)
                .optExpertBias(false).optInitStd(0.02);
        if (ep != null) builder.optEpSize(epSize).optExpertParallelGroup(ep).optOverlapAllToAll(overlap);
        MoE moe = builder.build();
        ctx.allocateParameters();
        int rank = ep == null ? 0 : ep.rank();
        try (Tensor x = b.empty(DType.BF16, c.s, c.m); Tensor dy = b.empty(DType.BF16, c.s, c.m)) {
            // each rank its own tokens (the data-parallel shards of a batch)
            b.randomNormal(x, 0, 1, 3, (long) rank * c.s * c.m);
            b.randomNormal(dy, 0, 1e-3, 4, (long) rank * c.s * c.m);
            double ms = BenchTiming.medianMs(b, WARMUP, reps, () -> MoESteps.forwardBackward(ctx, moe, x, dy, false));
            double dropped = MoESteps.forwardBackward(ctx, moe, x, dy, true);
            // where the step's time goes: forward and backward apart (each waits for the other; a diagnostic)
            double[] fwd = new double[reps], bwd = new double[reps], host = new double[reps];
            for (int i = 0; i < reps; i++) {
                ctx.params().zeroGrad();
                try (dev.moe4j.core.tensor.Scope s = dev.moe4j.core.tensor.Scope.open()) {
                    int at = i;
                    fwd[i] = b.timeMs(() -> {
                        long t0 = System.nanoTime();
                        moe.forward(x);
                        host[at] = (System.nanoTime() - t0) / 1e6;   // the host's time to issue it (waits included)
                    });
                    bwd[i] = b.timeMs(() -> moe.backward(dy, 0.01f));
                }
            }
            java.util.Arrays.sort(fwd);
            java.util.Arrays.sort(bwd);
            java.util.Arrays.sort(host);
            return new Result(ms, dropped, fwd[reps / 2], bwd[reps / 2], host[reps / 2]);
        } finally {
            moe.close();
            ctx.params().close();
        }
    }

}
