package dev.moe4j.cuda;

import org.bytedeco.cuda.cublas.cublasContext;
import org.bytedeco.cuda.cublas.cublasLtContext;
import org.bytedeco.cuda.cublas.cublasLtMatmulAlgo_t;
import org.bytedeco.cuda.cublas.cublasLtMatmulDescOpaque_t;
import org.bytedeco.cuda.cublas.cublasLtMatmulHeuristicResult_t;
import org.bytedeco.cuda.cublas.cublasLtMatmulPreferenceOpaque_t;
import org.bytedeco.cuda.cublas.cublasLtMatrixLayoutOpaque_t;
import org.bytedeco.cuda.cudart.CUevent_st;
import org.bytedeco.cuda.cudart.CUstream_st;
import org.bytedeco.cuda.global.cublas;
import org.bytedeco.cuda.global.cudart;
import org.bytedeco.javacpp.IntPointer;
import org.bytedeco.javacpp.LongPointer;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.javacpp.PointerPointer;
import org.bytedeco.javacpp.SizeTPointer;

import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.function.IntSupplier;

/**
 * Algorithm choice by measurement for the strided-batched bf16 GEMMs of {@link CudaBackend} (the capacity-padded
 * MoE experts in their three forms: forward, data gradient with the weight transposed, weight gradient with the
 * activation transposed). cuBLAS's default pick is not the fastest kernel for every form (Nsight Compute: the
 * data-gradient form ran 13% slower than the forward form on the same bytes), so on the first call of a shape this
 * asks cuBLASLt's heuristic for up to {@link #CANDIDATES} algorithms, times each of them and the
 * {@code cublasGemmStridedBatchedEx} call the backend makes otherwise (1 untimed and {@link #TIMED_RUNS} timed runs
 * each, CUDA events on the backend's stream, their median), and remembers the fastest per shape (a cuBLASLt
 * algorithm only where it is more than 1% faster than the old call: {@link #MARGIN}). Later calls of
 * the shape are one {@code cublasLtMatmul} with descriptors made once (or the old call, where it won). Linear layers'
 * bf16 products with a bias ({@link CudaBackend#matmulBias}) are tuned the same way with the bias epilogue in their
 * descriptor; they have no old call to compare with.
 *
 * <p>Everything here is in cuBLAS's column-major terms: {@link #plan} takes exactly the arguments of the
 * {@code cublasGemmStridedBatchedEx} call it stands for (the backend's row-major swap already applied), so the
 * cuBLASLt product is the same product on the same memory.
 *
 * <p>Only calls with beta 0 tune: the trial runs then merely overwrite the output, which the real call writes again
 * (A and B are only read). A call with beta != 0 uses the choice made for its shape by a beta-0 call, else the old
 * path; beta is therefore not part of the key (an algorithm is valid for any beta: the heuristic never sees it).
 * Tuning synchronises the stream once per new shape (never while the stream is being captured), and stops after
 * {@code -Dmoe4j.cuda.ltTuneShapes} shapes (default {@value #DEFAULT_MAX_SHAPES}; dropless layers whose padded
 * capacity changes every step would otherwise tune forever); later new shapes take the old path.
 *
 * <p>Not thread-safe: the backend's ops run on one thread at a time.
 */
final class LtGemmTuner implements AutoCloseable {
    /** Workspace handed to cuBLASLt (split-K partial sums and the like); taken from the allocator on the first tuning. */
    static final long WORKSPACE_BYTES = 32L << 20;
    /** How many heuristic candidates are timed. */
    static final int CANDIDATES = 16;
    /**
     * Timed runs per candidate (after one untimed), of which the median counts. With 2 runs and their minimum, two
     * processes picked different kernels for the same memory-bound shape, 375-437 us each (ncu).
     */
    static final int TIMED_RUNS = 5;
    /** A cuBLASLt algorithm replaces the old call only when at least this much faster (timing noise is about 1%). */
    static final double MARGIN = 0.99;
    static final int DEFAULT_MAX_SHAPES = 64;

    /** The arguments of one cublasGemmStridedBatchedEx call other than pointers and scalars, and the pointers' alignments. */
    record Shape(int transa, int transb, int m, int n, int k, int aType, int lda, long strideA, int bType, int ldb, long strideB,
                 int cType, int ldc, long strideC, int batch, int alignA, int alignB, int alignC, boolean bias) {
        @Override public String toString() {
            return "batch=" + batch + " m=" + m + " n=" + n + " k=" + k + " op(A)=" + (transa == cublas.CUBLAS_OP_N ? "N" : "T")
                    + " op(B)=" + (transb == cublas.CUBLAS_OP_N ? "N" : "T") + " lda=" + lda + " ldb=" + ldb + " ldc=" + ldc
                    + " C " + (cType == cudart.CUDA_R_16BF ? "bf16" : cType == cudart.CUDA_R_32F ? "f32" : "type " + cType)
                    + " align " + alignA + "/" + alignB + "/" + alignC + (bias ? " +bias" : "");
        }
    }

    /** The choice for one shape: a cuBLASLt algorithm with its descriptors, or (algo == null) the old call. */
    final class Plan {
        final Shape shape;
        private cublasLtMatmulDescOpaque_t desc;
        private cublasLtMatrixLayoutOpaque_t layoutA, layoutB, layoutC;   // C's layout serves D too (in place, C == D)
        private cublasLtMatmulHeuristicResult_t results;                  // owns the memory algo points into
        private cublasLtMatmulAlgo_t algo;
        String choice = "cublasGemmStridedBatchedEx";

        Plan(Shape s) { this.shape = s; }

        boolean usesLt() { return algo != null; }

        /**
         * The product through cuBLASLt on the backend's stream; false (nothing queued) when this is the old call's
         * shape or cuBLASLt refused the call, which then demotes the shape to the old call for good.
         */
        boolean run(Pointer alpha, Pointer a, Pointer b, Pointer beta, Pointer c) {
            return run(alpha, a, b, beta, c, null);
        }

        /** As {@link #run(Pointer, Pointer, Pointer, Pointer, Pointer)}, adding bias (a vector of m) to every column of a bias shape. */
        boolean run(Pointer alpha, Pointer a, Pointer b, Pointer beta, Pointer c, Pointer bias) {
            if (algo == null) return false;
            if (shape.bias) setBias(desc, bias);
            int rc = matmul(this, algo, alpha, a, b, beta, c);
            if (rc == cublas.CUBLAS_STATUS_SUCCESS) {
                ltRuns++;
                return true;
            }
            if (rc == cublas.CUBLAS_STATUS_NOT_SUPPORTED || rc == cublas.CUBLAS_STATUS_INVALID_VALUE) {
                // refused before anything was launched (an alignment or size check): the old call from now on
                System.err.println("moe4j: cublasLtMatmul refused " + shape + " (status " + rc + "); using " + (shape.bias ? "the product and a bias add" : "cublasGemmStridedBatchedEx") + " for it");
                destroy();
                choice = "cublasGemmStridedBatchedEx (cuBLASLt refused status " + rc + ")";
                return false;
            }
            Cuda.checkBlas(rc, "cublasLtMatmul(" + shape + ")");
            return false;
        }

        private void destroy() {
            algo = null;
            if (results != null) { results.close(); results = null; }
            if (layoutC != null) { cublas.cublasLtMatrixLayoutDestroy(layoutC); layoutC = null; }
            if (layoutB != null) { cublas.cublasLtMatrixLayoutDestroy(layoutB); layoutB = null; }
            if (layoutA != null) { cublas.cublasLtMatrixLayoutDestroy(layoutA); layoutA = null; }
            if (desc != null) { cublas.cublasLtMatmulDescDestroy(desc); desc = null; }
        }
    }

    private final cublasContext blas;
    private final CUstream_st stream;
    private final CudaAllocator allocator;
    private final cublasLtContext lt = new cublasLtContext();
    private final Map<Shape, Plan> plans = new HashMap<>();
    private final int maxShapes = Integer.getInteger("moe4j.cuda.ltTuneShapes", DEFAULT_MAX_SHAPES);
    private final boolean verbose;
    private CUevent_st[] events;        // created on the first tuning
    private long workspace;             // device address from the allocator, 0 until the first tuning (or when it failed)
    private long workspaceBytes;
    private Pointer workspacePtr;
    private boolean closed;
    /** Tests: when >= 0, a tuning takes heuristic candidate {@code forced} (the old call when there are fewer) instead of timing. */
    int forced = -1;
    long tunings, ltRuns;

    /**
     * @param blas the backend's cuBLAS handle, bound to {@code stream} (the old call, timed against the candidates)
     * @param verbose print each shape's timings and choice to stderr
     */
    LtGemmTuner(cublasContext blas, CUstream_st stream, CudaAllocator allocator, boolean verbose) {
        this.blas = blas;
        this.stream = stream;
        this.allocator = allocator;
        this.verbose = verbose;
        Cuda.checkBlas(cublas.cublasLtCreate(lt), "cublasLtCreate");
    }

    /** Shapes tuned so far (those that chose the old call included). */
    int tunedShapes() { return plans.size(); }

    /** How many tuned shapes run through cuBLASLt. */
    int ltShapes() {
        int n = 0;
        for (Plan p : plans.values()) if (p.usesLt()) n++;
        return n;
    }

    /** Forgets every choice (tests: tune again, e.g. with another {@link #forced} candidate). Call between ops only. */
    void clear() {
        Cuda.check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize");   // nothing queued still uses a plan
        destroyPlans();
    }

    private void destroyPlans() {
        for (Plan p : plans.values()) p.destroy();
        plans.clear();
    }

    /** Every tuned shape and what it chose, one a line. */
    String describe() {
        StringBuilder sb = new StringBuilder();
        for (Plan p : plans.values()) sb.append("  ").append(p.shape).append(" -> ").append(p.choice).append('\n');
        return sb.toString();
    }

    private static int alignment(long address) {
        return address == 0 ? 256 : (int) Math.min(256, Long.lowestOneBit(address));
    }

    /**
     * The plan for the product {@code cublasGemmStridedBatchedEx(blas, transa, transb, m, n, k, alpha, A, aType, lda,
     * strideA, B, bType, ldb, strideB, beta, C, cType, ldc, strideC, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)}
     * computes, tuning the shape first when it is new and {@code betaZero} (this runs the product several times, all
     * on the stream, and waits for them); null when the caller is to make that call itself.
     */
    Plan plan(int transa, int transb, int m, int n, int k, Pointer alpha, Pointer a, int aType, int lda, long strideA,
              Pointer b, int bType, int ldb, long strideB, Pointer beta, Pointer c, int cType, int ldc, long strideC, int batch,
              boolean betaZero) {
        if (batch <= 1) return null;
        return plan(transa, transb, m, n, k, alpha, a, aType, lda, strideA, b, bType, ldb, strideB, beta, c, cType, ldc, strideC, batch, betaZero, null);
    }

    /**
     * As above, with a bf16 bias vector of m added to every column of C by a cuBLASLt epilogue where {@code bias} is
     * not null (batch 1, beta 0: a linear layer's forward; there is no old call to compare with, so the fastest
     * candidate wins). Null: the caller makes the product and adds the bias itself.
     */
    Plan plan(int transa, int transb, int m, int n, int k, Pointer alpha, Pointer a, int aType, int lda, long strideA,
              Pointer b, int bType, int ldb, long strideB, Pointer beta, Pointer c, int cType, int ldc, long strideC, int batch,
              boolean betaZero, Pointer bias) {
        if (closed || m <= 0 || n <= 0 || k <= 0 || batch < 1 || strideC <= 0 || strideA < 0 || strideB < 0) return null;
        if (bias != null && (batch != 1 || !betaZero)) return null;
        Shape s = new Shape(transa, transb, m, n, k, aType, lda, strideA, bType, ldb, strideB, cType, ldc, strideC, batch,
                alignment(a.address()), alignment(b.address()), alignment(c.address()), bias != null);
        Plan p = plans.get(s);
        if (p == null) {
            if (!betaZero || plans.size() >= maxShapes || capturing()) return null;
            p = tune(s, alpha, a, b, beta, c, bias);
            plans.put(s, p);
        }
        return p.usesLt() ? p : null;
    }

    private boolean capturing() {
        int[] status = {0};
        Cuda.check(cudart.cudaStreamIsCapturing(stream, status), "cudaStreamIsCapturing");
        return status[0] != cudart.cudaStreamCaptureStatusNone;
    }

    private void ensureResources() {
        if (events == null) {
            CUevent_st[] ev = new CUevent_st[TIMED_RUNS + 1];
            for (int i = 0; i < ev.length; i++) {
                ev[i] = new CUevent_st();
                Cuda.check(cudart.cudaEventCreate(ev[i]), "cudaEventCreate(LtGemmTuner)");
            }
            events = ev;
            try {
                workspace = allocator.alloc(WORKSPACE_BYTES);
                workspaceBytes = WORKSPACE_BYTES;
                workspacePtr = Cuda.ptr(workspace);
            } catch (CudaException e) {   // out of memory: algorithms that need no workspace only
                workspace = 0;
                workspaceBytes = 0;
                workspacePtr = null;
            }
        }
    }

    private Plan tune(Shape s, Pointer alpha, Pointer a, Pointer b, Pointer beta, Pointer c, Pointer bias) {
        ensureResources();
        tunings++;
        Plan p = new Plan(s);
        boolean ok = false;
        try {
            createDescriptors(p);
            if (s.bias) setBias(p.desc, bias);
            int count = heuristic(p);
            // a bias shape has no old call of the same product: its fastest candidate wins
            float legacyMs = s.bias ? Float.POSITIVE_INFINITY : time(() -> legacy(s, alpha, a, b, beta, c));
            int best = -1;
            float bestMs = Float.POSITIVE_INFINITY;
            StringBuilder timings = new StringBuilder();
            for (int i = 0; i < count; i++) {
                cublasLtMatmulHeuristicResult_t r = p.results.getPointer(i);
                if (r.state() != cublas.CUBLAS_STATUS_SUCCESS || r.workspaceSize() > workspaceBytes) continue;
                cublasLtMatmulAlgo_t candidate = r.algo();
                float ms = time(() -> matmul(p, candidate, alpha, a, b, beta, c));
                if (verbose) timings.append(String.format(" #%d %s %.3f ms", i, config(candidate), ms));
                if (Float.isNaN(ms)) continue;
                if (forced >= 0 ? i == forced : ms < bestMs) {
                    best = i;
                    bestMs = ms;
                }
            }
            if (forced < 0 && !(bestMs < legacyMs * MARGIN)) best = -1;   // not clearly faster: keep the old call
            if (best >= 0) {
                p.algo = p.results.getPointer(best).algo();
                p.choice = String.format("cuBLASLt #%d of %d %s (%.3f ms; cublasGemmStridedBatchedEx %.3f ms)", best, count, config(p.algo), bestMs, legacyMs);
            } else {
                p.choice = s.bias ? String.format("the product and a bias add (%d cuBLASLt candidates)", count)
                        : String.format("cublasGemmStridedBatchedEx (%.3f ms; %d cuBLASLt candidates)", legacyMs, count);
            }
            if (verbose) System.err.println("moe4j LtGemmTuner: " + s + " -> " + p.choice + "\n    timed:" + timings);
            ok = true;
        } finally {
            if (!ok || p.algo == null) p.destroy();
        }
        return p;
    }

    private void createDescriptors(Plan p) {
        Shape s = p.shape;
        try (PointerPointer<?> out = new PointerPointer<>(1)) {
            out.put(0, (Pointer) null);
            Cuda.checkBlas(cublas.cublasLtMatmulDescCreate(out, cublas.CUBLAS_COMPUTE_32F, cudart.CUDA_R_32F), "cublasLtMatmulDescCreate");
            p.desc = new cublasLtMatmulDescOpaque_t(out.get(0));
            setDesc(p.desc, cublas.CUBLASLT_MATMUL_DESC_TRANSA, s.transa);
            setDesc(p.desc, cublas.CUBLASLT_MATMUL_DESC_TRANSB, s.transb);
            if (s.bias) {   // D = A B + bias, the bias (bf16, m values) added in fp32 before D's rounding
                setDesc(p.desc, cublas.CUBLASLT_MATMUL_DESC_EPILOGUE, cublas.CUBLASLT_EPILOGUE_BIAS);
                setDesc(p.desc, cublas.CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, cudart.CUDA_R_16BF);
            }
            // the stored matrices (before op): A is m x k when not transposed, else k x m; B k x n, else n x k
            boolean ta = s.transa != cublas.CUBLAS_OP_N, tb = s.transb != cublas.CUBLAS_OP_N;
            p.layoutA = layout(out, s.aType, ta ? s.k : s.m, ta ? s.m : s.k, s.lda, s.batch, s.strideA);
            p.layoutB = layout(out, s.bType, tb ? s.n : s.k, tb ? s.k : s.n, s.ldb, s.batch, s.strideB);
            p.layoutC = layout(out, s.cType, s.m, s.n, s.ldc, s.batch, s.strideC);
        }
    }

    /** The bias epilogue's vector for the next cublasLtMatmul of desc (a device address; read when that call is queued). */
    private static void setBias(cublasLtMatmulDescOpaque_t desc, Pointer bias) {
        try (LongPointer v = new LongPointer(1)) {
            v.put(0, bias.address());
            Cuda.checkBlas(cublas.cublasLtMatmulDescSetAttribute(desc, cublas.CUBLASLT_MATMUL_DESC_BIAS_POINTER, v, Long.BYTES),
                    "cublasLtMatmulDescSetAttribute(BIAS_POINTER)");
        }
    }

    private static void setDesc(cublasLtMatmulDescOpaque_t desc, int attribute, int value) {
        try (IntPointer v = new IntPointer(1)) {
            v.put(0, value);
            Cuda.checkBlas(cublas.cublasLtMatmulDescSetAttribute(desc, attribute, v, Integer.BYTES), "cublasLtMatmulDescSetAttribute(" + attribute + ")");
        }
    }

    /** A column-major layout of batch matrices rows x cols (leading dimension ld), stride elements apart. */
    private static cublasLtMatrixLayoutOpaque_t layout(PointerPointer<?> out, int type, long rows, long cols, long ld, int batch, long stride) {
        out.put(0, (Pointer) null);
        Cuda.checkBlas(cublas.cublasLtMatrixLayoutCreate(out, type, rows, cols, ld), "cublasLtMatrixLayoutCreate");
        cublasLtMatrixLayoutOpaque_t l = new cublasLtMatrixLayoutOpaque_t(out.get(0));
        try (IntPointer count = new IntPointer(1); LongPointer offset = new LongPointer(1)) {
            count.put(0, batch);                 // int32_t
            offset.put(0, stride);               // int64_t, in elements
            Cuda.checkBlas(cublas.cublasLtMatrixLayoutSetAttribute(l, cublas.CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, count, Integer.BYTES),
                    "cublasLtMatrixLayoutSetAttribute(BATCH_COUNT)");
            Cuda.checkBlas(cublas.cublasLtMatrixLayoutSetAttribute(l, cublas.CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, offset, Long.BYTES),
                    "cublasLtMatrixLayoutSetAttribute(STRIDED_BATCH_OFFSET)");
        } catch (RuntimeException e) {
            cublas.cublasLtMatrixLayoutDestroy(l);
            throw e;
        }
        return l;
    }

    /** Asks the heuristic for up to CANDIDATES algorithms into p.results; returns how many it gave. */
    private int heuristic(Plan p) {
        Shape s = p.shape;
        cublasLtMatmulPreferenceOpaque_t pref;
        try (PointerPointer<?> out = new PointerPointer<>(1)) {
            out.put(0, (Pointer) null);
            Cuda.checkBlas(cublas.cublasLtMatmulPreferenceCreate(out), "cublasLtMatmulPreferenceCreate");
            pref = new cublasLtMatmulPreferenceOpaque_t(out.get(0));
        }
        try (LongPointer ws = new LongPointer(1); IntPointer u32 = new IntPointer(1); IntPointer returned = new IntPointer(1)) {
            ws.put(0, workspaceBytes);   // uint64_t
            Cuda.checkBlas(cublas.cublasLtMatmulPreferenceSetAttribute(pref, cublas.CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, ws, Long.BYTES),
                    "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)");
            // the real pointers' alignments (uint32_t; the default assumes 256-byte aligned buffers)
            int[][] aligns = {{cublas.CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, s.alignA}, {cublas.CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, s.alignB},
                    {cublas.CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, s.alignC}, {cublas.CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, s.alignC}};
            for (int[] al : aligns) {
                u32.put(0, al[1]);
                Cuda.checkBlas(cublas.cublasLtMatmulPreferenceSetAttribute(pref, al[0], u32, Integer.BYTES), "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT)");
            }
            // split-K partial sums in fp32 (or in place into an fp32 output), never rounded to a bf16 output between parts
            u32.put(0, s.cType == cudart.CUDA_R_32F ? cublas.CUBLASLT_REDUCTION_SCHEME_MASK : cublas.CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE);
            Cuda.checkBlas(cublas.cublasLtMatmulPreferenceSetAttribute(pref, cublas.CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, u32, Integer.BYTES),
                    "cublasLtMatmulPreferenceSetAttribute(REDUCTION_SCHEME_MASK)");
            p.results = new cublasLtMatmulHeuristicResult_t(CANDIDATES);
            returned.put(0, 0);
            int rc = cublas.cublasLtMatmulAlgoGetHeuristic(lt, p.desc, p.layoutA, p.layoutB, p.layoutC, p.layoutC, pref, CANDIDATES, p.results, returned);
            if (rc == cublas.CUBLAS_STATUS_NOT_SUPPORTED) return 0;   // no algorithm for these types or sizes
            Cuda.checkBlas(rc, "cublasLtMatmulAlgoGetHeuristic(" + s + ")");
            return Math.max(0, Math.min(CANDIDATES, returned.get(0)));
        } finally {
            cublas.cublasLtMatmulPreferenceDestroy(pref);
        }
    }

    private int matmul(Plan p, cublasLtMatmulAlgo_t algo, Pointer alpha, Pointer a, Pointer b, Pointer beta, Pointer c) {
        return cublas.cublasLtMatmul(lt, p.desc, alpha, a, p.layoutA, b, p.layoutB, beta, c, p.layoutC, c, p.layoutC,
                algo, workspacePtr, workspaceBytes, stream);
    }

    private int legacy(Shape s, Pointer alpha, Pointer a, Pointer b, Pointer beta, Pointer c) {
        int rc = cublas.cublasGemmStridedBatchedEx(blas, s.transa, s.transb, s.m, s.n, s.k, alpha, a, s.aType, s.lda, s.strideA,
                b, s.bType, s.ldb, s.strideB, beta, c, s.cType, s.ldc, s.strideC, s.batch, cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT);
        Cuda.checkBlas(rc, "cublasGemmStridedBatchedEx(" + s + ")");
        return rc;
    }

    /**
     * One untimed run of call, then {@link #TIMED_RUNS} timed ones between events on the stream; their median in ms, or
     * NaN when a run returned a status other than success (nothing was launched then: cuBLAS checks before it launches).
     */
    private float time(IntSupplier call) {
        if (call.getAsInt() != cublas.CUBLAS_STATUS_SUCCESS) return Float.NaN;
        Cuda.check(cudart.cudaEventRecord(events[0], stream), "cudaEventRecord");
        for (int i = 1; i <= TIMED_RUNS; i++) {
            if (call.getAsInt() != cublas.CUBLAS_STATUS_SUCCESS) return Float.NaN;   // queued runs finish before the next sync
            Cuda.check(cudart.cudaEventRecord(events[i], stream), "cudaEventRecord");
        }
        Cuda.check(cudart.cudaEventSynchronize(events[TIMED_RUNS]), "cudaEventSynchronize");
        float[] ms = new float[TIMED_RUNS], t = {0};
        for (int i = 0; i < TIMED_RUNS; i++) {
            Cuda.check(cudart.cudaEventElapsedTime(t, events[i], events[i + 1]), "cudaEventElapsedTime");
            ms[i] = t[0];
        }
        java.util.Arrays.sort(ms);
        return ms[TIMED_RUNS / 2];
    }

    /** "id/tile/stages/splitK" of an algorithm, for the log (empty where cuBLASLt does not say). */
    private static String config(cublasLtMatmulAlgo_t algo) {
        List<String> parts = new ArrayList<>();
        int[] attrs = {cublas.CUBLASLT_ALGO_CONFIG_ID, cublas.CUBLASLT_ALGO_CONFIG_TILE_ID, cublas.CUBLASLT_ALGO_CONFIG_STAGES_ID,
                cublas.CUBLASLT_ALGO_CONFIG_SPLITK_NUM};
        try (IntPointer v = new IntPointer(1); SizeTPointer written = new SizeTPointer(1)) {
            for (int attr : attrs) {   // int32_t / uint32_t each
                v.put(0, 0);
                int rc = cublas.cublasLtMatmulAlgoConfigGetAttribute(algo, attr, v, Integer.BYTES, written);
                parts.add(rc == cublas.CUBLAS_STATUS_SUCCESS ? Integer.toString(v.get(0)) : "?");
            }
        }
        return "[id/tile/stages/splitK " + String.join("/", parts) + "]";
    }

    /** Frees every descriptor, the events and the workspace (after the stream has finished with them). */
    @Override
    public void close() {
        if (closed) return;
        closed = true;
        destroyPlans();   // the backend synchronised its stream before
        if (events != null) {
            for (CUevent_st e : events) cudart.cudaEventDestroy(e);
            events = null;
        }
        if (workspace != 0) {
            allocator.free(workspace, workspaceBytes);
            workspace = 0;
        }
        cublas.cublasLtDestroy(lt);
    }
}
