package dev.moe4j.core.train;

import dev.moe4j.core.io.SafeTensorsFile;
import dev.moe4j.core.io.SafeTensorsWriter;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.nn.Parameter;
import dev.moe4j.core.nn.Parameters;
import dev.moe4j.core.optim.AdamW;
import dev.moe4j.core.tensor.Tensor;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * A training checkpoint as one safetensors file: every parameter under its own name (fp32 master weights,
 * loadable by PyTorch / Hugging Face tools), the AdamW moments under {@code optim.exp_avg.NAME} and
 * {@code optim.exp_avg_sq.NAME}, and in the metadata the next step, the optimizer's step count, the RNG
 * position, and the model/training configuration as JSON. Written atomically (temp file + rename) with a
 * SHA-256 of the data that is verified on load; a config that differs from the running one is an error.
 */
public final class Checkpoint {
    public static final String FORMAT = "moe4j.format";
    public static final String STEP = "moe4j.step";
    public static final String OPTIMIZER_STEP = "moe4j.optimizer_step";
    public static final String RNG_OFFSET = "moe4j.rng_offset";
    public static final String SEED = "moe4j.seed";
    public static final String CONFIG = "moe4j.config";
    /** Name prefixes of the AdamW moments of a parameter. */
    public static final String MOMENT1 = "optim.exp_avg.", MOMENT2 = "optim.exp_avg_sq.";

    private Checkpoint() {}

    /** Saves the trainer's full state; {@code configJson} describes the model and run (checked on load). */
    public static void save(Path file, Trainer trainer, String configJson, Map<String, String> extraMetadata) throws IOException {
        ModelContext ctx = trainer.model().context();
        Parameters params = ctx.params();
        AdamW opt = trainer.optimizer();
        for (Parameter p : params.all()) {
            if (p.isExpert() && p.expertShard().rows() != p.expertShard().globalRows()) {
                throw new IllegalArgumentException("parameter " + p.name() + " holds only experts [" + p.expertShard().firstRow() + ", "
                        + (p.expertShard().firstRow() + p.expertShard().rows()) + ") of " + p.expertShard().globalRows()
                        + " (expert parallelism): save with ShardedCheckpoint");
            }
        }
        SafeTensorsWriter w = new SafeTensorsWriter();
        Map<String, String> meta = new LinkedHashMap<>(extraMetadata);
        meta.put(FORMAT, "1");
        meta.put(STEP, Integer.toString(trainer.step()));
        meta.put(OPTIMIZER_STEP, Integer.toString(opt.stepCount()));
        meta.put(RNG_OFFSET, Long.toString(ctx.rngOffset()));
        meta.put(SEED, Long.toString(ctx.seed()));
        meta.put(CONFIG, configJson);
        w.metadata(meta);
        for (Parameter p : params.all()) {
            w.add(p.name(), p.master());
            w.add("optim.exp_avg." + p.name(), moment(opt.firstMoment(), params, p));
            w.add("optim.exp_avg_sq." + p.name(), moment(opt.secondMoment(), params, p));
        }
        w.write(file);
    }

    /** The view of a flat optimizer moment that belongs to parameter p (same offset as its master view). */
    private static Tensor moment(Tensor flat, Parameters params, Parameter p) {
        long start = p.master().offset() - params.master().offset();
        return flat.view(start, p.shape().dims());
    }

    /**
     * Restores a checkpoint written by {@link #save} into {@code trainer}: weights, moments, step, optimizer
     * step and RNG position. Fails with a message naming the problem when the file is missing, corrupt, or was
     * written for another configuration. Returns the metadata.
     */
    public static Map<String, String> load(Path file, Trainer trainer, String configJson) throws IOException {
        if (!Files.isRegularFile(file)) throw new IOException("checkpoint " + file + " does not exist");
        ModelContext ctx = trainer.model().context();
        Parameters params = ctx.params();
        AdamW opt = trainer.optimizer();
        try (SafeTensorsFile f = SafeTensorsFile.open(file)) {
            Map<String, String> meta = f.metadata();
            String saved = meta.get(CONFIG);
            if (saved == null || meta.get(STEP) == null) throw new IOException(file + " is not a MoE4J training checkpoint (no " + CONFIG + " / " + STEP + " metadata)");
            if (!saved.equals(configJson)) {
                throw new IllegalArgumentException("checkpoint " + file + " was written for another configuration:\n  checkpoint: " + saved + "\n  this run:   " + configJson);
            }
            for (Parameter p : params.all()) {
                if (!f.contains(p.name())) throw new IOException(file + ": parameter '" + p.name() + "' is missing");
                loadParam(f, p.name(), p, p.master());
                loadParam(f, "optim.exp_avg." + p.name(), p, moment(opt.firstMoment(), params, p));
                loadParam(f, "optim.exp_avg_sq." + p.name(), p, moment(opt.secondMoment(), params, p));
            }
            if (params.value() != params.master()) ctx.backend().copy(params.master(), params.value());
            trainer.setStep(Integer.parseInt(meta.get(STEP)));
            opt.setStepCount(Integer.parseInt(meta.get(OPTIMIZER_STEP)));
            ctx.setRngOffset(Long.parseLong(meta.get(RNG_OFFSET)));
            return meta;
        }
    }

    /** A whole tensor, or this rank's rows of a whole [E, ...] expert tensor (an expert-parallel model). */
    private static void loadParam(SafeTensorsFile f, String name, Parameter p, Tensor dst) throws IOException {
        if (p.isExpert() && p.expertShard().rows() != p.expertShard().globalRows()) f.loadRowsInto(name, p.expertShard().firstRow(), dst);
        else f.loadInto(name, dst);
    }

    /** The configuration JSON stored in a checkpoint (to rebuild its model, e.g. a distillation teacher). */
    public static String readConfig(Path file) throws IOException {
        if (!Files.isRegularFile(file)) throw new IOException("checkpoint " + file + " does not exist");
        try (SafeTensorsFile f = SafeTensorsFile.open(file)) {
            String c = f.metadata(CONFIG);
            if (c == null) throw new IOException(file + " is not a MoE4J checkpoint (no " + CONFIG + " metadata)");
            return c;
        }
    }

    /** Loads only the weights of a checkpoint into {@code params} (a teacher, or fine-tuning from a model). */
    public static void loadWeights(Path file, Parameters params) throws IOException {
        if (!Files.isRegularFile(file)) throw new IOException("checkpoint " + file + " does not exist");
        try (SafeTensorsFile f = SafeTensorsFile.open(file)) {
            for (Parameter p : params.all()) {
                if (!f.contains(p.name())) throw new IOException(file + ": parameter '" + p.name() + "' is missing");
                loadParam(f, p.name(), p, p.master());
            }
            if (params.value() != params.master()) params.master().backend().copy(params.master(), params.value());
        }
    }
}
