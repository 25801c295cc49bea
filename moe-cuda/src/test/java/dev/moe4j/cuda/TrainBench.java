package dev.moe4j.cuda;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.cpu.CpuBackend;
import dev.moe4j.core.data.Batch;
import dev.moe4j.core.model.ModelSpec;
import dev.moe4j.core.model.Models;
import dev.moe4j.core.model.Presets;
import dev.moe4j.core.nn.GptConfig;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.nn.Parameter;
import dev.moe4j.core.optim.AdamW;
import dev.moe4j.core.optim.CosineSchedule;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.train.BatchSource;
import dev.moe4j.core.train.StepMetrics;
import dev.moe4j.core.train.Trainer;
import dev.moe4j.core.testing.BenchTiming;

import java.util.List;
import java.util.Locale;
import java.util.SplittableRandom;

/**
 * The end-to-end training benchmark of SPEC.md "Performance": one GPU, bf16 weights with fp32 master weights,
 * AdamW (betas 0.9/0.95, weight decay 0.1, clip 1.0), {@link Trainer} steps of one micro-batch of fresh random
 * tokens each, on a model built by {@link Models#build} from a preset (default 350M+MoE-16: 24 layers, hidden
 * 1024, 16 heads, FFN 4096, vocabulary 50304, 16 experts top-1 dropless on every other layer), its learned
 * positions cut to the sequence length. Its PyTorch peer is moe-cuda/src/test/python/train_reference.py.
 *
 * <p>Usage: {@code TrainBench [preset] [microBatch] [seqLen] [steps]} (defaults 350M+MoE-16 8 1024 10), or
 * {@code TrainBench --smoke} (tiny-moe on the CPU backend, 2 x 32 tokens, 2 steps). 3 warm-up steps (1 in the smoke
 * run), then each timed step between two CUDA events ({@link BenchTiming#medianMs}); prints one JSON line:
 * tokens/s and ms of the median step, parameters (all, and active per token), FLOPs per token, the dense bf16 GEMM
 * rate measured in the same run (8192^3 cuBLAS through {@link CudaBackend#matmul}, random data) and the model FLOP
 * utilisation = FLOPs per token * tokens per second / GEMM rate.
 *
 * <p>FLOPs per token = 6 * active parameters + 6 * layers * seqLen * hidden. Active parameters: all but the position
 * table, routed experts counted k of E (the tied token embedding counts once, as the LM head GEMM). The second term
 * is causal attention (QK^T and PV, forward and backward, half the keys on average).
 */
public final class TrainBench {
    private TrainBench() {}

    record Options(String preset, int microBatch, int seqLen, int steps, int warmup, boolean smoke) {
        Options {
            if (microBatch < 1) throw new IllegalArgumentException("microBatch must be >= 1, got " + microBatch);
            if (seqLen < 1) throw new IllegalArgumentException("seqLen must be >= 1, got " + seqLen);
            if (steps < 1) throw new IllegalArgumentException("steps must be >= 1, got " + steps);
        }
    }

    static Options parse(String[] args) {
        if (args.length > 0 && args[0].equals("--smoke")) {
            if (args.length > 1) throw new IllegalArgumentException("--smoke takes no further arguments");
            return new Options("tiny-moe", 2, 32, 2, 1, true);
        }
        if (args.length > 4) throw new IllegalArgumentException("usage: TrainBench [preset] [microBatch] [seqLen] [steps] | --smoke");
        return new Options(args.length > 0 ? args[0] : "350M+MoE-16",
                args.length > 1 ? Integer.parseInt(args[1]) : 8,
                args.length > 2 ? Integer.parseInt(args[2]) : 1024,
                args.length > 3 ? Integer.parseInt(args[3]) : 10, 3, false);
    }

    public static void main(String[] args) {
        Options o = parse(args);
        if (o.smoke) {
            System.out.println(run(new CpuBackend(), o, 64));
        } else {
            try (CudaBackend gpu = new CudaBackend(0)) {
                System.out.println(run(gpu, o, 8192));
            }
        }
    }

    /** Runs the benchmark on {@code backend} and returns its JSON line; {@code gemmN} sizes the GEMM-rate probe. */
    static String run(Backend backend, Options o, int gemmN) {
        ModelSpec spec = Presets.get(o.preset);
        spec = spec.withVocab(spec.gpt().vocabSize(), o.seqLen);
        GptConfig cfg = spec.gpt();
        double gemmTflops = BenchTiming.denseGemmTflops(backend, gemmN);   // before the model takes the memory

        ModelContext ctx = new ModelContext(backend, DType.BF16, 1234);
        ctx.setTraining(true);
        Models.Built built = Models.build(ctx, spec);
        ctx.allocateParameters();
        long params = ctx.params().count();
        long active = activeParams(ctx, spec);
        double flopsPerToken = 6.0 * active + 6.0 * cfg.layers() * o.seqLen * (double) cfg.hidden();

        try (AdamW opt = AdamW.withDefaults(ctx.params())) {
            Trainer trainer = new Trainer(built.gpt(), opt, randomTokens(cfg.vocabSize(), o.microBatch, o.seqLen, 42),
                    new CosineSchedule(3e-4f, 3e-5f, 2, 1000), 1);
            trainer.setMoELayers(built.moeLayers());
            StepMetrics[] last = new StepMetrics[1];
            double firstLoss = Double.NaN;
            for (int i = 0; i < o.warmup; i++) {
                last[0] = trainer.trainStep();
                if (i == 0) firstLoss = last[0].loss();
            }
            double ms = BenchTiming.medianMs(backend, 0, o.steps, () -> last[0] = trainer.trainStep());
            long tokens = (long) o.microBatch * o.seqLen;
            double tokPerS = tokens / (ms / 1e3);
            double mfu = flopsPerToken * tokPerS / (gemmTflops * 1e12);
            return String.format(Locale.ROOT,
                    "{\"impl\":\"moe4j\",\"device\":\"%s\",\"preset\":\"%s\",\"dtype\":\"bf16 weights, fp32 master\",\"micro_batch\":%d,\"seq_len\":%d,"
                            + "\"warmup_steps\":%d,\"timed_steps\":%d,\"step_ms\":%.3f,\"tokens_per_s\":%.1f,\"params\":%d,\"active_params\":%d,"
                            + "\"flops_per_token\":%.4e,\"gemm_tflops\":%.4g,\"mfu\":%.4f,\"loss_first\":%.4f,\"loss_last\":%.4f,\"skipped_last\":%b}",
                    backend.name(), o.preset, o.microBatch, o.seqLen, o.warmup, o.steps, ms, tokPerS, params, active,
                    flopsPerToken, gemmTflops, mfu, firstLoss, last[0].loss(), last[0].skipped());
        } finally {
            for (Models.MoELayer l : built.moeLayers()) l.moe().close();
            ctx.params().close();
        }
    }

    /** Parameters a token uses: all but the position table, each MoE layer's routed experts counted k of E. */
    static long activeParams(ModelContext ctx, ModelSpec spec) {
        int k = spec.moe() == null ? 0 : spec.moe().k();
        long n = 0;
        for (Parameter p : ctx.params().all()) {
            if (p.name().equals("wpe")) continue;
            long numel = p.shape().numel();
            n += p.isExpert() ? numel / p.expertShard().rows() * k : numel;
        }
        return n;
    }

    /** Fresh uniform random tokens for every (step, micro-batch); targets are the inputs shifted by one. */
    static BatchSource randomTokens(int vocab, int batch, int seqLen, long seed) {
        return new BatchSource() {
            @Override public Batch train(int step, int micro) {
                SplittableRandom r = new SplittableRandom(seed * 1_000_003L + step * 1009L + micro);
                int[] in = new int[batch * seqLen], tg = new int[batch * seqLen];
                for (int b = 0; b < batch; b++) {
                    int prev = r.nextInt(vocab);
                    for (int t = 0; t < seqLen; t++) {
                        int next = r.nextInt(vocab);
                        in[b * seqLen + t] = prev;
                        tg[b * seqLen + t] = next;
                        prev = next;
                    }
                }
                return new Batch(in, tg, batch, seqLen);
            }

            @Override public List<Batch> validation(int maxBatches) { return List.of(); }
        };
    }
}
