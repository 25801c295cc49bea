package dev.moe4j.cuda;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.backend.AdamWParams;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import org.junit.jupiter.api.Tag;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.EnumSource;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assumptions.assumeTrue;

/** Every dense op of the CUDA backend against the CPU reference, on fresh random inputs and odd sizes. */
@Tag("gpu")
class CudaOpsTest extends GpuTestBase {

    @ParameterizedTest
    @EnumSource(value = DType.class, names = {"F32", "BF16"})
    void transfersCopyFill(DType dt) {
        Tensor[] x = rand(dt, 3, 7, 13);
        check("fromDoubles/toDoubles", x, 0);
        DType other = dt == DType.F32 ? DType.BF16 : DType.F32;
        Tensor[] y = {cpu.zeros(other, 7, 13), gpu.zeros(other, 7, 13)};
        for (int i = 0; i < 2; i++) on(i).copy(x[i], y[i]);
        check("copy " + dt + " -> " + other, y, 0);
        for (int i = 0; i < 2; i++) on(i).fill(y[i], 1.2345);
        check("fill", y, 0);
        Tensor[] n = ints(-5, 100, 11);
        checkInts("fromInts/toInts", n);
        assertEquals(0.0, gpu.zeros(dt, 5).toDoubles()[3]);
    }

    /** timeEachMs queues its runs back to back: every run executes, in order, before it returns; one time per run. */
    @Test
    void timeEachMsRunsEveryRunInOrder() {
        Tensor x = gpu.zeros(DType.F32, 1 << 20), one = gpu.zeros(DType.F32, 1 << 20);
        gpu.fill(one, 1);
        int[] issued = {0};
        double[] ms = gpu.timeEachMs(7, () -> { gpu.scale(x, 2, x); gpu.add(x, 1, one, 1, x); issued[0]++; });
        assertEquals(7, ms.length);
        assertEquals(7, issued[0]);
        for (double v : ms) org.junit.jupiter.api.Assertions.assertTrue(v > 0 && Double.isFinite(v), "each run's time: " + v);
        // x -> 2x + 1 seven times from 0: 2^7 - 1 (order matters: the runs did not overlap or reorder)
        float[] got = x.toFloats();
        assertEquals(127f, got[0]);
        assertEquals(127f, got[got.length - 1]);
    }

    @Test
    void randomIsTheSameFunctionAsTheCpu() {
        Tensor[] u = {cpu.zeros(DType.F32, 1001), gpu.zeros(DType.F32, 1001)};
        for (int i = 0; i < 2; i++) on(i).randomUniform(u[i], -2, 3, 0x1234_5678_9abcL, (1L << 33) + 5);
        assertArrayEquals(u[0].toFloats(), u[1].toFloats(), "uniform must be bit-identical");
        Tensor[] nrm = {cpu.zeros(DType.F32, 1001), gpu.zeros(DType.F32, 1001)};
        for (int i = 0; i < 2; i++) on(i).randomNormal(nrm[i], 0.5, 2, 77, 123456789L);
        check("randomNormal", nrm, 1e-6);
    }

    static int[][] gemmShapes() { return new int[][] {{37, 53, 29}, {1, 17, 64}, {128, 96, 200}}; }

    /**
     * matmulBias: bf16 products whose bias the cuBLASLt epilogue adds (aligned shapes: the tuned plan must run) and the
     * fallback (odd sizes, fp32) against the CPU's product plus bias, every transpose combination.
     */
    @ParameterizedTest
    @EnumSource(value = DType.class, names = {"F32", "BF16"})
    void matmulBias(DType dt) {
        if (gpu.ltTuner() != null) gpu.ltTuner().clear();   // room for these shapes under the tuner's shape limit
        for (int[] s : new int[][] {{64, 128, 96}, {200, 72, 1024}, {37, 53, 29}}) {
            int m = s[0], n = s[1], k = s[2];
            for (int t = 0; t < 4; t++) {
                boolean ta = (t & 1) != 0, tb = (t & 2) != 0;
                Tensor[] a = ta ? rand(dt, 1, k, m) : rand(dt, 1, m, k);
                Tensor[] b = tb ? rand(dt, 1, n, k) : rand(dt, 1, k, n);
                Tensor[] bias = rand(dt, 1, n), c = rand(dt, 1, m, n);
                long ltBefore = gpu.ltTuner() == null ? 0 : gpu.ltTuner().ltRuns;
                for (int i = 0; i < 2; i++) on(i).matmulBias(a[i], ta, b[i], tb, bias[i], c[i]);
                check("matmulBias " + m + "x" + n + "x" + k + " tA=" + ta + " tB=" + tb, c, tol(dt));
                if (dt == DType.BF16 && m % 8 == 0 && n % 8 == 0 && k % 8 == 0 && gpu.ltTuner() != null) {
                    assertTrue(gpu.ltTuner().ltRuns > ltBefore, "the bias epilogue ran for " + m + "x" + n + "x" + k + ": " + gpu.ltTuner().describe());
                }
            }
        }
    }

    @ParameterizedTest
    @EnumSource(value = DType.class, names = {"F32", "BF16"})
    void matmulRank2AllTransposes(DType dt) {
        for (int[] s : gemmShapes()) {
            int m = s[0], n = s[1], k = s[2];
            for (int t = 0; t < 4; t++) {
                boolean ta = (t & 1) != 0, tb = (t & 2) != 0;
                Tensor[] a = ta ? rand(dt, 1, k, m) : rand(dt, 1, m, k);
                Tensor[] b = tb ? rand(dt, 1, n, k) : rand(dt, 1, k, n);
                Tensor[] c = rand(dt, 1, m, n);
                for (int i = 0; i < 2; i++) on(i).matmul(a[i], ta, b[i], tb, c[i], 0.75f, 0.5f);
                check("matmul " + m + "x" + n + "x" + k + " tA=" + ta + " tB=" + tb, c, tol(dt));
            }
        }
    }

    @Test
    void matmulMixedDtypesAndBatched() {
        Tensor[] a = rand(DType.F32, 1, 19, 33), b = rand(DType.BF16, 1, 33, 21), c = rand(DType.BF16, 1, 19, 21);
        for (int i = 0; i < 2; i++) on(i).matmul(a[i], false, b[i], false, c[i], 1f, 1f);
        check("matmul f32 x bf16 -> bf16", c, BF16_TOL);
        Tensor[] a3 = rand(DType.F32, 1, 3, 17, 9), b3 = rand(DType.F32, 1, 3, 11, 9), c3 = rand(DType.F32, 1, 3, 17, 11);
        for (int i = 0; i < 2; i++) on(i).matmul(a3[i], false, b3[i], true, c3[i], 1f, 0f);
        check("matmul batched [3] 17x11x9 tB", c3, F32_TOL);
        Tensor[] bb = rand(DType.BF16, 1, 4, 23, 31), cb = rand(DType.BF16, 1, 4, 31, 15), ob = rand(DType.F32, 1, 4, 23, 15);
        for (int i = 0; i < 2; i++) on(i).matmul(bb[i], false, cb[i], false, ob[i], 1f, 0f);
        check("matmul batched bf16 -> f32", ob, BF16_TOL);
    }

    /**
     * fp32 products with a bf16 operand or output (the gate's three products) run on bf16 tensor cores with the fp32
     * operands split into bf16 pieces: fp32 accuracy is the claim, so the fp32 outputs are held to 3e-6 (one bf16
     * rounding of an operand would give about 2e-3), bf16 outputs to 4e-3 (their own rounding, about 2.7e-3 here),
     * in every transpose, with alpha and beta.
     */
    @Test
    void matmulF32ProductsSplitIntoBf16Pieces() {
        int m = 300, n = 64, k = 257;
        DType[][] cases = {
            {DType.BF16, DType.F32, DType.F32},    // logits = x W^T
            {DType.F32, DType.BF16, DType.F32},    // dW = dlogits^T x (fp32 gradient)
            {DType.F32, DType.BF16, DType.BF16},   // dW in a bf16 gradient buffer
            {DType.F32, DType.F32, DType.BF16},    // dx += dlogits W
            {DType.BF16, DType.F32, DType.BF16},
        };
        for (DType[] dts : cases) {
            for (int t = 0; t < 4; t++) {
                boolean ta = (t & 1) != 0, tb = (t & 2) != 0;
                Tensor[] a = ta ? rand(dts[0], 1, k, m) : rand(dts[0], 1, m, k);
                Tensor[] b = tb ? rand(dts[1], 1, n, k) : rand(dts[1], 1, k, n);
                Tensor[] c = rand(dts[2], 1, m, n);
                for (int i = 0; i < 2; i++) on(i).matmul(a[i], ta, b[i], tb, c[i], 0.75f, 0.5f);
                check("matmul " + dts[0] + " x " + dts[1] + " -> " + dts[2] + " tA=" + ta + " tB=" + tb, c,
                        dts[2] == DType.F32 ? 3e-6 : 4e-3);
            }
        }
    }

    @ParameterizedTest
    @EnumSource(value = DType.class, names = {"F32", "BF16"})
    void groupedMatmulAndWeightGrad(DType dt) {
        int e = 5, k = 24, n = 40, t = 61;
        int[] offs = {0, 13, 13, 30, 52, 58};  // an empty expert, rows 58..61 untouched
        Tensor[] o = of(offs, e + 1);
        for (boolean tw : new boolean[] {false, true}) {
            Tensor[] a = rand(dt, 1, t, k), w = tw ? rand(dt, 1, e, n, k) : rand(dt, 1, e, k, n), c = rand(dt, 1, t, n);
            for (int i = 0; i < 2; i++) on(i).groupedMatmul(a[i], w[i], tw, o[i], c[i], 0.5f);
            check("groupedMatmul transW=" + tw, c, tol(dt));
        }
        for (float beta : new float[] {0f, 1f, 0.25f}) {
            Tensor[] a = rand(dt, 1, t, k), dy = rand(dt, 1, t, n), dw = rand(dt, 1, e, k, n);
            for (int i = 0; i < 2; i++) on(i).groupedMatmulWeightGrad(a[i], dy[i], o[i], dw[i], beta);
            check("groupedMatmulWeightGrad beta=" + beta, dw, tol(dt));
        }
        // offsets given on the host too (no device read): the same results
        Tensor[] a = rand(dt, 1, t, k), w = rand(dt, 1, e, k, n), c = rand(dt, 1, t, n), dw = rand(dt, 1, e, k, n);
        for (int i = 0; i < 2; i++) on(i).groupedMatmul(a[i], w[i], false, o[i], offs, c[i], 0.5f);
        check("groupedMatmul host offsets", c, tol(dt));
        for (int i = 0; i < 2; i++) on(i).groupedMatmulWeightGrad(a[i], c[i], o[i], offs, dw[i], 1f);
        check("groupedMatmulWeightGrad host offsets", dw, tol(dt));
    }

    /**
     * Our own grouped kernels (native/grouped_gemm_sm90.cu on an H100/H200, native/grouped_gemm.cu) and the cuBLAS
     * forms, each forced, and AUTO's picks, on shapes that cross every tile edge: K and N not multiples of the tiles
     * (64-deep k-tiles, 128 and 256 columns), an expert of more than two 128-row tiles, empty experts, rows past
     * offsets[E] (untouched, checked bit for bit), bf16 and fp32 outputs, beta 0 and not. The wgmma kernels run
     * by the backend's grid (one block per tile on the first shape's few rows per expert, persistent on the second's
     * many), then persistent on 3 blocks, each walking many tiles (the weight gradient is always persistent).
     */
    @ParameterizedTest
    @EnumSource(CudaBackend.GroupedKernel.class)
    void groupedKernelsAcrossTileEdges(CudaBackend.GroupedKernel policy) {
        assumeTrue(policy != CudaBackend.GroupedKernel.WGMMA || gpu.hasWgmma(), "the wgmma kernels need compute capability 9.0");
        CudaBackend.GroupedKernel saved = gpu.groupedKernel;
        gpu.groupedKernel = policy;
        try {
            groupedKernelsAcrossTileEdges(policy.toString(), TILE_EDGES_KN);
            if (policy == CudaBackend.GroupedKernel.WGMMA) {
                gpu.wgmmaBlocks = 3;
                groupedKernelsAcrossTileEdges(policy + " on 3 persistent blocks", TILE_EDGES_KN);
            }
        } finally {
            gpu.groupedKernel = saved;
            gpu.wgmmaBlocks = 0;
        }
    }

    // (K, N): K past two 64-deep k-tiles and 128-row dW tiles, N inside one 256-column tile; then N over three
    private static final int[][] TILE_EDGES_KN = {{200, 136}, {72, 520}};

    private void groupedKernelsAcrossTileEdges(String policy, int[][] kn) {
        // few rows per expert (the 64-row tiles) and many (the 128-row tiles)
        for (int[] offs : new int[][] {{0, 5, 5, 70, 133, 133, 190}, {0, 300, 300, 301, 429, 700}}) {
            int k = kn[offs.length % 2][0], n = kn[offs.length % 2][1];
            int e = offs.length - 1, t = offs[e] + 9;
            Tensor[] o = of(offs, e + 1);
            for (DType out : new DType[] {DType.BF16, DType.F32}) {
                for (boolean tw : new boolean[] {false, true}) {
                    for (float beta : new float[] {0f, 0.5f}) {
                        Tensor[] a = rand(DType.BF16, 1, t, k), w = tw ? rand(DType.BF16, 1, e, n, k) : rand(DType.BF16, 1, e, k, n);
                        Tensor[] c = rand(out, 1, t, n);
                        double[] tail = java.util.Arrays.copyOfRange(c[1].toDoubles(), offs[e] * n, t * n);
                        for (int i = 0; i < 2; i++) on(i).groupedMatmul(a[i], w[i], tw, o[i], c[i], beta);
                        String what = policy + " groupedMatmul " + e + " experts, " + t + " rows, tW=" + tw + " beta=" + beta;
                        check(what, c, BF16_TOL);
                        assertArrayEquals(tail, java.util.Arrays.copyOfRange(c[1].toDoubles(), offs[e] * n, t * n), what + ": rows past offsets[E]");
                    }
                }
                for (float beta : new float[] {0f, 1f, 0.25f}) {
                    // NaN in the rows past offsets[E], which no product may read (0 x NaN is NaN)
                    Tensor[] a = nanRowsFrom(rand(DType.BF16, 1, t, k), offs[e]), dy = nanRowsFrom(rand(DType.BF16, 1, t, n), offs[e]);
                    Tensor[] dw = rand(out, 1, e, k, n);
                    for (int i = 0; i < 2; i++) on(i).groupedMatmulWeightGrad(a[i], dy[i], o[i], dw[i], beta);
                    check(policy + " groupedMatmulWeightGrad " + e + " experts -> " + out + " beta=" + beta, dw, BF16_TOL);
                }
            }
        }
    }

    /**
     * The experts' product with its activation (forward: h and act(h); backward: act'(h) times the data gradient, da
     * never stored) under each kernel choice: fused into the wgmma kernels' epilogues where they run it, else the
     * product and the activation kernels; against the CPU backend's unfused ops. GELU and RELU fuse, SWIGLU (gated)
     * takes the unfused path everywhere. Uneven experts (an empty one), K and N off the tile sizes.
     */
    @ParameterizedTest
    @EnumSource(value = CudaBackend.GroupedKernel.class, names = {"AUTO", "CUBLAS", "WGMMA"})
    void groupedMatmulWithActivationMatchesTheCpu(CudaBackend.GroupedKernel policy) {
        assumeTrue(policy != CudaBackend.GroupedKernel.WGMMA || gpu.hasWgmma(), "the wgmma kernels need compute capability 9.0");
        CudaBackend.GroupedKernel saved = gpu.groupedKernel;
        gpu.groupedKernel = policy;
        try {
            activationProducts(policy.toString(), SOME_PAST_64, 200, 136);
            activationProducts(policy.toString(), NONE_PAST_64, 200, 136);   // AUTO's fused case
            if (policy == CudaBackend.GroupedKernel.WGMMA) {
                // the fused epilogues' ping-pong schedule on one block, whose 64-row tiles alternate between the
                // consumers with 6 and 3 k-steps (the stages shared by both, the turns between them and the read-ahead
                // buffers reused across many tiles), over one and three column tiles
                gpu.wgmmaBlocks = 1;
                activationProducts(policy + " on one block", SOME_PAST_64, 328, 136);
                activationProducts(policy + " on one block", SOME_PAST_64, 136, 520);
            }
        } finally {
            gpu.groupedKernel = saved;
            gpu.wgmmaBlocks = 0;
        }
    }

    // experts' offsets with an empty expert and K, N off the tiles: one expert past a 64-row tile, or none (where AUTO fuses)
    private static final int[] SOME_PAST_64 = {0, 5, 5, 70, 133, 133, 190}, NONE_PAST_64 = {0, 5, 5, 64, 127, 127, 190};

    private void activationProducts(String policy, int[] offs, int k, int n) {
        int e = offs.length - 1, t = offs[e] + 9;
        Tensor[] o = of(offs, e + 1);
        for (Activation act : new Activation[] {Activation.GELU, Activation.RELU, Activation.SWIGLU}) {
            int wide = act.inputWidth(n);
            Tensor[] a = rand(DType.BF16, 1, t, k), w1 = rand(DType.BF16, 1, e, k, wide);
            Tensor[] h = rand(DType.BF16, 1, t, wide), out = rand(DType.BF16, 1, t, n);
            for (int i = 0; i < 2; i++) on(i).groupedMatmulActivation(a[i], w1[i], o[i], i == 1 ? offs : null, act, h[i], out[i]);
            check(policy + " groupedMatmulActivation " + act + " h", grouped(h, offs[e]), BF16_TOL);
            check(policy + " groupedMatmulActivation " + act + " out", grouped(out, offs[e]), BF16_TOL);
            // the backward from the CPU's h on both sides (a bf16 GELU' is steep: the GPU's own h would differ in ulps)
            Tensor[] dy = rand(DType.BF16, 1, t, k), w2 = rand(DType.BF16, 1, e, n, k), dh = rand(DType.BF16, 1, t, wide);
            Tensor hCpu = gpu.fromDoubles(DType.BF16, h[0].toDoubles(), t, wide);
            on(0).groupedMatmulActivationBackward(dy[0], w2[0], o[0], null, act, h[0], dh[0]);
            on(1).groupedMatmulActivationBackward(dy[1], w2[1], o[1], offs, act, hCpu, dh[1]);
            check(policy + " groupedMatmulActivationBackward " + act, grouped(dh, offs[e]), BF16_TOL);
            hCpu.close();
        }
    }

    /** A CPU/GPU pair of matrices with its rows from {@code from} on set to NaN on both sides. */
    private Tensor[] nanRowsFrom(Tensor[] pair, int from) {
        double[] v = pair[0].toDoubles();
        java.util.Arrays.fill(v, from * pair[0].cols(), v.length, Double.NaN);
        int[] dims = pair[0].shape().dims();
        DType dt = pair[0].dtype();
        for (Tensor t : pair) t.close();
        return new Tensor[] {cpu.fromDoubles(dt, v, dims), gpu.fromDoubles(dt, v, dims)};
    }

    /** The first rows of a CPU/GPU pair (the rows of the groups: what follows offsets[G] is unspecified). */
    private static Tensor[] grouped(Tensor[] pair, int rows) {
        return new Tensor[] {pair[0].rowSlice(0, rows), pair[1].rowSlice(0, rows)};
    }

    /** Many unequal experts (some empty): cuBLAS's grouped-batched path, called back to back without a stream wait. */
    @ParameterizedTest
    @EnumSource(value = DType.class, names = {"F32", "BF16"})
    void groupedMatmulManyExpertsBackToBack(DType dt) {
        int e = 40, k = 32, n = 24;
        int[] offs = new int[e + 1];
        for (int g = 0; g < e; g++) offs[g + 1] = offs[g] + (g % 9 == 4 ? 0 : 1 + rnd.nextInt(12));
        int t = offs[e] + 3;   // rows past offsets[E] untouched
        Tensor[] o = of(offs, e + 1);
        Tensor[] a = rand(dt, 1, t, k), w = rand(dt, 1, e, k, n), c = rand(dt, 1, t, n), dw = rand(dt, 1, e, k, n);
        for (int rep = 0; rep < 3; rep++) {   // repeated: host arrays of one call must not leak into the next
            for (int i = 0; i < 2; i++) on(i).groupedMatmul(a[i], w[i], false, o[i], c[i], 0.5f);
            for (int i = 0; i < 2; i++) on(i).groupedMatmulWeightGrad(a[i], c[i], o[i], dw[i], 1f);
        }
        check("groupedMatmul 40 experts", c, tol(dt));
        check("groupedMatmulWeightGrad 40 experts", dw, tol(dt));
    }

    /** Equal-size experts back to back (the capacity-padded buffer): the strided-batched path. */
    @ParameterizedTest
    @EnumSource(value = DType.class, names = {"F32", "BF16"})
    void groupedMatmulEqualExperts(DType dt) {
        int e = 6, cap = 7, k = 24, n = 20, t = e * cap;
        int[] offs = new int[e + 1];
        for (int g = 0; g <= e; g++) offs[g] = g * cap;
        Tensor[] o = of(offs, e + 1);
        for (boolean tw : new boolean[] {false, true}) {
            Tensor[] a = rand(dt, 1, t, k), w = tw ? rand(dt, 1, e, n, k) : rand(dt, 1, e, k, n), c = rand(dt, 1, t, n);
            for (int i = 0; i < 2; i++) on(i).groupedMatmul(a[i], w[i], tw, o[i], c[i], 0.5f);
            check("groupedMatmul equal experts transW=" + tw, c, tol(dt));
        }
        Tensor[] a = rand(dt, 1, t, k), dy = rand(dt, 1, t, n), dw = rand(DType.F32, 1, e, k, n);
        for (int i = 0; i < 2; i++) on(i).groupedMatmulWeightGrad(a[i], dy[i], o[i], dw[i], 1f);
        check("groupedMatmulWeightGrad equal experts -> F32", dw, tol(dt));
    }

    /** 40 experts: the cublasGemmGroupedBatchedEx path (32 or more non-empty groups), with empty experts too. */
    @ParameterizedTest
    @EnumSource(value = DType.class, names = {"F32", "BF16"})
    void groupedMatmulManyExperts(DType dt) {
        int e = 40, k = 24, n = 20;
        int[] offs = new int[e + 1];
        for (int g = 0; g < e; g++) offs[g + 1] = offs[g] + (g % 9 == 4 ? 0 : 1 + rnd.nextInt(7));
        int t = offs[e] + 3;
        Tensor[] o = of(offs, e + 1);
        for (boolean tw : new boolean[] {false, true}) {
            Tensor[] a = rand(dt, 1, t, k), w = tw ? rand(dt, 1, e, n, k) : rand(dt, 1, e, k, n), c = rand(dt, 1, t, n);
            for (int i = 0; i < 2; i++) on(i).groupedMatmul(a[i], w[i], tw, o[i], c[i], 0.5f);
            check("groupedMatmul 40 experts transW=" + tw, c, tol(dt));
        }
        for (DType gd : new DType[] {dt, DType.F32}) {
            Tensor[] a = rand(dt, 1, t, k), dy = rand(dt, 1, t, n), dw = rand(gd, 1, e, k, n);
            for (int i = 0; i < 2; i++) on(i).groupedMatmulWeightGrad(a[i], dy[i], o[i], dw[i], 1f);
            check("groupedMatmulWeightGrad 40 experts -> " + gd, dw, tol(dt));
        }
    }

    /** bf16 tensors of whole 8-element groups take the 8-wide add and conversion kernels. */
    @Test
    void eightWideAddAndConversions() {
        Tensor[] a = rand(DType.BF16, 2, 24, 40), b = rand(DType.BF16, 2, 24, 40), out = rand(DType.BF16, 1, 24, 40);
        for (int i = 0; i < 2; i++) on(i).add(a[i], 0.5, b[i], -1.5, out[i]);
        check("add bf16 x 8", out, BF16_TOL);
        for (int i = 0; i < 2; i++) on(i).add(out[i], 1.0, b[i], 2.0, out[i]);
        check("add bf16 x 8 (aliased out)", out, BF16_TOL);
        Tensor[] f = {cpu.zeros(DType.F32, 24, 40), gpu.zeros(DType.F32, 24, 40)};
        for (int i = 0; i < 2; i++) on(i).copy(out[i], f[i]);
        check("copy bf16 -> f32 x 8", f, 0);
        Tensor[] g = rand(DType.F32, 3, 24, 40), h = {cpu.zeros(DType.BF16, 24, 40), gpu.zeros(DType.BF16, 24, 40)};
        for (int i = 0; i < 2; i++) on(i).copy(g[i], h[i]);
        check("copy f32 -> bf16 x 8 (one rounding)", h, 0);
        for (int i = 0; i < 2; i++) on(i).fill(g[i], 0);   // a memset on the GPU
        check("fill 0", g, 0);
        assertEquals(0.0, java.util.Arrays.stream(g[1].toDoubles()).map(Math::abs).max().orElseThrow());
    }

    @ParameterizedTest
    @EnumSource(value = DType.class, names = {"F32", "BF16"})
    void elementwise(DType dt) {
        Tensor[] a = rand(dt, 2, 33, 17), b = rand(DType.F32, 2, 33, 17), out = rand(dt, 1, 33, 17);
        for (int i = 0; i < 2; i++) on(i).add(a[i], 0.5, b[i], -1.5, out[i]);
        check("add", out, tol(dt));
        for (int i = 0; i < 2; i++) on(i).add(out[i], 1.0, b[i], 2.0, out[i]);
        check("add (aliased out)", out, tol(dt));
        for (int i = 0; i < 2; i++) on(i).mul(a[i], b[i], out[i]);
        check("mul", out, tol(dt));
        for (int i = 0; i < 2; i++) on(i).scale(a[i], -3.25, out[i]);
        check("scale", out, tol(dt));
        Tensor[] bias = rand(dt, 1, 17);
        for (int i = 0; i < 2; i++) on(i).addBias(a[i], bias[i], out[i]);
        check("addBias", out, tol(dt));
        Tensor[] wide = rand(dt, 2, 300, 48), wideBias = rand(dt, 1, 48), wideOut = rand(dt, 1, 300, 48);   // bf16: the 8-wide kernel
        for (int i = 0; i < 2; i++) on(i).addBias(wide[i], wideBias[i], wideOut[i]);
        check("addBias width 48", wideOut, tol(dt));
        // each row's bias from a table of 5 (-1: none), widths 48 (bf16: the 8-wide kernel) and 17, in place
        int[] groups = new int[300];
        for (int r = 0; r < groups.length; r++) groups[r] = r % 37 == 3 ? -1 : rnd.nextInt(5);
        Tensor[] grp = of(groups, groups.length);
        for (int width : new int[] {48, 17}) {
            Tensor[] gx = rand(dt, 2, 300, width), table = rand(dt, 1, 5, width);
            for (int i = 0; i < 2; i++) on(i).addGroupBias(gx[i], table[i], grp[i], gx[i]);
            check("addGroupBias width " + width, gx, tol(dt));
        }
        Tensor[] sr = rand(DType.F32, 1, 17);
        for (int i = 0; i < 2; i++) on(i).sumRows(a[i], sr[i], 1f);
        check("sumRows (accumulate)", sr, tol(dt));
        Tensor[] tall = rand(dt, 1, 3001, 45), srt = rand(DType.F32, 1, 45);
        for (int i = 0; i < 2; i++) on(i).sumRows(tall[i], srt[i], 0.5f);
        check("sumRows tall (two-pass)", srt, tol(dt) * 10);
        Tensor[] step = rand(dt, 1, 8192, 1024), srs = rand(DType.F32, 1, 1024);   // a bias gradient of a 350M step
        for (int i = 0; i < 2; i++) on(i).sumRows(step[i], srs[i], 0f);
        check("sumRows 8192 x 1024 (64 row blocks)", srs, tol(dt) * 10);
        Tensor[] rd = rand(DType.F32, 1, 33);
        for (int i = 0; i < 2; i++) on(i).rowDot(a[i], b[i], rd[i]);
        check("rowDot", rd, tol(dt));
    }

    @ParameterizedTest
    @EnumSource(Activation.class)
    void activations(Activation act) {
        for (DType dt : new DType[] {DType.F32, DType.BF16}) for (int f : new int[] {45, 48}) {   // bf16 width 48: the 8-wide kernels
            Tensor[] x = rand(dt, 3, 7, act.inputWidth(f)), out = rand(dt, 1, 7, f);
            for (int i = 0; i < 2; i++) on(i).activation(act, x[i], out[i]);
            check("activation " + act + " width " + f, out, tol(dt));
            Tensor[] dout = rand(dt, 1, 7, f), dx = rand(dt, 1, 7, act.inputWidth(f));
            for (int i = 0; i < 2; i++) on(i).activationBackward(act, x[i], dout[i], dx[i]);
            check("activationBackward " + act + " width " + f, dx, tol(dt) * (dt == DType.F32 ? 10 : 1));
        }
    }

    @ParameterizedTest
    @EnumSource(Activation.class)
    void activationWithGroupBias(Activation act) {
        // the expert bank's first bias taken into its activation: groups as the grouped GEMMs give them (uneven, one
        // empty, one over several 32-row blocks, rows 280..299 past the last offset), some rows without a bias (-1)
        int rows = 300;
        int[] offs = {0, 40, 40, 150, 155, 280}, groups = new int[rows];
        for (int g = 0; g + 1 < offs.length; g++) for (int r = offs[g]; r < offs[g + 1]; r++) groups[r] = g;
        for (int r = 0; r < rows; r++) if (r % 37 == 3) groups[r] = -1;
        Tensor[] grp = of(groups, rows), o = of(offs, offs.length);
        for (DType dt : new DType[] {DType.F32, DType.BF16}) for (int f : new int[] {45, 48}) {   // bf16 GELU/RELU width 48: fused
            int w = act.inputWidth(f);
            Tensor[] x = rand(dt, 3, rows, w), bias = rand(dt, 1, offs.length - 1, w), out = rand(dt, 1, rows, f);
            for (int i = 0; i < 2; i++) on(i).activationGroupBias(act, x[i], bias[i], grp[i], out[i]);
            check("activationGroupBias " + act + " " + dt + " width " + f, out, tol(dt));
            Tensor[] dout = rand(dt, 1, rows, f), dx = rand(dt, 1, rows, w), dbias = rand(DType.F32, 1, offs.length - 1, w);
            for (int i = 0; i < 2; i++) on(i).activationGroupBiasBackward(act, x[i], bias[i], grp[i], o[i], dout[i], dx[i], dbias[i]);
            check("activationGroupBiasBackward dx " + act + " " + dt + " width " + f, dx, tol(dt) * (dt == DType.F32 ? 10 : 1));
            check("activationGroupBiasBackward dbias " + act + " " + dt + " width " + f, dbias, tol(dt) * 10);
        }
    }

    @ParameterizedTest
    @EnumSource(value = DType.class, names = {"F32", "BF16"})
    void layerNormForwardBackward(DType dt) {
        // bf16 C = 256 ... 2048 in 256-column steps: the warp-per-row kernels
        for (int[] nc : new int[][] {{11, 7}, {11, 129}, {11, 1030}, {2003, 96}, {300, 1024}, {37, 256}, {65, 2048}}) {
            int n = nc[0], c = nc[1];
            Tensor[] x = rand(dt, 2, n, c), g = rand(dt, 1, c), b = rand(dt, 1, c), out = rand(dt, 1, n, c);
            Tensor[] mean = rand(DType.F32, 1, n), rstd = rand(DType.F32, 1, n);
            for (int i = 0; i < 2; i++) on(i).layerNorm(x[i], g[i], b[i], 1e-5f, out[i], mean[i], rstd[i]);
            check("layerNorm C=" + c, out, tol(dt) * 2);
            check("layerNorm mean", mean, 1e-5);
            check("layerNorm rstd", rstd, 1e-5);
            Tensor[] dout = rand(dt, 1, n, c), dx = rand(dt, 1, n, c), dg = rand(dt, 1, c), db = rand(dt, 1, c);
            for (int i = 0; i < 2; i++) on(i).layerNormBackward(dout[i], x[i], g[i], mean[i], rstd[i], dx[i], dg[i], db[i]);
            check("layerNormBackward dx C=" + c, dx, tol(dt) * 5);
            check("layerNormBackward dgamma", dg, tol(dt) * 2);
            check("layerNormBackward dbeta", db, tol(dt));
            // with a residual gradient added to dx (the warp kernel for bf16 C = 256 v, the row kernel otherwise)
            Tensor[] res = rand(dt, 1, n, c);
            for (int i = 0; i < 2; i++) on(i).layerNormBackward(dout[i], x[i], g[i], mean[i], rstd[i], res[i], dx[i], dg[i], db[i]);
            check("layerNormBackward dx + residual C=" + c, dx, tol(dt) * 5);
            check("layerNormBackward dgamma (accumulated)", dg, tol(dt) * 2);
        }
    }

    @ParameterizedTest
    @EnumSource(value = DType.class, names = {"F32", "BF16"})
    void softmaxForwardBackward(DType dt) {
        Tensor[] x = rand(dt, 4, 9, 301), y = rand(dt, 1, 9, 301);
        for (int i = 0; i < 2; i++) on(i).softmax(x[i], y[i]);
        check("softmax", y, tol(dt));
        Tensor[] dy = rand(dt, 1, 9, 301), dx = rand(dt, 1, 9, 301);
        for (int i = 0; i < 2; i++) on(i).softmaxBackward(y[i], dy[i], dx[i]);
        check("softmaxBackward", dx, tol(dt) * 2);
    }

    @ParameterizedTest
    @EnumSource(value = DType.class, names = {"F32", "BF16"})
    void attentionForwardBackward(DType dt) {
        // {B, T, H, D}: several key tiles; bf16 with D = 64 / 128 runs the tensor-core forward; D = 160 the row kernels
        for (int[] cfg : new int[][] {{2, 37, 3, 16}, {1, 100, 2, 64}, {2, 130, 2, 64}, {1, 45, 1, 128}, {1, 77, 2, 128}, {2, 21, 1, 160}}) {
            int b = cfg[0], t = cfg[1], h = cfg[2], d = cfg[3], c = h * d;
            String name = "attention B=" + b + " T=" + t + " H=" + h + " D=" + d;
            Tensor[] qkv = rand(dt, 1, b, t, 3 * c), out = rand(dt, 1, b, t, c), lse = rand(DType.F32, 1, b, h, t);
            for (int i = 0; i < 2; i++) on(i).attention(qkv[i], h, out[i], lse[i]);
            check(name + " out", out, tol(dt));
            check(name + " lse", lse, F32_TOL);
            Tensor[] dout = rand(dt, 1, b, t, c), dqkv = rand(dt, 1, b, t, 3 * c);
            for (int i = 0; i < 2; i++) on(i).attentionBackward(dout[i], qkv[i], out[i], lse[i], h, dqkv[i]);
            check(name + " dqkv", dqkv, tol(dt) * (dt == DType.F32 ? 10 : 2));
        }
    }

    /**
     * The bf16 tensor-core attention kernels (attention_fa2.cu's mma.sync kernels) for D = 64 and 128: a long sequence
     * (many key tiles, the online softmax across them, the diagonal tiles) and odd lengths (partial query / key tiles,
     * partial warps, rows past T), several heads and batches; bf16 outputs, and f32 out / dout / dqkv with bf16 qkv
     * (the f32 store and dO conversion paths).
     */
    @Test
    void attentionTensorCoreKernels() {
        // {B, T, H, D}
        for (int[] cfg : new int[][] {{1, 1024, 2, 64}, {2, 77, 3, 64}, {1, 200, 2, 64}, {1, 1000, 2, 128}, {2, 77, 2, 128}, {1, 200, 1, 128}}) {
            for (DType io : new DType[] {DType.BF16, DType.F32}) {
                if (io == DType.F32 && cfg[1] != 200) continue;
                int b = cfg[0], t = cfg[1], h = cfg[2], d = cfg[3], c = h * d;
                String name = "attention B=" + b + " T=" + t + " H=" + h + " D=" + d + " out " + io;
                Tensor[] qkv = rand(DType.BF16, 1, b, t, 3 * c), out = rand(io, 1, b, t, c), lse = rand(DType.F32, 1, b, h, t);
                for (int i = 0; i < 2; i++) on(i).attention(qkv[i], h, out[i], lse[i]);
                check(name + " out", out, BF16_TOL);
                check(name + " lse", lse, F32_TOL);
                Tensor[] dout = rand(io, 1, b, t, c), dqkv = rand(io, 1, b, t, 3 * c);
                for (int i = 0; i < 2; i++) on(i).attentionBackward(dout[i], qkv[i], out[i], lse[i], h, dqkv[i]);
                check(name + " dqkv", dqkv, BF16_TOL * 2);
            }
        }
    }

    @ParameterizedTest
    @EnumSource(value = DType.class, names = {"F32", "BF16"})
    void embeddingForwardBackward(DType dt) {
        int b = 3, t = 9, c = 35, v = 6;  // a small vocabulary: repeated tokens
        Tensor[] tok = ints(0, v, b, t), wte = rand(dt, 1, v, c), wpe = rand(dt, 1, t + 2, c), out = rand(dt, 1, b, t, c);
        for (int i = 0; i < 2; i++) on(i).embedding(tok[i], wte[i], wpe[i], out[i]);
        check("embedding", out, tol(dt));
        for (int i = 0; i < 2; i++) on(i).embedding(tok[i], wte[i], null, out[i]);
        check("embedding without wpe", out, tol(dt));
        for (DType gd : new DType[] {DType.F32, DType.BF16}) {
            Tensor[] dout = rand(dt, 1, b, t, c), dwte = rand(gd, 1, v, c), dwpe = rand(gd, 1, t + 2, c);
            for (int i = 0; i < 2; i++) on(i).embeddingBackward(dout[i], tok[i], dwte[i], dwpe[i]);
            check("embeddingBackward dwte -> " + gd, dwte, tol(dt, gd));
            check("embeddingBackward dwpe -> " + gd, dwpe, tol(dt, gd));
        }
    }

    @ParameterizedTest
    @EnumSource(value = DType.class, names = {"F32", "BF16"})
    void lossesForwardBackward(DType dt) {
        // 517 columns: the element-wise row loops; 16,800 (a multiple of 8, several 8-column chunks a thread): the
        // 16-byte bf16 ones
        for (int v : new int[] {517, 16_800}) {
            int n = 13;
            Tensor[] logits = rand(dt, 5, n, v);
            int[] tg = new int[n];
            for (int r = 0; r < n; r++) tg[r] = r == 4 ? -1 : r == 7 ? v - 1 : rnd.nextInt(v);
            Tensor[] tgt = of(tg, n), losses = rand(DType.F32, 1, n);
            for (int i = 0; i < 2; i++) on(i).crossEntropy(logits[i], tgt[i], losses[i]);
            check("crossEntropy V=" + v, losses, F32_TOL);
            Tensor[] dl = rand(dt, 1, n, v);
            for (int i = 0; i < 2; i++) on(i).crossEntropyBackward(logits[i], tgt[i], 1f / n, dl[i]);
            check("crossEntropyBackward V=" + v, dl, tol(dt));
            Tensor[] teacher = rand(dt, 5, n, v);
            for (int i = 0; i < 2; i++) on(i).distillationLoss(logits[i], teacher[i], 2.5f, losses[i]);
            check("distillationLoss V=" + v, losses, 1e-4);  // KL of near-equal distributions: cancellation
            for (int i = 0; i < 2; i++) on(i).distillationLossBackward(logits[i], teacher[i], 2.5f, 0.3f, dl[i]);
            check("distillationLossBackward V=" + v, dl, tol(dt));
            Tensor[] y = rand(dt, 1, n, v);
            for (int i = 0; i < 2; i++) on(i).softmax(logits[i], y[i]);
            check("softmax V=" + v, y, tol(dt));
        }
    }

    @ParameterizedTest
    @EnumSource(value = DType.class, names = {"F32", "BF16"})
    void gatherScatterRows(DType dt) {
        int n = 10, m = 23, c = 37;
        int[] ix = new int[m];
        for (int r = 0; r < m; r++) ix[r] = r % 7 == 3 ? -1 : rnd.nextInt(n);
        Tensor[] idx = of(ix, m), src = rand(dt, 1, n, c), out = rand(dt, 1, m, c);
        for (int i = 0; i < 2; i++) on(i).gatherRows(src[i], idx[i], out[i]);
        check("gatherRows", out, 0);
        Tensor[] other = rand(dt == DType.F32 ? DType.BF16 : DType.F32, 1, m, c);
        for (int i = 0; i < 2; i++) on(i).gatherRows(src[i], idx[i], other[i]);
        check("gatherRows (converting)", other, 0);
        int[] big = new int[n * c];
        for (int j = 0; j < big.length; j++) big[j] = rnd.nextInt() | (1 << 25);   // beyond float's exact integers
        Tensor[] isrc = of(big, n, c), iout = of(new int[m * c], m, c);
        for (int i = 0; i < 2; i++) on(i).gatherRows(isrc[i], idx[i], iout[i]);
        check("gatherRows I32 (bit-exact)", iout, 0);
        // rows of whole 16-byte chunks (c = 40: 80 or 160 bytes) take the 16-byte kernel
        Tensor[] src16 = rand(dt, 1, n, 40), out16 = rand(dt, 1, m, 40);
        for (int i = 0; i < 2; i++) on(i).gatherRows(src16[i], idx[i], out16[i]);
        check("gatherRows 16-byte chunks", out16, 0);
        // rows to several destinations (the expert-parallel exchange into peer windows): a permutation of the rows over
        // three destinations and some rows skipped; c = 40 takes the 16-byte kernel, c (odd widths) the SPI default
        for (int width : new int[] {40, c}) {
            int[] perm = new int[m];
            for (int r = 0; r < m; r++) perm[r] = r;
            for (int r = m - 1; r > 0; r--) { int j = rnd.nextInt(r + 1), x = perm[r]; perm[r] = perm[j]; perm[j] = x; }
            int[] to = new int[2 * m];
            for (int r = 0; r < m; r++) {
                to[2 * r] = r % 11 == 5 ? -1 : perm[r] % 3;   // destination perm[r] % 3, row perm[r] / 3: every slot once
                to[2 * r + 1] = perm[r] / 3;
            }
            // dest a view at an odd element, as the exchange's views of its one upload are
            int[] padded = new int[2 * m + 1];
            System.arraycopy(to, 0, padded, 1, 2 * m);
            Tensor[] packed = of(padded, 2 * m + 1), rows = rand(dt, 1, m, width);
            Tensor[] dests = {packed[0].view(1, m, 2), packed[1].view(1, m, 2)};
            Tensor[][] dsts = new Tensor[3][];
            for (int q = 0; q < 3; q++) dsts[q] = rand(dt, 1, (m + 2) / 3, width);
            for (int i = 0; i < 2; i++) on(i).scatterRowsTo(rows[i], dests[i], new Tensor[] {dsts[0][i], dsts[1][i], dsts[2][i]});
            for (int q = 0; q < 3; q++) check("scatterRowsTo width " + width + " destination " + q, dsts[q], 0);
        }
        Tensor[] w = rand(DType.F32, 1, m), dst = rand(DType.F32, 1, n, c);
        for (int i = 0; i < 2; i++) on(i).scatterAddRows(out[i], idx[i], w[i], dst[i]);
        check("scatterAddRows (weighted, duplicates)", dst, tol(dt));
        for (int i = 0; i < 2; i++) on(i).scatterAddRows(out[i], idx[i], null, dst[i]);
        check("scatterAddRows (unweighted)", dst, tol(dt));
        // row groups as the grouped GEMMs take them: uneven, one empty, rows past the last offset not read;
        // widths 48 (bf16: the 8-wide kernel) and 45
        for (int width : new int[] {48, 45}) {
            int[] offs = {0, 300, 300, 1000, 1003, 2400};
            Tensor[] gx = rand(dt, 1, 2500, width), o = of(offs, offs.length), acc = rand(DType.F32, 1, offs.length - 1, width);
            for (int i = 0; i < 2; i++) on(i).sumRowsGrouped(gx[i], o[i], acc[i]);
            check("sumRowsGrouped width " + width, acc, tol(dt) * 10);
        }
    }

    @ParameterizedTest
    @EnumSource(value = DType.class, names = {"F32", "BF16"})
    void reductions(DType dt) {
        // 100,003: the generic kernel; 100,000 (a multiple of 8): the 16-byte one
        for (int n : new int[] {100_003, 100_000}) {
            Tensor[] x = rand(dt, 1, n), s = rand(DType.F32, 1, 1);
            for (int i = 0; i < 2; i++) on(i).sum(x[i], s[i]);
            check("sum n=" + n, s, 1e-5);
            for (int i = 0; i < 2; i++) on(i).sumSquares(x[i], s[i], 1f);
            check("sumSquares (accumulate) n=" + n, s, 1e-6);
        }
    }

    @Test
    void adamwWithClipSkipAndModelCopy() {
        // n % 4 == 0: the 4-wide kernel (fp32 or bf16 gradients); 4099: the generic one
        for (int n : new int[] {4099, 4096}) for (DType gdt : new DType[] {DType.BF16, DType.F32}) adamwCase(n, gdt);
    }

    private void adamwCase(int n, DType gdt) {
        Tensor[] p = rand(DType.F32, 1, n), g = rand(gdt, 1, n), m = rand(DType.F32, 0.1, n), v = rand(DType.F32, 0.1, n);
        for (int i = 0; i < 2; i++) { on(i).mul(v[i], v[i], v[i]); }  // v >= 0
        Tensor[] norm = rand(DType.F32, 1, 1), copy = rand(DType.BF16, 1, n);
        for (int i = 0; i < 2; i++) on(i).sumSquares(g[i], norm[i], 0f);
        AdamWParams h = new AdamWParams(1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 3, 1.0f);  // the clip is active (norm >> 1)
        for (int i = 0; i < 2; i++) on(i).adamw(p[i], g[i], m[i], v[i], h, norm[i], copy[i]);
        check("adamw param n=" + n + " grad " + gdt, p, 1e-5);
        check("adamw m", m, 1e-5);
        check("adamw v", v, 1e-5);
        check("adamw bf16 model copy", copy, BF16_TOL);
        double[] before = p[1].toDoubles();
        gpu.fill(norm[1], Double.NaN);
        gpu.adamw(p[1], g[1], m[1], v[1], h, norm[1], null);
        assertArrayEquals(before, p[1].toDoubles(), "a NaN norm must skip the update");
        for (int i = 0; i < 2; i++) on(i).adamw(p[i], g[i], m[i], v[i], h, null, null);
        check("adamw without clipping n=" + n + " grad " + gdt, p, 1e-5);
    }

    @Test
    void rejectsF64AndBadShapesBeforeWork() {
        assertTrue(!gpu.supports(DType.F64) && gpu.supports(DType.BF16));
        assertThrows(IllegalArgumentException.class, () -> gpu.zeros(DType.F64, 3));
        Tensor a = gpu.zeros(DType.F32, 3, 4), b = gpu.zeros(DType.F32, 5, 6), c = gpu.zeros(DType.F32, 3, 6);
        var e = assertThrows(IllegalArgumentException.class, () -> gpu.matmul(a, false, b, false, c, 1f, 0f));
        assertTrue(e.getMessage().contains("inner dimensions"), e.getMessage());
        Tensor cpuT = cpu.zeros(DType.F32, 3, 4);
        assertThrows(IllegalArgumentException.class, () -> gpu.add(cpuT, 1, a, 1, a));
    }
}
