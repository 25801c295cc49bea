package dev.moe4j.core.nn;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.Tensor;

import java.util.function.Function;

/**
 * Pre-LayerNorm transformer block: x = x + attn(ln1(x)); x = x + ffn(ln2(x)). The FFN is dense or MoE.
 * Residual-stream gradients are summed explicitly in the backward.
 */
public final class Block {
    private final ModelContext ctx;
    private final LayerNorm ln1, ln2;
    private final CausalSelfAttention attn;
    private final FeedForward ffn;

    /** {@code ffn} creates the FFN from its parameter-name prefix ("name.ffn"), after the attention is declared. */
    public Block(ModelContext ctx, String name, int dim, int heads, Function<String, FeedForward> ffn, double std, double residualStd) {
        this.ctx = ctx;
        this.ln1 = new LayerNorm(ctx, name + ".ln1", dim);
        this.attn = new CausalSelfAttention(ctx, name + ".attn", dim, heads, std, residualStd);
        this.ln2 = new LayerNorm(ctx, name + ".ln2", dim);
        this.ffn = ffn.apply(name + ".ffn");
    }

    /** The block's FFN (dense or MoE). */
    public FeedForward ffn() { return ffn; }

    /** x [B*T, C] -> [B*T, C]. */
    public Tensor forward(Tensor x, int batch, int seq) {
        Backend b = ctx.backend();
        Tensor a = attn.forward(ln1.forward(x), batch, seq);
        Tensor h = b.empty(ctx.dtype(), x.rows(), x.cols());
        b.add(x, 1, a, 1, h);
        Tensor f = ffn.forward(ln2.forward(h));
        Tensor out = b.empty(ctx.dtype(), x.rows(), x.cols());
        b.add(h, 1, f, 1, out);
        return out;
    }

    /** dout [B*T, C] -> dx [B*T, C]; {@code lossScale} scales the FFN's auxiliary-loss gradient. */
    public Tensor backward(Tensor dout, float lossScale) {
        Tensor dh = ln2.backward(ffn.backward(dout, lossScale), dout);   // + dout: the residual around the FFN
        return ln1.backward(attn.backward(dh), dh);                      // + dh: the residual around attention
    }
}
