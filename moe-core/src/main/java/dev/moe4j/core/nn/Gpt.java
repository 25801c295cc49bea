package dev.moe4j.core.nn;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;

import java.util.ArrayList;
import java.util.Collections;
import java.util.List;

/**
 * GPT-style decoder: token + learned position embeddings, pre-LN blocks, final LayerNorm, head tied to the
 * token embedding. B batch, T sequence, C width, V vocabulary. The FFN of each block comes from a
 * {@link FfnFactory} (dense MLP by default, MoE for GPT-MoE models).
 */
public final class Gpt {
    /** Creates block {@code layer}'s FFN under the parameter prefix {@code name}. */
    @FunctionalInterface
    public interface FfnFactory {
        FeedForward create(ModelContext ctx, int layer, String name);
    }

    /** The dense GPT-2 FFN. */
    public static FfnFactory denseFfn(GptConfig cfg) {
        double std = 0.02, residualStd = 0.02 / Math.sqrt(2.0 * cfg.layers());
        return (ctx, layer, name) -> new Mlp(ctx, name, cfg.hidden(), cfg.ffnHidden(), cfg.activation(), std, residualStd);
    }

    private final ModelContext ctx;
    private final GptConfig cfg;
    private final Parameter wte, wpe;
    private final List<Block> blocks = new ArrayList<>();
    private final LayerNorm lnf;
    private java.util.function.IntConsumer blockDone;
    private Tensor tokens, xf, logits, targets;  // saved for the backward
    private Distill distill;
    private int batch, seq;

    public Gpt(ModelContext ctx, GptConfig cfg, FfnFactory ffn) {
        this.ctx = ctx;
        this.cfg = cfg;
        double std = 0.02, residualStd = 0.02 / Math.sqrt(2.0 * cfg.layers());
        this.wte = ctx.params().add("wte", Init.normal(std), false, cfg.vocabSize(), cfg.hidden());
        this.wpe = ctx.params().add("wpe", Init.normal(std), false, cfg.maxSeqLen(), cfg.hidden());
        for (int l = 0; l < cfg.layers(); l++) {
            int layer = l;
            blocks.add(new Block(ctx, "h." + l, cfg.hidden(), cfg.heads(), name -> ffn.create(ctx, layer, name), std, residualStd));
        }
        this.lnf = new LayerNorm(ctx, "lnf", cfg.hidden());
    }

    public Gpt(ModelContext ctx, GptConfig cfg) { this(ctx, cfg, denseFfn(cfg)); }

    public GptConfig config() { return cfg; }

    public ModelContext context() { return ctx; }

    public List<Block> blocks() { return Collections.unmodifiableList(blocks); }

    /** tokens I32 [B, T] -> logits [B*T, V] (model dtype). */
    public Tensor forward(Tensor tokens) {
        Backend b = ctx.backend();
        if (tokens.rank() != 2) throw new IllegalArgumentException("tokens must be [batch, seq], got " + tokens.shape());
        batch = tokens.dim(0);
        seq = tokens.dim(1);
        if (seq > cfg.maxSeqLen()) throw new IllegalArgumentException("sequence length " + seq + " exceeds maxSeqLen " + cfg.maxSeqLen());
        this.tokens = tokens;
        int n = batch * seq, c = cfg.hidden();
        Tensor x = b.empty(ctx.dtype(), n, c);
        b.embedding(tokens, wte.value(), wpe.value(), x);
        for (Block blk : blocks) x = blk.forward(x, batch, seq);
        xf = lnf.forward(x);
        logits = b.empty(ctx.dtype(), n, cfg.vocabSize());
        b.matmul(xf, false, wte.value(), true, logits, 1f, 0f);
        return logits;
    }

    /**
     * dlogits [B*T, V] -> parameter gradients (accumulated). {@code lossScale} is the factor already applied to
     * dlogits' loss; the MoE layers apply it to their auxiliary-loss gradients.
     */
    /**
     * Called with l after block l's backward has queued its last gradient work (blocks in reverse order), so that
     * its gradients can be all-reduced while the earlier blocks run; null: none.
     */
    public void setBlockBackwardListener(java.util.function.IntConsumer listener) { this.blockDone = listener; }

    public void backward(Tensor dlogits, float lossScale) {
        Backend b = ctx.backend();
        if (logits == null) throw new IllegalStateException("backward before forward");
        int n = batch * seq, c = cfg.hidden();
        b.matmul(dlogits, true, xf, false, wte.grad(), 1f, wte.gradBeta());   // tied head: dwte (+)= dlogits^T xf
        Tensor dx = b.empty(ctx.dtype(), n, c);
        b.matmul(dlogits, false, wte.value(), false, dx, 1f, 0f);
        dx = lnf.backward(dx);
        for (int l = blocks.size() - 1; l >= 0; l--) {
            dx = blocks.get(l).backward(dx, lossScale);
            if (blockDone != null) blockDone.accept(l);
        }
        b.embeddingBackward(dx, tokens, wte.definedGrad(), wpe.definedGrad());
        tokens = xf = logits = null;
    }

    /**
     * Knowledge distillation for {@link #forwardLoss}: the objective becomes
     * alpha * CE + beta * T^2 * KL(teacher_T || student_T) (mean over all rows) + aux.
     *
     * @param teacherLogits [B*T, V] from the teacher's forward on the same tokens
     */
    public record Distill(Tensor teacherLogits, float alpha, float beta, float temperature) {
        public Distill {
            if (alpha < 0 || beta < 0) throw new IllegalArgumentException("distillation weights must be >= 0, got alpha=" + alpha + " beta=" + beta);
            if (!(temperature > 0)) throw new IllegalArgumentException("distillation temperature must be > 0, got " + temperature);
        }
    }

    /** {@link #forwardLoss(Tensor, Tensor, int, Distill)} without distillation. */
    public Tensor forwardLoss(Tensor tokens, Tensor targets, int validTargets) {
        return forwardLoss(tokens, targets, validTargets, null);
    }

    /**
     * Forward with the loss. Returns a device tensor [3] (F32; F64 in the float64 mode): the mean cross-entropy
     * over targets >= 0, the sum of the FFNs' auxiliary losses (already scaled by their coefficients) and the
     * distillation term (0 without {@code kd}). The objective is alpha*ce + aux + beta*kd (alpha 1 without kd);
     * nothing is read to the host.
     */
    public Tensor forwardLoss(Tensor tokens, Tensor targets, int validTargets, Distill kd) {
        Backend b = ctx.backend();
        if (validTargets <= 0) throw new IllegalArgumentException("validTargets must be > 0, got " + validTargets);
        Tensor lg = forward(tokens);
        this.targets = targets;
        this.distill = kd;
        DType f = ctx.dtype() == DType.F64 ? DType.F64 : DType.F32;
        Tensor losses = b.empty(f, lg.rows());
        b.crossEntropy(lg, targets.reshape(lg.rows()), losses);
        Tensor loss = b.zeros(f, 3);
        Tensor ce = loss.view(0, 1), auxSum = loss.view(1, 1), kdLoss = loss.view(2, 1);
        b.sum(losses, ce);
        b.scale(ce, 1.0 / validTargets, ce);
        for (Block blk : blocks) {
            Tensor aux = blk.ffn().auxLoss();
            if (aux != null) b.add(auxSum, 1, aux, 1, auxSum);
        }
        if (kd != null) {
            b.distillationLoss(lg, kd.teacherLogits(), kd.temperature(), losses);
            b.sum(losses, kdLoss);
            b.scale(kdLoss, 1.0 / lg.rows(), kdLoss);
        }
        return loss;
    }

    /** Backward of {@link #forwardLoss}; {@code gradScale} multiplies every gradient (e.g. 1 / micro-batches). */
    public void backwardLoss(int validTargets, float gradScale) {
        Backend b = ctx.backend();
        if (targets == null) throw new IllegalStateException("backwardLoss before forwardLoss");
        Tensor dlogits = b.empty(ctx.dtype(), logits.rows(), logits.cols());
        float alpha = distill == null ? 1f : distill.alpha();
        b.crossEntropyBackward(logits, targets.reshape(logits.rows()), alpha * gradScale / validTargets, dlogits);
        if (distill != null && distill.beta() > 0) {
            Tensor dkd = b.empty(ctx.dtype(), logits.rows(), logits.cols());
            b.distillationLossBackward(logits, distill.teacherLogits(), distill.temperature(), distill.beta() * gradScale / logits.rows(), dkd);
            b.add(dlogits, 1, dkd, 1, dlogits);
        }
        targets = null;
        distill = null;
        backward(dlogits, gradScale);
    }
}
