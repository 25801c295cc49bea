package dev.moe4j.core.train;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.comm.ProcessGroups;
import dev.moe4j.core.io.SafeTensorsFile;
import dev.moe4j.core.io.SafeTensorsWriter;
import dev.moe4j.core.nn.ExpertShard;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.nn.Parameter;
import dev.moe4j.core.nn.Parameters;
import dev.moe4j.core.optim.AdamW;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;

import java.io.IOException;
import java.nio.file.DirectoryStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;

/**
 * An expert-sharded training checkpoint: a directory holding
 * <ul>
 *   <li>{@value #COMMON}: every replicated (non-expert) parameter and its AdamW moments, written once (by world
 *       rank 0), with the metadata of {@link Checkpoint} (step, optimizer step, RNG position, configuration) and
 *       the list of expert files;</li>
 *   <li>{@code experts-s<step>-r<rank>.safetensors}: the experts of one rank (their master weights and moments
 *       under the same names as {@link Checkpoint}), written by the first rank of each expert-data-parallel group
 *       (the others hold copies), each tensor the rank's rows of the whole [E, ...] tensor, with metadata
 *       {@code moe4j.shard.NAME = "firstRow,rows,E"}.</li>
 * </ul>
 * Loading reads, for each expert parameter of the loading rank, the rows it holds from whichever files cover them,
 * so a checkpoint written at one expert-parallel degree (or world size) loads at any other, including a single
 * process. Every file is written atomically and checksummed; the common file is written last, after every rank's
 * experts are on disk, and names the expert files of its step, so a save interrupted at any moment leaves the
 * previous checkpoint loadable (expert files of older steps are removed only after the new common file is in place).
 *
 * <p>The configuration JSON is compared on load as in {@link Checkpoint}: it must describe the model and run, not
 * the parallel layout (which may change between save and load).
 */
public final class ShardedCheckpoint {
    public static final String COMMON = "common.safetensors";
    public static final String EXPERT_FILES = "moe4j.expert_files";
    public static final String SHARD_PREFIX = "moe4j.shard.";
    public static final String WORLD_SIZE = "moe4j.world_size";

    private ShardedCheckpoint() {}

    /**
     * Saves the trainer's state into {@code dir}. Collective over {@code groups}' world (every rank calls it);
     * {@code groups} null: a single process writes everything.
     */
    public static void save(Path dir, Trainer trainer, String configJson, Map<String, String> extraMetadata, ProcessGroups groups) throws IOException {
        ModelContext ctx = trainer.model().context();
        Parameters params = ctx.params();
        AdamW opt = trainer.optimizer();
        Communicator world = groups == null ? null : groups.dataParallel();
        int rank = world == null ? 0 : world.rank(), size = world == null ? 1 : world.size();
        int step = trainer.step();
        String myFile = expertFileName(step, rank);

        // 1. this rank's experts (those it is the first holder of)
        SafeTensorsWriter ew = new SafeTensorsWriter();
        Map<String, String> emeta = new LinkedHashMap<>();
        boolean wrote = false;
        IOException failure = null;
        for (Parameter p : params.all()) {
            if (!p.isExpert()) continue;
            ExpertShard s = p.expertShard();
            if (groups != null && groups.expertDataParallel(s.epSize()).rank() != 0) continue;
            ew.add(p.name(), p.master());
            ew.add(Checkpoint.MOMENT1 + p.name(), moment(opt.firstMoment(), params, p));
            ew.add(Checkpoint.MOMENT2 + p.name(), moment(opt.secondMoment(), params, p));
            emeta.put(SHARD_PREFIX + p.name(), s.firstRow() + "," + s.rows() + "," + s.globalRows());
            wrote = true;
        }
        if (wrote) {
            emeta.put(Checkpoint.FORMAT, "1");
            emeta.put(Checkpoint.STEP, Integer.toString(step));
            ew.metadata(emeta);
            try {
                ew.write(dir.resolve(myFile));
            } catch (IOException e) {
                failure = e;
            }
        }
        // 2. who wrote (a collective: also the point after which every expert file is on disk)
        int[] flags = gatherFlags(world, failure != null ? -1 : wrote ? 1 : 0);
        List<String> files = new ArrayList<>();
        List<Integer> failed = new ArrayList<>();
        for (int r = 0; r < size; r++) {
            if (flags[r] < 0) failed.add(r);
            if (flags[r] > 0) files.add(expertFileName(step, r));
        }
        if (failure != null) throw failure;
        if (!failed.isEmpty()) throw new IOException("checkpoint " + dir + ": rank(s) " + failed + " failed to write their experts");

        // 3. rank 0: the replicated parameters and the metadata, last
        IOException commonFailure = null;
        if (rank == 0) {
            try {
                SafeTensorsWriter w = new SafeTensorsWriter();
                Map<String, String> meta = new LinkedHashMap<>(extraMetadata);
                meta.put(Checkpoint.FORMAT, "1");
                meta.put(Checkpoint.STEP, Integer.toString(step));
                meta.put(Checkpoint.OPTIMIZER_STEP, Integer.toString(opt.stepCount()));
                meta.put(Checkpoint.RNG_OFFSET, Long.toString(ctx.rngOffset()));
                meta.put(Checkpoint.SEED, Long.toString(ctx.seed()));
                meta.put(Checkpoint.CONFIG, configJson);
                meta.put(WORLD_SIZE, Integer.toString(size));
                meta.put(EXPERT_FILES, String.join(",", files));
                w.metadata(meta);
                for (Parameter p : params.all()) {
                    if (p.isExpert()) continue;
                    w.add(p.name(), p.master());
                    w.add(Checkpoint.MOMENT1 + p.name(), moment(opt.firstMoment(), params, p));
                    w.add(Checkpoint.MOMENT2 + p.name(), moment(opt.secondMoment(), params, p));
                }
                w.write(dir.resolve(COMMON));
                removeStaleExpertFiles(dir, new HashSet<>(files));
            } catch (IOException e) {
                commonFailure = e;
            }
        }
        int[] done = gatherFlags(world, commonFailure != null ? -1 : 1);
        if (commonFailure != null) throw commonFailure;
        if (done[0] < 0) throw new IOException("checkpoint " + dir + ": rank 0 failed to write " + COMMON);
    }

    /**
     * Restores a checkpoint written by {@link #save} (at any world size and expert-parallel degree) into this
     * rank's trainer: replicated weights and moments, this rank's expert rows, step, optimizer step and RNG
     * position. Not collective. Returns the common metadata.
     */
    public static Map<String, String> load(Path dir, Trainer trainer, String configJson) throws IOException {
        Path common = dir.resolve(COMMON);
        if (!Files.isRegularFile(common)) throw new IOException("sharded checkpoint " + dir + " has no " + COMMON);
        ModelContext ctx = trainer.model().context();
        Parameters params = ctx.params();
        AdamW opt = trainer.optimizer();
        Map<String, String> meta;
        try (SafeTensorsFile f = SafeTensorsFile.open(common)) {
            meta = f.metadata();
            String saved = meta.get(Checkpoint.CONFIG);
            if (saved == null || meta.get(Checkpoint.STEP) == null || meta.get(EXPERT_FILES) == null) {
                throw new IOException(common + " is not a MoE4J sharded checkpoint (no " + Checkpoint.CONFIG + " / " + EXPERT_FILES + " metadata)");
            }
            if (!saved.equals(configJson)) {
                throw new IllegalArgumentException("checkpoint " + dir + " was written for another configuration:\n  checkpoint: " + saved + "\n  this run:   " + configJson);
            }
            for (Parameter p : params.all()) {
                if (p.isExpert()) continue;
                if (!f.contains(p.name())) throw new IOException(common + ": parameter '" + p.name() + "' is missing");
                f.loadInto(p.name(), p.master());
                f.loadInto(Checkpoint.MOMENT1 + p.name(), moment(opt.firstMoment(), params, p));
                f.loadInto(Checkpoint.MOMENT2 + p.name(), moment(opt.secondMoment(), params, p));
            }
        }
        List<SafeTensorsFile> files = new ArrayList<>();
        try {
            for (String name : meta.get(EXPERT_FILES).split(",")) {
                if (name.isBlank()) continue;
                Path file = dir.resolve(name);
                if (!Files.isRegularFile(file)) throw new IOException("sharded checkpoint " + dir + ": expert file " + name + " is missing");
                files.add(SafeTensorsFile.open(file));
            }
            for (Parameter p : params.all()) {
                if (!p.isExpert()) continue;
                loadExpertRows(p, p.master(), p.name(), files);
                loadExpertRows(p, moment(opt.firstMoment(), params, p), Checkpoint.MOMENT1 + p.name(), files);
                loadExpertRows(p, moment(opt.secondMoment(), params, p), Checkpoint.MOMENT2 + p.name(), files);
            }
        } finally {
            for (SafeTensorsFile f : files) f.close();
        }
        if (params.value() != params.master()) ctx.backend().copy(params.master(), params.value());
        trainer.setStep(Integer.parseInt(meta.get(Checkpoint.STEP)));
        opt.setStepCount(Integer.parseInt(meta.get(Checkpoint.OPTIMIZER_STEP)));
        ctx.setRngOffset(Long.parseLong(meta.get(Checkpoint.RNG_OFFSET)));
        return meta;
    }

    /** Fills dst (this rank's rows [a, a+n) of tensor {@code name}) from the files' shards that cover them. */
    private static void loadExpertRows(Parameter p, Tensor dst, String name, List<SafeTensorsFile> files) throws IOException {
        ExpertShard mine = p.expertShard();
        int a = mine.firstRow(), n = mine.rows();
        long rowElems = p.shape().numel() / n;
        int[] dims = p.shape().dims();
        boolean[] covered = new boolean[n];
        for (SafeTensorsFile f : files) {
            String shard = f.metadata(SHARD_PREFIX + p.name());
            if (shard == null || !f.contains(name)) continue;
            String[] v = shard.split(",");
            int s = Integer.parseInt(v[0]), m = Integer.parseInt(v[1]), e = Integer.parseInt(v[2]);
            if (e != mine.globalRows()) {
                throw new IllegalArgumentException(f.path() + ": '" + p.name() + "' has " + e + " experts in the checkpoint but " + mine.globalRows() + " in this model");
            }
            int lo = Math.max(a, s), hi = Math.min(a + n, s + m);
            if (lo >= hi) continue;
            dims[0] = hi - lo;
            Tensor rows = dst.view((lo - a) * rowElems, dims);
            f.loadRowsInto(name, lo - s, rows);
            for (int i = lo; i < hi; i++) covered[i - a] = true;
        }
        for (int i = 0; i < n; i++) {
            if (!covered[i]) throw new IOException("sharded checkpoint: expert " + (a + i) + " of '" + name + "' is in none of the expert files");
        }
    }

    static String expertFileName(int step, int rank) { return String.format("experts-s%d-r%d.safetensors", step, rank); }

    private static void removeStaleExpertFiles(Path dir, Set<String> keep) throws IOException {
        try (DirectoryStream<Path> ds = Files.newDirectoryStream(dir, "experts-s*-r*.safetensors")) {
            for (Path f : ds) if (!keep.contains(f.getFileName().toString())) Files.deleteIfExists(f);
        }
    }

    /** Every rank's flag in rank order (one small all-gather; a single process returns its own). */
    private static int[] gatherFlags(Communicator world, int flag) {
        if (world == null) return new int[] {flag};
        Backend b = world.backend();
        try (Tensor s = b.fromInts(new int[] {flag}, 1); Tensor r = b.zeros(DType.I32, world.size())) {
            world.allGather(s, r);
            return r.toInts();
        }
    }

    private static Tensor moment(Tensor flat, Parameters params, Parameter p) {
        long start = p.master().offset() - params.master().offset();
        return flat.view(start, p.shape().dims());
    }
}
