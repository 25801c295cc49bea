package dev.moe4j.core.train;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.comm.CommWork;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.comm.ProcessGroups;
import dev.moe4j.core.comm.ReduceOp;
import dev.moe4j.core.nn.Parameter;
import dev.moe4j.core.nn.Parameters;
import dev.moe4j.core.tensor.Tensor;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

/**
 * Gradient synchronisation for data + expert parallel training, as DeepSpeed builds it: the gradients of expert
 * parameters are all-reduced only in their expert-data-parallel group (the ranks holding the same experts), every
 * other gradient in the whole data-parallel group. {@link Parameters} lays the flat buffer out so each group is a
 * few contiguous ranges (replicated parameters, then experts by degree, within each decay class): one all-reduce
 * per range.
 *
 * <p>Scaling: the objective is the mean of the W data-parallel ranks' losses, so the trainer scales each rank's
 * gradients by 1/W before the backward and the all-reduces sum; an expert's gradient already holds the tokens of
 * its whole expert-parallel group (they came by all-to-all), and the sum over its expert-data-parallel group adds
 * the rest of the world. Every rank then holds exactly the gradient of the single-rank run on the global batch.
 */
public final class GradientSync {
    /** A contiguous range of the flat gradient and its group: 0 = replicated (the world), else the experts' epSize. */
    record Range(long start, int count, int epSize) {}

    /**
     * A piece of a range holding one block's parameters (block -1: those outside the blocks: embeddings, final
     * LayerNorm), all-reduced as soon as that block's backward is queued (see {@link #blockDone}).
     */
    record Bucket(long start, int count, int epSize, int block, List<Parameter> params) {}

    private final Parameters params;
    private final ProcessGroups groups;
    private final List<Range> ranges = new ArrayList<>();
    private final List<Bucket> buckets = new ArrayList<>();
    private final List<CommWork> pending = new ArrayList<>();
    private boolean[] launched;

    /** Collective (creates the expert groups the parameters name): every rank passes the same model. */
    public GradientSync(Parameters params, ProcessGroups groups) {
        if (params == null || !params.isAllocated()) throw new IllegalArgumentException("GradientSync: parameters must be allocated");
        if (groups == null) throw new IllegalArgumentException("GradientSync: groups is null");
        if (groups.dataParallel().backend() != params.grad().backend()) {
            throw new IllegalArgumentException("GradientSync: the communicator moves tensors of " + groups.dataParallel().backend().name()
                    + ", not the parameters' backend " + params.grad().backend().name());
        }
        this.params = params;
        this.groups = groups;
        // Buckets: maximal contiguous runs of one group and one block; ranges: the same runs across blocks.
        long base = params.grad().offset();
        for (Parameter p : params.layoutOrder()) {
            int n = Math.toIntExact(p.shape().numel());
            if (n == 0) continue;
            Bucket b = new Bucket(p.grad().offset() - base, n, p.isExpert() ? p.expertShard().epSize() : 0, blockOf(p.name()), List.of(p));
            Bucket last = buckets.isEmpty() ? null : buckets.get(buckets.size() - 1);
            if (last != null && last.block() == b.block() && joins(last.start(), last.count(), last.epSize(), b)) {
                List<Parameter> both = new ArrayList<>(last.params());
                both.add(p);
                buckets.set(buckets.size() - 1, new Bucket(last.start(), last.count() + n, b.epSize(), b.block(), both));
            } else {
                buckets.add(b);
            }
        }
        for (Bucket b : buckets) {
            Range last = ranges.isEmpty() ? null : ranges.get(ranges.size() - 1);
            if (last != null && joins(last.start(), last.count(), last.epSize(), b)) ranges.set(ranges.size() - 1, new Range(last.start(), last.count() + b.count(), b.epSize()));
            else ranges.add(new Range(b.start(), b.count(), b.epSize()));
        }
        launched = new boolean[buckets.size()];
        for (Range r : ranges) if (r.epSize() > 1) ProcessGroups.validate(groups.dataParallel().size(), r.epSize());
        for (Range r : ranges) if (r.epSize() > 0) groups.expertDataParallel(r.epSize());   // create in the same order everywhere
    }

    /** W, the data-parallel world size. */
    public int dataParallelSize() { return groups.dataParallel().size(); }

    /** This rank in the data-parallel world. */
    public int rank() { return groups.dataParallel().rank(); }

    public ProcessGroups groups() { return groups; }

    /** Whether b continues the run [start, start + count) of group epSize (and the sum still fits one collective). */
    private static boolean joins(long start, int count, int epSize, Bucket b) {
        return epSize == b.epSize() && start + count == b.start() && (long) count + b.count() <= Integer.MAX_VALUE - 8;
    }

    /** The block a parameter belongs to, from its name ("h.7.attn..." -> 7), or -1. */
    public static int blockOf(String name) {
        if (!name.startsWith("h.")) return -1;
        int dot = name.indexOf('.', 2);
        try {
            return Integer.parseInt(dot < 0 ? name.substring(2) : name.substring(2, dot));
        } catch (NumberFormatException e) {
            return -1;
        }
    }

    /**
     * Block {@code block}'s backward of the step's last micro-batch is queued: its gradients are final, so their
     * all-reduces start now, beside the rest of the backward ({@link Communicator#allReduceAsync}). Every rank
     * calls it for the same blocks in the same order ({@link dev.moe4j.core.nn.Gpt#setBlockBackwardListener}).
     */
    public void blockDone(int block) {
        for (int i = 0; i < buckets.size(); i++) if (!launched[i] && buckets.get(i).block() == block) launch(i);
    }

    private void launch(int i) {
        Bucket bk = buckets.get(i);
        launched[i] = true;
        for (Parameter p : bk.params()) p.definedGrad();   // a gradient nothing wrote this step is reduced as zero
        Communicator c = bk.epSize() == 0 ? groups.dataParallel() : groups.expertDataParallel(bk.epSize());
        if (c.size() > 1) pending.add(c.allReduceAsync(params.grad().view(bk.start(), bk.count()), ReduceOp.SUM));
    }

    /**
     * Sums every gradient over its group (gradients must already carry the 1/W factor): starts the buckets that
     * {@link #blockDone} has not, then waits for all of them (the backend's later work sees the sums).
     */
    public void allReduceGradients() {
        try {
            for (int i = 0; i < buckets.size(); i++) if (!launched[i]) launch(i);
            for (CommWork w : pending) w.await();
        } finally {
            pending.clear();
            java.util.Arrays.fill(launched, false);
        }
    }

    /**
     * out [1] = the squared norm of the whole model's gradient (after {@link #allReduceGradients}): the replicated
     * part (equal on every rank) plus each expert degree's part summed over its expert-parallel group (whose ranks
     * hold different experts). The same value on every rank.
     */
    public void globalNormSq(Tensor out) {
        Backend b = out.backend();
        Tensor g = params.grad();
        Map<Integer, Tensor> parts = new TreeMap<>();
        try {
            b.fill(out, 0);
            for (Range r : ranges) {
                Tensor acc = r.epSize() <= 1 ? out : parts.computeIfAbsent(r.epSize(), e -> b.zeros(out.dtype(), 1));
                b.sumSquares(g.view(r.start(), r.count()), acc, 1f);
            }
            for (Map.Entry<Integer, Tensor> e : parts.entrySet()) {
                groups.expertParallel(e.getKey()).allReduce(e.getValue(), ReduceOp.SUM);
                b.add(out, 1, e.getValue(), 1, out);
            }
        } finally {
            for (Tensor t : parts.values()) t.close();
        }
    }

    /** In place: t = the mean of t over the data-parallel world (the step's losses, for logging). */
    public void averageOverWorld(Tensor t) {
        Communicator w = groups.dataParallel();
        if (w.size() == 1) return;
        w.allReduce(t, ReduceOp.SUM);
        t.backend().scale(t, 1.0 / w.size(), t);
    }
}
