package dev.moe4j.core.nn;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.cpu.CpuBackend;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import dev.moe4j.core.testing.GradCheck;
import dev.moe4j.core.testing.Tensors;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.EnumSource;

import java.util.SplittableRandom;
import java.util.function.DoubleSupplier;

import static dev.moe4j.core.testing.GradCheck.F64_TOL;

/** Each layer's backward (input and parameter gradients) against float64 finite differences. */
class LayerGradientTest {
    private final Backend cpu = new CpuBackend();
    private final SplittableRandom rnd = new SplittableRandom(7);

    private ModelContext f64() { return new ModelContext(cpu, DType.F64, 11); }

    /** Runs forward once and backward with dy = r, then checks dx and every parameter. */
    private void checkLayer(ModelContext ctx, Tensor x, java.util.function.Function<Tensor, Tensor> fwd,
                            java.util.function.Function<Tensor, Tensor> bwd, int outRows, int outCols) {
        Tensor r = Tensors.random(cpu, DType.F64, rnd, 1, outRows, outCols);
        ctx.params().zeroGrad();
        fwd.apply(x);
        Tensor dx = bwd.apply(r);
        ctx.params().finishGrads();
        DoubleSupplier loss = () -> Tensors.dot(fwd.apply(x), r);
        GradCheck.check("dx", x, dx, loss, 150, F64_TOL);
        GradCheck.check("parameters", ctx.params().master(), ctx.params().grad(), loss, 300, F64_TOL);
    }

    @Test
    void linear() {
        ModelContext ctx = f64();
        Linear lin = new Linear(ctx, "lin", 7, 5, true, 0.5);
        ctx.allocateParameters();
        cpu.randomNormal(lin.bias().master(), 0, 0.5, 3, 0);  // non-zero bias so its gradient path matters
        checkLayer(ctx, Tensors.random(cpu, DType.F64, rnd, 1, 6, 7), lin::forward, lin::backward, 6, 5);
    }

    @ParameterizedTest
    @EnumSource(Activation.class)
    void mlp(Activation act) {
        ModelContext ctx = f64();
        Mlp mlp = new Mlp(ctx, "mlp", 6, 5, act, 0.5, 0.5);
        ctx.allocateParameters();
        checkLayer(ctx, Tensors.random(cpu, DType.F64, rnd, 1, 4, 6), mlp::forward, dy -> mlp.backward(dy, 1f), 4, 6);
    }

    @Test
    void layerNorm() {
        ModelContext ctx = f64();
        LayerNorm ln = new LayerNorm(ctx, "ln", 9);
        ctx.allocateParameters();
        cpu.randomNormal(ctx.params().master(), 1, 0.3, 5, 0);
        checkLayer(ctx, Tensors.random(cpu, DType.F64, rnd, 1, 5, 9), ln::forward, ln::backward, 5, 9);
    }

    @Test
    void attention() {
        ModelContext ctx = f64();
        int b = 2, t = 3, c = 6;
        CausalSelfAttention att = new CausalSelfAttention(ctx, "att", c, 2, 0.5, 0.5);
        ctx.allocateParameters();
        checkLayer(ctx, Tensors.random(cpu, DType.F64, rnd, 1, b * t, c), x -> att.forward(x, b, t), att::backward, b * t, c);
    }

    @Test
    void block() {
        ModelContext ctx = f64();
        int b = 2, t = 3, c = 6;
        Block blk = new Block(ctx, "h.0", c, 3, name -> new Mlp(ctx, name, c, 10, Activation.GELU, 0.5, 0.5), 0.5, 0.5);
        ctx.allocateParameters();
        checkLayer(ctx, Tensors.random(cpu, DType.F64, rnd, 1, b * t, c), x -> blk.forward(x, b, t), dy -> blk.backward(dy, 1f), b * t, c);
    }

    @Test
    void wholeGptLoss() {
        ModelContext ctx = f64();
        GptConfig cfg = new GptConfig(11, 8, 2, 8, 2, 12, Activation.GELU);
        Gpt gpt = new Gpt(ctx, cfg);
        ctx.allocateParameters();
        int b = 2, t = 5;
        Tensor tokens = Tensors.randomInts(cpu, rnd, 0, 11, b, t);
        int[] tg = Tensors.randomInts(cpu, rnd, 0, 11, b, t).toInts();
        tg[4] = -1;  // an ignored position
        Tensor targets = cpu.fromInts(tg, b, t);
        int valid = b * t - 1;
        ctx.params().zeroGrad();
        gpt.forwardLoss(tokens, targets, valid);
        gpt.backwardLoss(valid, 1f);
        ctx.params().finishGrads();
        DoubleSupplier loss = () -> gpt.forwardLoss(tokens, targets, valid).toDoubles()[0];
        GradCheck.check("gpt parameters", ctx.params().master(), ctx.params().grad(), loss, 400, F64_TOL);
    }
}
