package dev.moe4j.cuda;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.backend.GateOutputs;
import dev.moe4j.core.backend.GateSpec;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;
import org.junit.jupiter.api.Tag;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.CsvSource;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * The MoE routing ops of the GPU against CpuBackend's (CpuMoE, the reference), including Gumbel sampling and
 * random token selection, which must pick the same experts and slots on both (same Philox counters).
 */
@Tag("gpu")
class CudaMoeVsCpuTest extends GpuTestBase {

    static GateOutputs outputs(Backend b, int s, int e, int k) {
        return new GateOutputs(b.zeros(DType.F32, s, e), b.zeros(DType.I32, s, k), b.zeros(DType.I32, s, k),
                b.zeros(DType.F32, s, k), b.zeros(DType.I32, e), b.zeros(DType.I32, e + 1), b.zeros(DType.F32, 2));
    }

    @ParameterizedTest
    @CsvSource({"1, 6, 37, 9, false, false, false", "2, 6, 37, 9, false, false, false", "2, 5, 41, 0, false, false, false",
                "1, 8, 64, 5, true, true, false", "2, 8, 64, 9, true, true, true", "3, 7, 50, 0, true, false, true",
                "2, 16, 300, 30, true, false, false",
                // the tiled routing kernels: many tiles, a partial last tile, E above a block (256) and above 1024
                // (fewer threads per tile block, several pieces in the offsets scan), tiles of 128 tokens (S > 16384)
                "1, 128, 8192, 80, false, true, false", "2, 16, 8192, 1100, false, false, false", "2, 64, 1000, 0, false, true, true",
                "1, 300, 777, 3, false, false, false", "2, 300, 5000, 20, true, false, false", "3, 1030, 700, 0, false, false, false",
                "1, 2000, 300, 0, false, false, false", "2, 16, 20000, 2600, false, false, false",
                // the 350M+MoE-128 layer's routing (RTS, capacity factor 1.0) and an E below a scan block's 8 warps
                "1, 128, 8192, 64, true, false, false", "2, 5, 3000, 1000, false, false, false"})
    void gateForwardBackwardAndPermuteMatchTheCpu(int k, int e, int s, int capacity, boolean rts, boolean rsample, boolean second) {
        GateSpec spec = new GateSpec(k, capacity, rts, rsample, second, 0x5eedL, 1L << 34);
        Tensor[] logits = rand(DType.F32, 2, s, e);
        GateOutputs[] out = {outputs(cpu, s, e, k), outputs(gpu, s, e, k)};
        for (int i = 0; i < 2; i++) on(i).moeGate(spec, logits[i], out[i]);
        System.out.printf("moeGate vs CPU k=%d E=%d S=%d C=%d rts=%b rsample=%b second=%b%n", k, e, s, capacity, rts, rsample, second);
        check("moeGate gates", new Tensor[] {out[0].gates(), out[1].gates()}, F32_TOL);
        checkInts("moeGate experts", new Tensor[] {out[0].experts(), out[1].experts()});
        checkInts("moeGate dest", new Tensor[] {out[0].dest(), out[1].dest()});
        checkInts("moeGate counts", new Tensor[] {out[0].counts(), out[1].counts()});
        checkInts("moeGate offsets", new Tensor[] {out[0].offsets(), out[1].offsets()});
        check("moeGate weights", new Tensor[] {out[0].weights(), out[1].weights()}, F32_TOL);
        check("moeGate losses", new Tensor[] {out[0].losses(), out[1].losses()}, F32_TOL);
        // the multi-block scan sums l_aux and the z-loss in a fixed order: a second call gives the same bits
        GateOutputs again = outputs(gpu, s, e, k);
        gpu.moeGate(spec, logits[1], again);
        assertArrayEquals(out[1].losses().toFloats(), again.losses().toFloats(), "moeGate losses, run to run");
        assertArrayEquals(out[1].dest().toInts(), again.dest().toInts(), "moeGate dest, run to run");
        Tensor[] dw = rand(DType.F32, 1, s, k), dl = rand(DType.F32, 1, s, e);
        for (int i = 0; i < 2; i++) on(i).moeGateBackward(spec, logits[i], out[i], dw[i], 0.5f, 0.1f, dl[i]);
        check("moeGateBackward", dl, 1e-5);

        int m = 33, rows = capacity > 0 ? e * capacity : s * k;
        Tensor[] x = rand(DType.BF16, 1, s, m), buf = rand(DType.BF16, 1, rows, m), y = rand(DType.BF16, 1, s, m);
        Tensor[] dest = {out[0].dest(), out[1].dest()}, w = {out[0].weights(), out[1].weights()};
        for (int i = 0; i < 2; i++) on(i).moePermute(x[i], dest[i], buf[i]);
        check("moePermute", buf, 0);
        for (int i = 0; i < 2; i++) on(i).moeUnpermute(buf[i], dest[i], w[i], y[i]);
        check("moeUnpermute", y, BF16_TOL);
        Tensor[] dout = rand(DType.BF16, 1, s, m), dbuf = rand(DType.BF16, 1, rows, m), dwt = rand(DType.F32, 1, s, k);
        for (int i = 0; i < 2; i++) on(i).moeUnpermuteBackward(dout[i], buf[i], dest[i], w[i], dbuf[i], dwt[i]);
        check("moeUnpermuteBackward dbuf", dbuf, BF16_TOL);
        check("moeUnpermuteBackward dw", dwt, 1e-5);
    }

    /**
     * moeGatePad (the padded dropless layer's routing) on the GPU against the CPU's, into outputs filled with -7, and
     * against the GPU's own gate routed with that capacity: the 350M+MoE-128 gate's shape, top-2 with sampling, E past a
     * block of threads, and a capacity above the largest count.
     */
    @ParameterizedTest
    @CsvSource({"1, 128, 8192, 0, true, false", "2, 16, 3000, 0, false, true", "2, 300, 777, 5, false, false", "3, 7, 50, 2, true, true"})
    void gatePadMatchesTheCpuAndTheGateWithThatCapacity(int k, int e, int s, int extra, boolean rsample, boolean second) {
        GateSpec dropless = new GateSpec(k, 0, false, rsample, second, 0x5eedL, 1L << 34);
        Tensor[] logits = rand(DType.F32, 2, s, e);
        GateOutputs[] out = {outputs(cpu, s, e, k), outputs(gpu, s, e, k)};
        for (int i = 0; i < 2; i++) on(i).moeGate(dropless, logits[i], out[i]);
        int c = java.util.Arrays.stream(out[0].counts().toInts()).max().orElseThrow() + extra;
        int[] junkDest = new int[s * k], junkOffsets = new int[e + 1];
        java.util.Arrays.fill(junkDest, -7);
        java.util.Arrays.fill(junkOffsets, -7);
        Tensor[] dest = of(junkDest, s, k), offsets = of(junkOffsets, e + 1);
        for (int i = 0; i < 2; i++) on(i).moeGatePad(out[i], c, dest[i], offsets[i]);
        System.out.printf("moeGatePad k=%d E=%d S=%d C=%d%n", k, e, s, c);
        checkInts("moeGatePad dest", dest);
        checkInts("moeGatePad offsets", offsets);
        GateOutputs routed = outputs(gpu, s, e, k);
        gpu.moeGate(new GateSpec(k, c, false, rsample, second, 0x5eedL, 1L << 34), logits[1], routed);
        assertArrayEquals(routed.dest().toInts(), dest[1].toInts(), "moeGatePad dest against the gate with capacity " + c);
        assertArrayEquals(routed.offsets().toInts(), offsets[1].toInts(), "moeGatePad offsets against the gate with capacity " + c);
        assertArrayEquals(routed.weights().toFloats(), out[1].weights().toFloats(), "the weights are the dropless call's");
    }

    /**
     * The gate's linear layer with the routing, a bf16 x times an fp32 weight (the model's gate): on the GPU the split
     * product's three partial products go to the top-k kernel, which sums them into the logits. The logits match the
     * CPU's within fp32 tolerance, and every output is the GPU's own product-then-gate bit for bit (the same sums in the
     * same order). Top-1 with Gumbel noise, top-2 with second-expert sampling; the 350M+MoE-128 gate's shape.
     */
    @ParameterizedTest
    @CsvSource({"1, 128, 8192, 1024, 64", "2, 64, 1000, 256, 0", "2, 6, 37, 40, 9", "1, 300, 777, 64, 3"})
    void gateLinearIsTheProductThenTheGate(int k, int e, int s, int m, int capacity) {
        GateSpec spec = new GateSpec(k, capacity, false, k == 1, k > 1, 0x5eedL, 1L << 34);
        Tensor[] x = rand(DType.BF16, 1, s, m), w = rand(DType.F32, 0.1, e, m);
        Tensor[] logits = {cpu.zeros(DType.F32, s, e), gpu.zeros(DType.F32, s, e)};
        GateOutputs[] out = {outputs(cpu, s, e, k), outputs(gpu, s, e, k)};
        for (int i = 0; i < 2; i++) on(i).moeGateLinear(spec, x[i], w[i], logits[i], out[i]);
        System.out.printf("moeGateLinear k=%d E=%d S=%d M=%d C=%d%n", k, e, s, m, capacity);
        check("moeGateLinear logits", logits, F32_TOL);
        check("moeGateLinear gates", new Tensor[] {out[0].gates(), out[1].gates()}, F32_TOL);
        Tensor l2 = gpu.zeros(DType.F32, s, e);
        gpu.matmul(x[1], false, w[1], true, l2, 1f, 0f);
        GateOutputs o2 = outputs(gpu, s, e, k);
        gpu.moeGate(spec, l2, o2);
        assertArrayEquals(l2.toFloats(), logits[1].toFloats(), "logits");
        assertArrayEquals(o2.gates().toFloats(), out[1].gates().toFloats(), "gates");
        assertArrayEquals(o2.experts().toInts(), out[1].experts().toInts(), "experts");
        assertArrayEquals(o2.dest().toInts(), out[1].dest().toInts(), "dest");
        assertArrayEquals(o2.counts().toInts(), out[1].counts().toInts(), "counts");
        assertArrayEquals(o2.offsets().toInts(), out[1].offsets().toInts(), "offsets");
        assertArrayEquals(o2.weights().toFloats(), out[1].weights().toFloats(), "weights");
        assertArrayEquals(o2.losses().toFloats(), out[1].losses().toFloats(), "losses");
    }

    /**
     * The counts forms of the dispatch and of the combine's backward (dbuf and dw in one pass over dout) against the
     * CPU's, into NaN-filled buffers so that a row left unwritten fails: capped with drops and free slots (top-1 with
     * RTS, top-2), padded dropless, sorted dropless; bf16 widths of the 8-column kernels (48, 64, 1024) and the
     * generic kernels (F32, bf16 width 45). Then the plain backward (rows not addressed untouched) without dw.
     */
    @ParameterizedTest
    @CsvSource({"1, 8, 200, 20, CAPPED, BF16, 64", "2, 8, 200, 40, CAPPED, BF16, 48", "1, 6, 90, 13, CAPPED, F32, 40",
                "2, 6, 90, 26, CAPPED, BF16, 45", "1, 8, 200, 0, PADDED, BF16, 64", "2, 6, 90, 0, PADDED, F32, 33",
                "2, 8, 200, 0, SORTED, BF16, 64", "1, 128, 8192, 64, CAPPED, BF16, 1024"})
    void countsFormsOfDispatchAndCombineBackwardMatchTheCpu(int k, int e, int s, int capacity, String layout, DType dt, int m) {
        boolean rts = k == 1 && capacity > 0;
        Tensor[] logits = rand(DType.F32, 2, s, e);
        GateOutputs[] out = {outputs(cpu, s, e, k), outputs(gpu, s, e, k)};
        for (int i = 0; i < 2; i++) on(i).moeGate(new GateSpec(k, capacity, rts, false, false, 0x5eedL, 0), logits[i], out[i]);
        // PADDED: MoE's padded dropless layout, the gate with capacity = the largest count (what moeGatePad gives)
        int c = layout.equals("PADDED") ? java.util.Arrays.stream(out[0].counts().toInts()).max().orElseThrow() : capacity;
        if (c != capacity) {
            for (int i = 0; i < 2; i++) {
                out[i] = outputs(on(i), s, e, k);
                on(i).moeGate(new GateSpec(k, c, false, false, false, 0x5eedL, 0), logits[i], out[i]);
            }
        }
        Tensor[] dest = {out[0].dest(), out[1].dest()}, counts = {out[0].counts(), out[1].counts()}, w = {out[0].weights(), out[1].weights()};
        checkInts("moeGate dest", dest);
        checkInts("moeGate counts", counts);
        int rows = c > 0 ? e * c : s * k;
        long kept = java.util.Arrays.stream(dest[0].toInts()).filter(d -> d >= 0).count();
        System.out.printf("counts forms k=%d E=%d S=%d C=%d %s %s M=%d: %d of %d rows free, %d choices dropped%n",
                k, e, s, c, layout, dt, m, rows - kept, rows, (long) s * k - kept);
        if (c > 0) assertTrue(kept < rows, "the case should leave free rows");
        assertEquals(layout.equals("CAPPED"), kept < (long) s * k, "drops exactly when capped");

        Tensor[] x = rand(dt, 1, s, m), buf = {cpu.zeros(dt, rows, m), gpu.zeros(dt, rows, m)};
        for (int i = 0; i < 2; i++) {
            on(i).fill(buf[i], Double.NaN);
            on(i).moePermute(x[i], dest[i], counts[i], c, buf[i]);
        }
        check("moePermute, counts form", buf, 0);

        Tensor[] dout = rand(dt, 1, s, m), y = rand(dt, 1, rows, m), dbuf = {cpu.zeros(dt, rows, m), gpu.zeros(dt, rows, m)};
        Tensor[] dw = {cpu.zeros(DType.F32, s, k), gpu.zeros(DType.F32, s, k)};
        for (int i = 0; i < 2; i++) {
            on(i).fill(dbuf[i], Double.NaN);
            on(i).moeUnpermuteBackward(dout[i], y[i], dest[i], w[i], counts[i], c, dbuf[i], dw[i]);
        }
        check("moeUnpermuteBackward, counts form: dbuf", dbuf, tol(dt));
        check("moeUnpermuteBackward, counts form: dw", dw, 1e-5);

        Tensor[] stale = rand(dt, 1, rows, m);
        for (int i = 0; i < 2; i++) on(i).moeUnpermuteBackward(dout[i], null, dest[i], w[i], stale[i], null);
        check("moeUnpermuteBackward, plain form without dw", stale, tol(dt));

        // both counts forms into rows scattered over three destinations (the expert-parallel dispatch storing into the
        // ranks' peer windows): each buffer row to its own place, rowDest a view at an odd element as the exchange's
        // views of its one upload are; NaN-filled destinations, so that a row left unwritten fails
        int[] perm = new int[rows];
        for (int r = 0; r < rows; r++) perm[r] = r;
        for (int r = rows - 1; r > 0; r--) { int j = rnd.nextInt(r + 1), t = perm[r]; perm[r] = perm[j]; perm[j] = t; }
        int[] to = new int[2 * rows + 1];
        for (int r = 0; r < rows; r++) { to[1 + 2 * r] = perm[r] % 3; to[2 + 2 * r] = perm[r] / 3; }
        Tensor[] packed = of(to, 2 * rows + 1);
        Tensor[] rowDest = {packed[0].view(1, rows, 2), packed[1].view(1, rows, 2)};
        Tensor[][] into = new Tensor[2][3], dinto = new Tensor[2][3];
        for (int i = 0; i < 2; i++) {
            for (int q = 0; q < 3; q++) {
                into[i][q] = on(i).zeros(dt, (rows - q + 2) / 3, m);
                dinto[i][q] = on(i).zeros(dt, (rows - q + 2) / 3, m);
                on(i).fill(into[i][q], Double.NaN);
                on(i).fill(dinto[i][q], Double.NaN);
            }
            on(i).moePermuteTo(x[i], dest[i], counts[i], c, rowDest[i], into[i]);
            on(i).fill(dw[i], Double.NaN);
            on(i).moeUnpermuteBackwardTo(dout[i], y[i], dest[i], w[i], counts[i], c, rowDest[i], dinto[i], dw[i]);
        }
        for (int q = 0; q < 3; q++) {
            check("moePermuteTo destination " + q, new Tensor[] {into[0][q], into[1][q]}, 0);
            check("moeUnpermuteBackwardTo destination " + q, new Tensor[] {dinto[0][q], dinto[1][q]}, tol(dt));
        }
        check("moeUnpermuteBackwardTo dw", dw, 1e-5);
    }

    /**
     * The expert-parallel dispatch's and combine's destinations computed on the device (k_ep_dispatch_dest,
     * k_ep_combine_dest) against the CPU's
     * (ExpertLayout on the host): random counts with empty experts and a rank without rows, owners that pad and owners
     * that do not (maxPadding 0, 2, unbounded), a window too small for some rows; then zeroFreeSlots (a padded input's
     * padding rows) against the CPU's.
     */
    @ParameterizedTest
    @CsvSource({"2, 16, 0", "2, 16, 2", "2, 1, Infinity", "4, 3, 2", "4, 8, Infinity", "8, 2, 0"})
    void expertParallelDispatchDestinationsMatchTheCpu(int P, int El, double maxPadding) {
        int E = P * El;
        int[] counts = new int[P * E];
        for (int i = 0; i < counts.length; i++) counts[i] = rnd.nextInt(5) == 0 ? 0 : rnd.nextInt(300);
        for (int e = 0; e < E; e++) counts[(P - 1) * E + e] = 0;   // the last rank routes nothing
        Tensor[] c = of(counts, P * E);
        for (int me = 0; me < P; me++) {
            int rows = 0;
            for (int e = 0; e < E; e++) rows += counts[me * E + e];
            if (rows == 0) continue;
            for (long window : new long[] {Long.MAX_VALUE, 700}) {
                Tensor[] out = of(new int[2 * rows], rows, 2);
                for (int i = 0; i < 2; i++) on(i).epDispatchDestinations(c[i], me, P, maxPadding, window, out[i]);
                checkInts("epDispatchDestinations P=" + P + " El=" + El + " maxPadding=" + maxPadding + " rank " + me + " window " + window, out);
            }
        }
        // the combine's: every owner, padding rows and rows past its input included, an out shorter than the input
        // (the offsets then stop at its rows), and sources' buffers smaller than their rows (those rows go nowhere)
        for (int me = 0; me < P; me++) for (int extra : new int[] {37, -50}) for (long bufRows : new long[] {Long.MAX_VALUE, 400}) {
            int rows = Math.max(0, new dev.moe4j.core.backend.ExpertLayout(counts, P, maxPadding).inputRows(me) + extra);
            Tensor[] out = of(new int[2 * rows], rows, 2), local = of(new int[2 * El + 1], 2 * El + 1);
            for (int i = 0; i < 2; i++) on(i).epCombineDestinations(c[i], me, P, maxPadding, bufRows, out[i], local[i]);
            String what = " P=" + P + " El=" + El + " maxPadding=" + maxPadding + " rank " + me + " rows " + rows + " bufRows " + bufRows;
            checkInts("epCombineDestinations" + what, out);
            checkInts("epCombineDestinations local counts and offsets" + what, local);
        }
        int groups = 5, cap = 37;
        int[] used = {0, 37, 12, 50, 1};   // empty, full, partial, over capacity (nothing free), one row
        for (DType dt : new DType[] {DType.BF16, DType.F32}) {
            Tensor[] buf = rand(dt, 1, groups * cap, 24), u = of(used, groups);
            for (int i = 0; i < 2; i++) on(i).zeroFreeSlots(buf[i], u[i], cap);
            check("zeroFreeSlots " + dt, buf, 0);
        }
    }
}
