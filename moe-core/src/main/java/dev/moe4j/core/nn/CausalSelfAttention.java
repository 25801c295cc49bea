package dev.moe4j.core.nn;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;

/**
 * Multi-head causal self-attention. B batch, T sequence, C channels, H heads.
 * x [B*T, C] -> qkv = Linear(C, 3C) -> fused attention -> [B*T, C] -> Linear(C, C).
 */
public final class CausalSelfAttention {
    private final ModelContext ctx;
    private final Linear qkv, proj;
    private final int dim, heads;
    private Tensor qkvOut, att, lse;  // saved for the backward
    private int batch, seq;

    public CausalSelfAttention(ModelContext ctx, String name, int dim, int heads, double std, double residualStd) {
        if (heads <= 0 || dim % heads != 0) throw new IllegalArgumentException(name + ": hidden size " + dim + " must be divisible by heads " + heads);
        this.ctx = ctx;
        this.dim = dim;
        this.heads = heads;
        this.qkv = new Linear(ctx, name + ".qkv", dim, 3 * dim, true, std);
        this.proj = new Linear(ctx, name + ".proj", dim, dim, true, residualStd);
    }

    /** x [B*T, C] -> [B*T, C]. */
    public Tensor forward(Tensor x, int batch, int seq) {
        Backend b = ctx.backend();
        this.batch = batch;
        this.seq = seq;
        qkvOut = qkv.forward(x);
        att = b.empty(ctx.dtype(), batch * seq, dim);
        lse = b.empty(ctx.dtype() == DType.F64 ? DType.F64 : DType.F32, batch, heads, seq);
        b.attention(qkvOut.reshape(batch, seq, 3 * dim), heads, att, lse);
        return proj.forward(att);
    }

    public Tensor backward(Tensor dy) {
        Backend b = ctx.backend();
        Tensor datt = proj.backward(dy);
        Tensor dqkv = b.empty(ctx.dtype(), batch * seq, 3 * dim);
        b.attentionBackward(datt, qkvOut.reshape(batch, seq, 3 * dim), att, lse, heads, dqkv);
        qkvOut = att = lse = null;
        return qkv.backward(dqkv);
    }
}
