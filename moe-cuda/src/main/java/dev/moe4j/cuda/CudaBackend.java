package dev.moe4j.cuda;

import dev.moe4j.core.backend.Activation;
import dev.moe4j.core.backend.AdamWParams;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.backend.Checks;
import dev.moe4j.core.backend.GateOutputs;
import dev.moe4j.core.backend.GateSpec;
import dev.moe4j.core.tensor.BFloat16;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Shape;
import dev.moe4j.core.tensor.Tensor;
import org.bytedeco.cuda.cublas.cublasContext;
import org.bytedeco.cuda.cudart.CUevent_st;
import org.bytedeco.cuda.cudart.CUstream_st;
import org.bytedeco.cuda.global.cublas;
import org.bytedeco.cuda.global.cudart;
import org.bytedeco.javacpp.FloatPointer;
import org.bytedeco.javacpp.IntPointer;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.javacpp.ShortPointer;

import java.util.Objects;

/**
 * The Backend SPI on one NVIDIA GPU: cuBLAS for the matrix products, the kernels of native/ for the rest.
 *
 * <p>Everything is queued on one stream ({@link #nativeStream()}); memory comes from a caching allocator
 * ({@link CudaAllocator}), so a training step does no cudaMalloc after warm-up. F32, BF16 and I32 tensors;
 * F64 is CPU-only. Every CUDA, driver and cuBLAS return code is checked ({@link CudaException} names the call).
 * Ops are meant to be called from one thread at a time (the backend binds its device to the calling thread).
 */
public final class CudaBackend implements Backend {
    private static final int THREADS = 256;

    private final int device;
    private final CUstream_st mainStream = new CUstream_st();
    private CUstream_st stream = mainStream;   // where operations go: the main stream, or beside()'s side stream
    private final cublasContext blas = new cublasContext();
    private final CudaAllocator allocator;
    private final Kernels kernels;
    private final FloatPointer scalars = new FloatPointer(2);  // alpha, beta for cuBLAS (host pointer mode)
    private volatile Thread boundThread;
    private boolean closed;
    /** MOE4J_CUDA_PROFILE=1: every kernel and cuBLAS call is synchronised and timed by name (slows the run). */
    private final java.util.Map<String, long[]> profile = System.getenv("MOE4J_CUDA_PROFILE") != null ? new java.util.TreeMap<>() : null;

    public CudaBackend(int device) {
        this.device = device;
        Cuda.check(cudart.cudaSetDevice(device), "cudaSetDevice(" + device + ")");
        Cuda.check(cudart.cudaFree(new Pointer()), "cudaFree(0) (context creation)");
        boundThread = Thread.currentThread();
        Cuda.check(cudart.cudaStreamCreate(mainStream), "cudaStreamCreate");
        this.allocator = CudaAllocator.onCuda(this::synchronize);
        Cuda.checkBlas(cublas.cublasCreate_v2(blas), "cublasCreate");
        Cuda.checkBlas(cublas.cublasSetStream_v2(blas, stream), "cublasSetStream");
        this.kernels = new Kernels(device);
    }

    CudaAllocator allocator() { return allocator; }

    /** Number of cudaMalloc calls so far (tests check that it stops growing after warm-up). */
    public long mallocCalls() { return allocator.mallocCalls(); }

    /** Bytes of tensors currently alive (excluding cached free blocks). */
    public long inUseBytes() { return allocator.inUseBytes(); }

    /** Makes this backend's device current on the calling thread (the driver API needs its context there). */
    private void bind() {
        if (closed) throw new IllegalStateException("the CUDA backend was closed");
        Thread t = Thread.currentThread();
        if (t != boundThread) {
            Cuda.check(cudart.cudaSetDevice(device), "cudaSetDevice(" + device + ")");
            boundThread = t;
        }
    }

    @Override public String name() { return "cuda:" + device; }

    @Override public int deviceIndex() { return device; }

    @Override public long nativeStream() { return stream.address(); }

    private CUstream_st besideStream;          // beside(): created on first use
    private CUevent_st besideFork, besideDone;
    private boolean besideOpen;                // side work not joined yet (frees deferred meanwhile)

    /**
     * The side stream forks from the main stream with an event and joins it with another; the allocator defers frees
     * until the last join. GEMMs are refused inside (the cuBLAS handle is bound to the main stream).
     */
    @Override
    public SideWork beside(Runnable work) {
        if (stream != mainStream) throw new IllegalStateException("beside: already inside side work");
        bind();
        if (besideStream == null) {
            besideStream = new CUstream_st();
            Cuda.check(cudart.cudaStreamCreateWithFlags(besideStream, cudart.cudaStreamNonBlocking), "cudaStreamCreate(beside)");
            besideFork = new CUevent_st();
            Cuda.check(cudart.cudaEventCreateWithFlags(besideFork, cudart.cudaEventDisableTiming), "cudaEventCreate(beside)");
            besideDone = new CUevent_st();
            Cuda.check(cudart.cudaEventCreateWithFlags(besideDone, cudart.cudaEventDisableTiming), "cudaEventCreate(beside)");
        }
        if (besideOpen) throw new IllegalStateException("beside: the previous side work was not joined");
        allocator.deferFrees();
        besideOpen = true;
        Cuda.check(cudart.cudaEventRecord(besideFork, mainStream), "cudaEventRecord(beside fork)");
        Cuda.check(cudart.cudaStreamWaitEvent(besideStream, besideFork, 0), "cudaStreamWaitEvent(beside fork)");
        stream = besideStream;
        boolean[] joined = {false};
        SideWork join = () -> {
            if (joined[0]) return;
            joined[0] = true;
            bind();
            Cuda.check(cudart.cudaStreamWaitEvent(mainStream, besideDone, 0), "cudaStreamWaitEvent(beside join)");
            besideOpen = false;
            allocator.releaseDeferred();
        };
        try {
            work.run();
        } catch (RuntimeException | Error e) {
            stream = mainStream;
            cudart.cudaEventRecord(besideDone, besideStream);
            join.join();   // what was queued stays ordered before the main stream's next work
            throw e;
        } finally {
            stream = mainStream;
        }
        Cuda.check(cudart.cudaEventRecord(besideDone, besideStream), "cudaEventRecord(beside done)");
        return join;
    }

    /** GEMMs (cuBLAS and cuBLASLt, bound to the main stream) are refused inside beside(). */
    private void mainStreamOnly(String what) {
        if (stream != mainStream) throw new IllegalStateException(what + " inside beside(): cuBLAS is bound to the main stream");
    }

    @Override public boolean supports(DType dtype) { return dtype != DType.F64; }

    // ------------------------------------------------------------------ helpers

    /** The dtype code of native/common.cuh. */
    private static int dt(Tensor t) {
        return switch (t.dtype()) {
            case F32 -> 0;
            case BF16 -> 1;
            case I32 -> 2;
            case F64 -> throw new IllegalArgumentException("the CUDA backend does not support F64 tensors (" + t + "); F64 is the CPU reference mode");
        };
    }

    /** Device address of the first element of t (checked: open, on this backend). */
    private long p(Tensor t) {
        if (t == null) return 0L;
        if (t.isClosed()) throw new IllegalStateException(t + " was closed");
        if (!(t.storage() instanceof CudaStorage s) || s.owner != this) throw new IllegalArgumentException(t + " is not a tensor of " + name());
        return s.deviceAddress() + t.byteOffset();
    }

    private static long dtOrZero(Tensor t) { return t == null ? 0 : dt(t); }

    private static void floating(String op, String name, Tensor t) {
        Checks.open(op, name, t);
        if (!t.dtype().isFloating() || t.dtype() == DType.F64) throw new IllegalArgumentException(op + ": " + name + " must be F32 or BF16, got " + t.dtype());
    }

    private static int blocks(long n) { return (int) Math.max(1, Math.min((n + THREADS - 1) / THREADS, 65536)); }

    private void launch(String kernel, int gx, int gy, int block, int shared, Object... args) {
        bind();
        long t0 = profileStart();
        kernels.launch(kernel, gx, gy, block, shared, stream, args);
        profileEnd(kernel, t0);
    }

    private long profileStart() {
        if (profile == null) return 0;
        synchronize();
        return System.nanoTime();
    }

    private void profileEnd(String what, long t0) {
        if (profile == null) return;
        synchronize();
        long[] v = profile.computeIfAbsent(what, x -> new long[2]);
        v[0]++;
        v[1] += System.nanoTime() - t0;
    }

    /** With MOE4J_CUDA_PROFILE set: calls and total ms per kernel / cuBLAS entry point since the last reset. */
    public String profileReport(boolean reset) {
        if (profile == null) return "(set MOE4J_CUDA_PROFILE=1 to profile)";
        StringBuilder sb = new StringBuilder();
        profile.entrySet().stream().sorted((a, b) -> Long.compare(b.getValue()[1], a.getValue()[1])).forEach(en ->
                sb.append(String.format("  %-32s %7d calls %10.3f ms%n", en.getKey(), en.getValue()[0], en.getValue()[1] / 1e6)));
        if (reset) profile.clear();
        return sb.toString();
    }

    /** Elementwise launch over n elements (grid-stride kernels). */
    private void launchN(String kernel, long n, Object... args) {
        if (n == 0) return;
        launch(kernel, blocks(n), 1, THREADS, 0, args);
    }

    /**
     * Row blocks of a column reduction (bias gradients, LayerNorm's dgamma/dbeta) whose rows take {@code rowThreads}
     * threads each (a column, or 8 with the 8-wide kernels), each thread summing its block's rows in order. Enough
     * blocks that some 128K threads keep loads in flight: with 8K threads (the earlier rule) a [8192, 1024] reduction
     * took 1 ms, a hundred times its bytes' time, and bias and LayerNorm gradients were half of a 350M training step.
     * At least 32 rows a block and at most 256 blocks, so that the final pass over the partial sums stays short.
     */
    private static int rowParts(int n, int rowThreads) {
        if (n < 256) return 1;
        int want = Math.max(1, (1 << 17) / Math.max(1, rowThreads));
        return Math.max(1, Math.min(want, Math.min(256, n / 32)));
    }

    private static int rowThreads(int cols) { return cols >= 1024 ? 1024 : cols >= 256 ? 256 : 128; }

    /**
     * LayerNorm's block per row: at most 256 threads (a few elements each). With 1024 threads for a row of 1024 (the
     * row rule above) the two block reductions' synchronisation made each [8192, 1024] call 84-94 us (ncu, 350M step).
     */
    private static int normThreads(int cols) { return Math.min(256, rowThreads(cols)); }

    /** LayerNorm's warp-per-row kernels apply: bf16 rows of 256 to 2048 columns in whole 256-column steps, 16-byte aligned. */
    private boolean warpNorm(int c, int n, Tensor... ts) {
        return c % 256 == 0 && c <= 2048 && rows8(c, (long) n * c, ts);
    }

    // ------------------------------------------------------------------ memory and host transfer

    @Override
    public Tensor zeros(DType dtype, int... shape) {
        Tensor t = empty(dtype, shape);
        bind();
        Cuda.check(cudart.cudaMemsetAsync(Cuda.ptr(p(t)), 0, t.numel() * dtype.bytes(), stream), "cudaMemsetAsync");
        return t;
    }

    @Override
    public Tensor empty(DType dtype, int... shape) {
        if (dtype == DType.F64) throw new IllegalArgumentException("the CUDA backend does not support F64 tensors; F64 is the CPU reference mode");
        Shape s = Shape.of(shape);
        long bytes = s.numel() * dtype.bytes();
        bind();
        long a = allocator.alloc(bytes);
        return Tensor.owning(this, new CudaStorage(this, a, CudaAllocator.roundUp(bytes)), dtype, s);
    }

    /**
     * {@code -Dmoe4j.cuda.uploadRing} bytes of pinned memory (default 16 MiB; 0: none) through which uploads are
     * queued without waiting for the stream ({@link UploadRing}); created on the first upload.
     */
    private final long uploadRingBytes = Long.getLong("moe4j.cuda.uploadRing", 16L << 20);
    private UploadRing uploads;

    private void upload(Tensor t, Pointer host, long bytes) {
        bind();
        if (uploads == null && uploadRingBytes > 0) uploads = new UploadRing(uploadRingBytes);
        if (uploads != null && uploads.upload(p(t), host, bytes, stream)) return;
        Cuda.check(cudart.cudaMemcpyAsync(Cuda.ptr(p(t)), host, bytes, cudart.cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync(host to device)");
        synchronize();  // the host buffer is freed when this returns
    }

    private Pointer readBuf;          // pinned: readIntsLater's landing place, grown as needed
    private long readBufBytes;
    private CUevent_st readDone;
    private int[][] readPending;      // the read in flight (its one slot empty until taken), or null

    /** A copy into pinned memory and an event behind it: the supplier waits for the event, not the stream. */
    @Override
    public java.util.function.Supplier<int[]> readIntsLater(Tensor t) {
        Checks.open("readIntsLater", "t", t);
        if (t.dtype() != DType.I32) {
            int[] v = toInts(t);
            return () -> v;
        }
        int n = Math.toIntExact(t.numel());
        if (n == 0) return () -> new int[0];
        finishRead();
        bind();
        long bytes = 4L * n;
        if (bytes > readBufBytes) {
            if (readBuf != null) cudart.cudaFreeHost(readBuf);
            readBuf = new Pointer();
            Cuda.check(cudart.cudaMallocHost(readBuf, Math.max(bytes, 4096)), "cudaMallocHost(readIntsLater)");
            readBufBytes = Math.max(bytes, 4096);
        }
        if (readDone == null) {
            readDone = new CUevent_st();
            Cuda.check(cudart.cudaEventCreateWithFlags(readDone, cudart.cudaEventDisableTiming), "cudaEventCreate(readIntsLater)");
        }
        Cuda.check(cudart.cudaMemcpyAsync(readBuf, Cuda.ptr(p(t)), bytes, cudart.cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync(readIntsLater)");
        Cuda.check(cudart.cudaEventRecord(readDone, stream), "cudaEventRecord(readIntsLater)");
        int[][] slot = {null, new int[n]};
        readPending = slot;
        return () -> {
            if (slot[0] == null) finishRead();
            return slot[0];
        };
    }

    /** Waits for the read in flight and keeps its values in its slot. */
    private void finishRead() {
        int[][] slot = readPending;
        if (slot == null) return;
        readPending = null;
        Cuda.check(cudart.cudaEventSynchronize(readDone), "cudaEventSynchronize(readIntsLater)");
        new IntPointer(readBuf).capacity(slot[1].length).get(slot[1]);
        slot[0] = slot[1];
    }

    private void download(Tensor t, Pointer host, long bytes) {
        bind();
        Cuda.check(cudart.cudaMemcpyAsync(host, Cuda.ptr(p(t)), bytes, cudart.cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync(device to host)");
        synchronize();
    }

    @Override
    public Tensor fromFloats(DType dtype, float[] data, int... shape) {
        Tensor t = empty(dtype, shape);
        Checks.numel("fromFloats", "data", t, data.length);
        writeHost(t, i -> data[i], data.length);
        return t;
    }

    @Override
    public Tensor fromDoubles(DType dtype, double[] data, int... shape) {
        Tensor t = empty(dtype, shape);
        Checks.numel("fromDoubles", "data", t, data.length);
        writeHost(t, i -> data[i], data.length);
        return t;
    }

    @Override
    public Tensor fromInts(int[] data, int... shape) {
        Tensor t = empty(DType.I32, shape);
        Checks.numel("fromInts", "data", t, data.length);
        if (data.length > 0) try (IntPointer h = new IntPointer(data)) { upload(t, h, 4L * data.length); }
        return t;
    }

    private interface Values { double get(int i); }

    private void writeHost(Tensor t, Values v, int n) {
        if (n == 0) return;
        switch (t.dtype()) {
            case F32 -> {
                float[] f = new float[n];
                for (int i = 0; i < n; i++) f[i] = (float) v.get(i);
                try (FloatPointer h = new FloatPointer(f)) { upload(t, h, 4L * n); }
            }
            case BF16 -> {
                short[] s = new short[n];
                for (int i = 0; i < n; i++) s[i] = BFloat16.fromFloat((float) v.get(i));
                try (ShortPointer h = new ShortPointer(s)) { upload(t, h, 2L * n); }
            }
            case I32 -> {
                int[] a = new int[n];
                for (int i = 0; i < n; i++) a[i] = (int) v.get(i);
                try (IntPointer h = new IntPointer(a)) { upload(t, h, 4L * n); }
            }
            case F64 -> throw new IllegalArgumentException("F64 is not supported by " + name());
        }
    }

    @Override
    public float[] toFloats(Tensor t) {
        int n = Math.toIntExact(t.numel());
        float[] r = new float[n];
        if (n == 0) return r;
        switch (t.dtype()) {
            case F32 -> { try (FloatPointer h = new FloatPointer(n)) { download(t, h, 4L * n); h.get(r); } }
            case BF16 -> {
                short[] s = new short[n];
                try (ShortPointer h = new ShortPointer(n)) { download(t, h, 2L * n); h.get(s); }
                for (int i = 0; i < n; i++) r[i] = BFloat16.toFloat(s[i]);
            }
            case I32 -> { int[] a = toInts(t); for (int i = 0; i < n; i++) r[i] = a[i]; }
            case F64 -> throw new IllegalArgumentException("F64 is not supported by " + name());
        }
        return r;
    }

    @Override
    public double[] toDoubles(Tensor t) {
        int n = Math.toIntExact(t.numel());
        double[] r = new double[n];
        if (t.dtype() == DType.I32) {
            int[] a = toInts(t);
            for (int i = 0; i < n; i++) r[i] = a[i];
        } else {
            float[] f = toFloats(t);
            for (int i = 0; i < n; i++) r[i] = f[i];
        }
        return r;
    }

    @Override
    public int[] toInts(Tensor t) {
        int n = Math.toIntExact(t.numel());
        if (t.dtype() != DType.I32) {
            float[] f = toFloats(t);
            int[] r = new int[n];
            for (int i = 0; i < n; i++) r[i] = (int) f[i];
            return r;
        }
        int[] r = new int[n];
        if (n == 0) return r;
        try (IntPointer h = new IntPointer(n)) { download(t, h, 4L * n); h.get(r); }
        return r;
    }

    @Override
    public void copy(Tensor src, Tensor dst) {
        Checks.open("copy", "src", src);
        Checks.open("copy", "dst", dst);
        Checks.numel("copy", "dst", dst, src.numel());
        if (src.numel() == 0) return;
        if (src.dtype() == dst.dtype()) {
            bind();
            Cuda.check(cudart.cudaMemcpyAsync(Cuda.ptr(p(dst)), Cuda.ptr(p(src)), src.numel() * src.dtype().bytes(),
                    cudart.cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync(device to device)");
        } else {
            long n = src.numel();
            if (n % 8 == 0 && aligned16(src, dst) && src.dtype() == DType.BF16 && dst.dtype() == DType.F32) launchN("k_convert_bf16_f32_x8", n / 8, p(src), p(dst), n / 8);
            else if (n % 8 == 0 && aligned16(src, dst) && src.dtype() == DType.F32 && dst.dtype() == DType.BF16) launchN("k_convert_f32_bf16_x8", n / 8, p(src), p(dst), n / 8);
            else launchN("k_convert", n, p(src), dt(src), p(dst), dt(dst), n);
        }
    }

    @Override
    public void fill(Tensor t, double value) {
        Checks.open("fill", "t", t);
        if (Double.doubleToRawLongBits(value) == 0L && t.numel() > 0) {   // +0 is all zero bytes in every dtype: a memset
            bind();
            Cuda.check(cudart.cudaMemsetAsync(Cuda.ptr(p(t)), 0, t.numel() * t.dtype().bytes(), stream), "cudaMemsetAsync(fill 0)");
            return;
        }
        launchN("k_fill", t.numel(), p(t), dt(t), t.numel(), value);
    }

    @Override
    public void synchronize() {
        bind();
        Cuda.check(cudart.cudaStreamSynchronize(mainStream), "cudaStreamSynchronize");
        if (besideStream != null) Cuda.check(cudart.cudaStreamSynchronize(besideStream), "cudaStreamSynchronize(beside)");
    }

    private CUevent_st timingStart, timingEnd;   // created on first use by timeMs

    @Override
    public double timeMs(Runnable body) {
        bind();
        if (timingStart == null) {
            timingStart = new CUevent_st();
            timingEnd = new CUevent_st();
            Cuda.check(cudart.cudaEventCreate(timingStart), "cudaEventCreate");
            Cuda.check(cudart.cudaEventCreate(timingEnd), "cudaEventCreate");
        }
        Cuda.check(cudart.cudaEventRecord(timingStart, stream), "cudaEventRecord");
        body.run();
        Cuda.check(cudart.cudaEventRecord(timingEnd, stream), "cudaEventRecord");
        Cuda.check(cudart.cudaEventSynchronize(timingEnd), "cudaEventSynchronize");
        float[] ms = new float[1];
        Cuda.check(cudart.cudaEventElapsedTime(ms, timingStart, timingEnd), "cudaEventElapsedTime");
        return ms[0];
    }

    @Override
    public double[] timeEachMs(int reps, Runnable body) {
        bind();
        CUevent_st[] ev = new CUevent_st[reps + 1];
        try {
            for (int i = 0; i <= reps; i++) {
                ev[i] = new CUevent_st();
                Cuda.check(cudart.cudaEventCreate(ev[i]), "cudaEventCreate");
            }
            Cuda.check(cudart.cudaEventRecord(ev[0], stream), "cudaEventRecord");
            for (int i = 1; i <= reps; i++) {
                body.run();
                Cuda.check(cudart.cudaEventRecord(ev[i], stream), "cudaEventRecord");
            }
            Cuda.check(cudart.cudaEventSynchronize(ev[reps]), "cudaEventSynchronize");
            double[] out = new double[reps];
            float[] ms = new float[1];
            for (int i = 0; i < reps; i++) {
                Cuda.check(cudart.cudaEventElapsedTime(ms, ev[i], ev[i + 1]), "cudaEventElapsedTime");
                out[i] = ms[0];
            }
            return out;
        } finally {
            for (CUevent_st e : ev) if (e != null) cudart.cudaEventDestroy(e);
        }
    }

    @Override public long allocatedBytes() { return allocator.heldBytes(); }

    /** A scratch tensor outside any scope (closed by the caller). */
    private Tensor scratch(DType dtype, int... shape) {
        Tensor t;
        try (var s = dev.moe4j.core.tensor.Scope.open()) {
            t = empty(dtype, shape);
            dev.moe4j.core.tensor.Scope.keep(t);
        }
        return t;
    }

    // ------------------------------------------------------------------ random

    @Override
    public void randomUniform(Tensor out, double lo, double hi, long seed, long offset) {
        floating("randomUniform", "out", out);
        launchN("k_random_uniform", out.numel(), p(out), dt(out), out.numel(), lo, hi, seed, offset);
    }

    @Override
    public void randomNormal(Tensor out, double mean, double std, long seed, long offset) {
        floating("randomNormal", "out", out);
        launchN("k_random_normal", out.numel(), p(out), dt(out), out.numel(), mean, std, seed, offset);
    }

    // ------------------------------------------------------------------ matrix products

    /**
     * Operands cuBLAS accepts: bf16 x bf16 -> bf16 | f32, or f32 x f32 -> f32 (fp32 compute in both). Other
     * mixes are promoted to f32 scratch copies; C is copied back at {@link #finish}.
     */
    private final class GemmOperands implements AutoCloseable {
        long a, b, c;
        int at, bt, ct;
        private Tensor ta, tb, tc;
        private final Tensor cOut;

        /** Operands cuBLAS takes as they are: device addresses and their cudaDataType. */
        GemmOperands(long a, int at, long b, int bt, long c, int ct) {
            this.a = a; this.b = b; this.c = c;
            this.at = at; this.bt = bt; this.ct = ct;
            this.cOut = null;
        }

        GemmOperands(Tensor a, Tensor b, Tensor c, boolean needC) {
            this.cOut = c;
            boolean bf = a.dtype() == DType.BF16 && b.dtype() == DType.BF16;
            if (bf) {
                this.a = p(a); this.b = p(b); at = bt = cudart.CUDA_R_16BF;
            } else {
                if (a.dtype() == DType.F32) this.a = p(a);
                else { ta = scratch(DType.F32, (int) a.numel()); copy(a, ta); this.a = p(ta); }
                if (b.dtype() == DType.F32) this.b = p(b);
                else { tb = scratch(DType.F32, (int) b.numel()); copy(b, tb); this.b = p(tb); }
                at = bt = cudart.CUDA_R_32F;
            }
            if (c.dtype() == DType.F32) { this.c = p(c); ct = cudart.CUDA_R_32F; }
            else if (bf) { this.c = p(c); ct = cudart.CUDA_R_16BF; }
            else {
                tc = scratch(DType.F32, (int) c.numel());
                if (needC) copy(c, tc);
                this.c = p(tc);
                ct = cudart.CUDA_R_32F;
            }
        }

        int aBytes() { return at == cudart.CUDA_R_16BF ? 2 : 4; }
        int bBytes() { return bt == cudart.CUDA_R_16BF ? 2 : 4; }
        int cBytes() { return ct == cudart.CUDA_R_16BF ? 2 : 4; }

        void finish() { if (tc != null) copy(tc, cOut); }

        @Override public void close() {
            if (ta != null) ta.close();
            if (tb != null) tb.close();
            if (tc != null) tc.close();
        }
    }

    /**
     * bf16 strided-batched GEMMs (the capacity-padded experts) run the cuBLASLt algorithm measured fastest for their
     * shape ({@link LtGemmTuner}); {@code -Dmoe4j.cuda.ltTune=false} keeps them on cublasGemmStridedBatchedEx,
     * {@code =verbose} prints each shape's timings and choice.
     */
    private final String ltTune = System.getProperty("moe4j.cuda.ltTune", "true").toLowerCase(java.util.Locale.ROOT);
    private LtGemmTuner ltTuner;   // created on the first bf16 batched GEMM

    /** The GEMM tuner (created here on first use), or null where -Dmoe4j.cuda.ltTune=false. */
    LtGemmTuner ltTuner() {
        if (ltTuner == null && !"false".equals(ltTune) && !closed) {
            bind();
            ltTuner = new LtGemmTuner(blas, stream, allocator, "verbose".equals(ltTune));
        }
        return ltTuner;
    }

    /**
     * Row-major C[m,n] = alpha op(A) op(B) + beta C, batched with element strides, through the usual swap:
     * cuBLAS is column-major, so it computes C^T = op(B)^T op(A)^T on the same memory.
     */
    private void gemm(GemmOperands o, long aOff, long bOff, long cOff, boolean transA, boolean transB, int m, int n, int k,
                      float alpha, float beta, int batch, long strideA, long strideB, long strideC) {
        gemm(blas, o, aOff, bOff, cOff, transA, transB, m, n, k, alpha, beta, batch, strideA, strideB, strideC);
    }

    private void gemm(cublasContext blas, GemmOperands o, long aOff, long bOff, long cOff, boolean transA, boolean transB, int m, int n, int k,
                      float alpha, float beta, int batch, long strideA, long strideB, long strideC) {
        if (m == 0 || n == 0) return;
        mainStreamOnly("a GEMM");
        bind();
        int lda = transA ? m : k, ldb = transB ? k : n, ldc = n;
        int opA = transA ? cublas.CUBLAS_OP_T : cublas.CUBLAS_OP_N, opB = transB ? cublas.CUBLAS_OP_T : cublas.CUBLAS_OP_N;
        scalars.put(0, alpha).put(1, beta);
        Pointer pa = Cuda.ptr(o.a + aOff * o.aBytes()), pb = Cuda.ptr(o.b + bOff * o.bBytes()), pc = Cuda.ptr(o.c + cOff * o.cBytes());
        Pointer al = scalars.getPointer(0), be = scalars.getPointer(1);
        // bf16 batched: the plan cuBLASLt measured fastest for exactly the cublasGemmStridedBatchedEx call below (the
        // first beta-0 call of a shape tunes it here, before the profile's clock starts); null: that call itself
        LtGemmTuner.Plan lt = batch > 1 && blas == this.blas && o.at == cudart.CUDA_R_16BF && o.bt == cudart.CUDA_R_16BF && ltTuner() != null
                ? ltTuner.plan(opB, opA, n, m, k, al, pb, o.bt, ldb, strideB, pa, o.at, lda, strideA, be, pc, o.ct, ldc, strideC, batch, beta == 0f)
                : null;
        long t0 = profileStart();
        if (batch == 1) {
            Cuda.checkBlas(cublas.cublasGemmEx(blas, opB, opA, n, m, k, al, pb, o.bt, ldb, pa, o.at, lda, be, pc, o.ct, ldc,
                    cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT), "cublasGemmEx(m=" + m + ", n=" + n + ", k=" + k + ")");
        } else if (lt != null && lt.run(al, pb, pa, be, pc)) {
            profileEnd("cublasLtMatmul", t0);
            return;
        } else {
            Cuda.checkBlas(cublas.cublasGemmStridedBatchedEx(blas, opB, opA, n, m, k, al, pb, o.bt, ldb, strideB, pa, o.at, lda, strideA,
                    be, pc, o.ct, ldc, strideC, batch, cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT),
                    "cublasGemmStridedBatchedEx(m=" + m + ", n=" + n + ", k=" + k + ", batch=" + batch + ")");
        }
        profileEnd(batch == 1 ? "cublasGemmEx" : "cublasGemmStridedBatchedEx", t0);
    }

    private static final int SIDE_STREAMS = 4;
    private CUstream_st[] sideStreams;        // created on first use: concurrent GEMMs of a grouped product
    private cublasContext[] sideBlas;
    private CUevent_st fork;
    private CUevent_st[] joins;

    /**
     * The GEMMs of a grouped product (each writes its own rows or its own expert's gradient) spread over a few side
     * streams that fork from and join back into the backend's stream, so that small expert GEMMs run side by side
     * instead of each leaving most of the GPU idle (measured: a loop of 16 expert GEMMs on one stream took 1.8x the
     * time of the same work as one strided-batched GEMM). Everything after it on the stream waits for all of them,
     * so memory freed afterwards is safe to reuse.
     */
    private void gemmsSideBySide(GemmOperands o, java.util.List<Group> groups) {
        if (groups.size() < 2 || profile != null) {   // the profile times each call on its own
            for (Group g : groups) gemm(o, g.aOff, g.bOff, g.cOff, g.transA, g.transB, g.m, g.n, g.k, 1f, g.beta, 1, 0, 0, 0);
            return;
        }
        bind();
        if (sideStreams == null) {
            sideStreams = new CUstream_st[SIDE_STREAMS];
            sideBlas = new cublasContext[SIDE_STREAMS];
            joins = new CUevent_st[SIDE_STREAMS];
            fork = new CUevent_st();
            Cuda.check(cudart.cudaEventCreateWithFlags(fork, cudart.cudaEventDisableTiming), "cudaEventCreate(fork)");
            for (int s = 0; s < SIDE_STREAMS; s++) {
                sideStreams[s] = new CUstream_st();
                Cuda.check(cudart.cudaStreamCreateWithFlags(sideStreams[s], cudart.cudaStreamNonBlocking), "cudaStreamCreate(side)");
                sideBlas[s] = new cublasContext();
                Cuda.checkBlas(cublas.cublasCreate_v2(sideBlas[s]), "cublasCreate(side)");
                Cuda.checkBlas(cublas.cublasSetStream_v2(sideBlas[s], sideStreams[s]), "cublasSetStream(side)");
                joins[s] = new CUevent_st();
                Cuda.check(cudart.cudaEventCreateWithFlags(joins[s], cudart.cudaEventDisableTiming), "cudaEventCreate(join)");
            }
        }
        int used = Math.min(SIDE_STREAMS, groups.size());
        Cuda.check(cudart.cudaEventRecord(fork, stream), "cudaEventRecord(fork)");
        for (int s = 0; s < used; s++) Cuda.check(cudart.cudaStreamWaitEvent(sideStreams[s], fork, 0), "cudaStreamWaitEvent(side)");
        for (int i = 0; i < groups.size(); i++) {
            Group g = groups.get(i);
            gemm(sideBlas[i % used], o, g.aOff, g.bOff, g.cOff, g.transA, g.transB, g.m, g.n, g.k, 1f, g.beta, 1, 0, 0, 0);
        }
        for (int s = 0; s < used; s++) {
            Cuda.check(cudart.cudaEventRecord(joins[s], sideStreams[s]), "cudaEventRecord(join)");
            Cuda.check(cudart.cudaStreamWaitEvent(stream, joins[s], 0), "cudaStreamWaitEvent(join)");
        }
    }

    /** One GEMM of a grouped product, in the arguments of {@link #gemm} (element offsets into the operands). */
    private record Group(long aOff, long bOff, long cOff, boolean transA, boolean transB, int m, int n, int k, float beta) {}

    /** All groups the same GEMM at equally spaced offsets (so one strided-batched call computes them). */
    private static boolean uniformGroups(java.util.List<Group> groups) {
        Group g0 = groups.get(0), g1 = groups.get(1);
        long da = g1.aOff - g0.aOff, db = g1.bOff - g0.bOff, dc = g1.cOff - g0.cOff;
        if (da < 0 || db < 0 || dc < 0) return false;
        for (int i = 1; i < groups.size(); i++) {
            Group g = groups.get(i), p = groups.get(i - 1);
            if (g.m != g0.m || g.n != g0.n || g.k != g0.k || g.beta != g0.beta || g.transA != g0.transA || g.transB != g0.transB) return false;
            if (g.aOff - p.aOff != da || g.bOff - p.bOff != db || g.cOff - p.cOff != dc) return false;
        }
        return true;
    }

    private final java.util.Set<Integer> groupedUnsupported = new java.util.HashSet<>();  // (input type, output type) cuBLAS refused

    /**
     * Runs the groups as one cublasGemmGroupedBatchedEx (GPU-HOST.md: 2.4x faster than a loop of GemmEx for 128
     * small experts, 2x slower for few large ones, hence the threshold) or as a loop of cublasGemmEx.
     * The device pointer arrays go through new PointerPointer(deviceAddress) (the binding detail of GPU-HOST.md).
     */
    private void groupedGemm(GemmOperands o, java.util.List<Group> groups) {
        if (groups.size() > 1 && uniformGroups(groups)) {
            // equal-size experts laid out back to back (the capacity-padded buffer): one strided-batched GEMM,
            // the fastest form in GPU-HOST.md's measurements, and it takes bf16 inputs with an fp32 output
            Group g0 = groups.get(0), g1 = groups.get(1);
            gemm(o, g0.aOff, g0.bOff, g0.cOff, g0.transA, g0.transB, g0.m, g0.n, g0.k, 1f, g0.beta, groups.size(),
                    g1.aOff - g0.aOff, g1.bOff - g0.bOff, g1.cOff - g0.cOff);
            return;
        }
        int combo = o.at * 1000 + o.ct;
        if (groups.size() < 32 || o.at != o.bt || groupedUnsupported.contains(combo)) {
            gemmsSideBySide(o, groups);
            return;
        }
        bind();
        int gc = groups.size();
        int[] ta = new int[gc], tb = new int[gc], mm = new int[gc], nn = new int[gc], kk = new int[gc];
        int[] lda = new int[gc], ldb = new int[gc], ldc = new int[gc], size = new int[gc];
        float[] al = new float[gc], be = new float[gc];
        long[] ptrs = new long[3 * gc];
        for (int i = 0; i < gc; i++) {
            Group g = groups.get(i);
            // column-major swap, as in gemm(): C^T = op(B)^T op(A)^T
            ta[i] = g.transB ? cublas.CUBLAS_OP_T : cublas.CUBLAS_OP_N;
            tb[i] = g.transA ? cublas.CUBLAS_OP_T : cublas.CUBLAS_OP_N;
            mm[i] = g.n; nn[i] = g.m; kk[i] = g.k;
            lda[i] = g.transB ? g.k : g.n;
            ldb[i] = g.transA ? g.m : g.k;
            ldc[i] = g.n;
            size[i] = 1;
            al[i] = 1f; be[i] = g.beta;
            ptrs[i] = o.b + g.bOff * o.bBytes();
            ptrs[gc + i] = o.a + g.aOff * o.aBytes();
            ptrs[2 * gc + i] = o.c + g.cOff * o.cBytes();
        }
        try (Tensor dev = scratch(DType.I32, 6 * gc);
             org.bytedeco.javacpp.LongPointer hp = new org.bytedeco.javacpp.LongPointer(ptrs);
             IntPointer pta = new IntPointer(ta); IntPointer ptb = new IntPointer(tb); IntPointer pm = new IntPointer(mm);
             IntPointer pn = new IntPointer(nn); IntPointer pk = new IntPointer(kk); IntPointer plda = new IntPointer(lda);
             IntPointer pldb = new IntPointer(ldb); IntPointer pldc = new IntPointer(ldc); IntPointer psize = new IntPointer(size);
             FloatPointer pal = new FloatPointer(al); FloatPointer pbe = new FloatPointer(be)) {
            long d = p(dev);
            Cuda.check(cudart.cudaMemcpyAsync(Cuda.ptr(d), hp, 24L * gc, cudart.cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync(grouped GEMM pointers)");
            long t0 = profileStart();
            int rc = cublas.cublasGemmGroupedBatchedEx(blas, pta, ptb, pm, pn, pk, pal,
                    new org.bytedeco.javacpp.PointerPointer<>(Cuda.ptr(d)), o.bt, plda,
                    new org.bytedeco.javacpp.PointerPointer<>(Cuda.ptr(d + 8L * gc)), o.at, pldb, pbe,
                    new org.bytedeco.javacpp.PointerPointer<>(Cuda.ptr(d + 16L * gc)), o.ct, pldc, gc, psize, cublas.CUBLAS_COMPUTE_32F);
            if (rc == cublas.CUBLAS_STATUS_NOT_SUPPORTED) {
                groupedUnsupported.add(combo);  // this cuBLAS lacks the grouped API for these types: loop from now on
                for (Group g : groups) gemm(o, g.aOff, g.bOff, g.cOff, g.transA, g.transB, g.m, g.n, g.k, 1f, g.beta, 1, 0, 0, 0);
                return;
            }
            Cuda.checkBlas(rc, "cublasGemmGroupedBatchedEx(" + gc + " groups)");
            profileEnd("cublasGemmGroupedBatchedEx", t0);
            // No stream wait: cuBLAS reads the host size arrays during the call, the pointer array was staged by the
            // pageable copy above before it returned, and the device scratch is reused only by later work on this
            // stream (CudaOpsTest.groupedMatmulManyExperts calls it back to back).
        }
    }

    @Override
    public void matmul(Tensor a, boolean transA, Tensor b, boolean transB, Tensor c, float alpha, float beta) {
        String op = "matmul";
        floating(op, "a", a); floating(op, "b", b); floating(op, "c", c);
        int[] d = Checks.matmul(a, transA, b, transB, c);
        int batch = d[0], m = d[1], n = d[2], k = d[3];
        if (batch == 0 || m == 0 || n == 0) return;
        if (k == 0) {   // C = beta * C; beta 0 must not read C (it may be a stale gradient)
            if (beta == 0f) fill(c, 0);
            else scale(c, beta, c);
            return;
        }
        if (splitsF32(a, b, c, batch, m, n, k)) {
            splitMatmul(a, transA, b, transB, c, alpha, beta, m, n, k);
            return;
        }
        try (GemmOperands o = new GemmOperands(a, b, c, beta != 0f)) {
            gemm(o, 0, 0, 0, transA, transB, m, n, k, alpha, beta, batch, (long) m * k, (long) k * n, (long) m * n);
            o.finish();
        }
    }

    /**
     * bf16 products with a bf16 bias (a linear layer's forward) add the bias in a cuBLASLt epilogue, in fp32 before
     * C's one rounding, where the GEMM tuner finds an algorithm for the shape (it times the heuristic's candidates
     * once per shape); otherwise, and for other types, the product and {@link #addBias}.
     */
    @Override
    public void matmulBias(Tensor a, boolean transA, Tensor b, boolean transB, Tensor bias, Tensor c) {
        String op = "matmulBias";
        mainStreamOnly(op);
        floating(op, "a", a); floating(op, "b", b); floating(op, "bias", bias); floating(op, "c", c);
        int[] d = Checks.matmul(a, transA, b, transB, c);
        int batch = d[0], m = d[1], n = d[2], k = d[3];
        Checks.numel(op, "bias", bias, n);
        boolean bf16 = a.dtype() == DType.BF16 && b.dtype() == DType.BF16 && c.dtype() == DType.BF16 && bias.dtype() == DType.BF16;
        if (bf16 && batch == 1 && m > 0 && n > 0 && k > 0 && p(bias) % 16 == 0 && ltTuner() != null) {
            bind();
            // row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T (gemm()); the bias runs along C^T's rows
            int lda = transA ? m : k, ldb = transB ? k : n, bf = cudart.CUDA_R_16BF;
            int opA = transA ? cublas.CUBLAS_OP_T : cublas.CUBLAS_OP_N, opB = transB ? cublas.CUBLAS_OP_T : cublas.CUBLAS_OP_N;
            scalars.put(0, 1f).put(1, 0f);
            Pointer al = scalars.getPointer(0), be = scalars.getPointer(1);
            Pointer pa = Cuda.ptr(p(a)), pb = Cuda.ptr(p(b)), pc = Cuda.ptr(p(c)), pbias = Cuda.ptr(p(bias));
            LtGemmTuner.Plan lt = ltTuner.plan(opB, opA, n, m, k, al, pb, bf, ldb, (long) k * n, pa, bf, lda, (long) m * k, be, pc, bf, n,
                    (long) m * n, 1, true, pbias);
            long t0 = profileStart();
            if (lt != null && lt.run(al, pb, pa, be, pc, pbias)) {
                profileEnd("cublasLtMatmul+bias", t0);
                return;
            }
        }
        matmul(a, transA, b, transB, c, 1f, 0f);
        addBias(c, bias, c);
    }

    /**
     * fp32 products with a bf16 operand or output (the fp32 gate of a bf16 model: logits = x W^T with x bf16, and
     * the gate's two gradient products) run on bf16 tensor cores with the fp32 operands split into bf16 pieces
     * (native/f32_split.cu: fp32 accuracy) instead of converting the bf16 side to fp32 for an SGEMM on CUDA cores.
     * {@code -Dmoe4j.cuda.f32Split=false} turns it off. Products of two fp32 operands into fp32 stay SGEMMs.
     */
    final boolean f32Split = !"false".equals(System.getProperty("moe4j.cuda.f32Split"));

    /** The largest scratch copy (elements) the split path makes; beyond it the product converts as before. */
    private static final long MAX_SPLIT_ELEMENTS = 1L << 28;

    private boolean splitsF32(Tensor a, Tensor b, Tensor c, int batch, int m, int n, int k) {
        if (!f32Split || batch != 1) return false;
        boolean a32 = a.dtype() == DType.F32, b32 = b.dtype() == DType.F32, c32 = c.dtype() == DType.F32;
        if (!a32 && !b32) return false;        // a bf16 product: cuBLAS takes it as it is
        if (a32 && b32 && c32) return false;   // an all-fp32 product stays an SGEMM
        long most = a32 && b32 ? 6L * k * Math.max(m, n) : 3L * Math.max((long) m * n, b32 ? (long) n * k : (long) m * k);
        return most <= MAX_SPLIT_ELEMENTS;
    }

    // Which piece of an fp32 operand each of its blocks along the GEMM's dimension holds (2 bits a block). One fp32
    // operand: its pieces 0, 1, 2 (0, 1 into a bf16 output, whose rounding is 2^-9 against their 2^-16). Two: the
    // pairs (0,0) (0,1) (1,0) (0,2) (1,1) (2,0) of A's and B's pieces, every pair weighing at least 2^-16 of the
    // leading one (the first three into a bf16 output).
    private static final int PIECES_012 = 0 | 1 << 2 | 2 << 4;
    private static final int SIX_A = 0 | 0 << 2 | 1 << 4 | 0 << 6 | 1 << 8 | 2 << 10;
    private static final int SIX_B = 0 | 1 << 2 | 0 << 4 | 2 << 6 | 1 << 8 | 0 << 10;

    private void splitMatmul(Tensor a, boolean transA, Tensor b, boolean transB, Tensor c, float alpha, float beta, int m, int n, int k) {
        boolean a32 = a.dtype() == DType.F32, b32 = b.dtype() == DType.F32, c32 = c.dtype() == DType.F32;
        int bf = cudart.CUDA_R_16BF, f32 = cudart.CUDA_R_32F, ct = c32 ? f32 : bf;
        if (a32 && b32) {
            // the pairs side by side along K: op(A') [m, t*k], op(B') [t*k, n], one GEMM into C
            int t = c32 ? 6 : 3;
            try (Tensor as = scratch(DType.BF16, t * m * k); Tensor bs = scratch(DType.BF16, t * k * n)) {
                splitF32(a, as, transA ? 1 : m, transA ? (long) k * m : k, t, SIX_A);
                splitF32(b, bs, transB ? n : 1, transB ? k : (long) k * n, t, SIX_B);
                gemm(new GemmOperands(p(as), bf, p(bs), bf, p(c), ct), 0, 0, 0, transA, transB, m, n, t * k, alpha, beta, 1, 0, 0, 0);
            }
        } else if (b32) {
            // then C = alpha * (sum of C's column blocks) + beta * C
            int t = c32 ? 3 : 2;
            try (Tensor cs = productOfPiecesOfB(a, transA, b, transB, t, m, n, k)) {
                launchN("k_sum_pieces", (long) m * n, p(cs), (long) t * n, (long) n, t, alpha, beta, p(c), dt(c), (long) n, (long) m * n);
            }
        } else {
            // A's pieces stacked along M: C' [t*m, n] = op(A') op(B), then C = alpha * (sum of C's row blocks) + beta * C
            int t = c32 ? 3 : 2;
            try (Tensor as = scratch(DType.BF16, t * m * k); Tensor cs = scratch(DType.F32, t * m, n)) {
                splitF32(a, as, transA ? k : 1, transA ? m : (long) m * k, t, PIECES_012);
                gemm(new GemmOperands(p(as), bf, p(b), bf, p(cs), f32), 0, 0, 0, transA, transB, t * m, n, k, 1f, 0f, 1, 0, 0, 0);
                launchN("k_sum_pieces", (long) m * n, p(cs), (long) n, (long) m * n, t, alpha, beta, p(c), dt(c), (long) n, (long) m * n);
            }
        }
    }

    /**
     * C' [m, t*n] fp32 (scratch, the caller's to close) = op(A) op(B') with B' fp32 B's first t bf16 pieces side by
     * side along N: C's column blocks are the pieces' partial products, whose sum is op(A) op(B).
     */
    private Tensor productOfPiecesOfB(Tensor a, boolean transA, Tensor b, boolean transB, int t, int m, int n, int k) {
        Tensor cs = scratch(DType.F32, m, t * n);
        try (Tensor bs = scratch(DType.BF16, t * n * k)) {
            splitF32(b, bs, transB ? 1 : k, transB ? (long) n * k : n, t, PIECES_012);
            int bf = cudart.CUDA_R_16BF;
            gemm(new GemmOperands(p(a), bf, p(bs), bf, p(cs), cudart.CUDA_R_32F), 0, 0, 0, transA, transB, m, t * n, k, 1f, 0f, 1, 0, 0, 0);
        } catch (RuntimeException | Error e) {
            cs.close();
            throw e;
        }
        return cs;
    }

    /** dst [outer][blocks][inner] bf16 = the pieces (code) of src [outer][inner] fp32, block by block. */
    private void splitF32(Tensor src, Tensor dst, long outer, long inner, int blocks, int code) {
        long n = outer * inner;
        if (inner % 4 == 0 && n / 4 < Integer.MAX_VALUE && p(src) % 16 == 0 && p(dst) % 8 == 0) {
            launchN("k_split_f32_bf16_x4", n / 4, p(src), p(dst), (int) (inner / 4), blocks, code, (int) (n / 4));
            return;
        }
        launchN("k_split_f32_bf16", n, p(src), p(dst), inner, blocks, code, n);
    }

    /** The group offsets on the host: the caller's copy when given (no stream wait), else read from the device. */
    private int[] hostOffsets(String op, Tensor offsets, int[] known, int groups, int rows) {
        if (known == null) return Checks.groupOffsets(op, toInts(offsets), rows);
        if (known.length != groups + 1) throw new IllegalArgumentException(op + ": hostOffsets has " + known.length + " entries, expected " + (groups + 1));
        return Checks.groupOffsets(op, known, rows);
    }

    /**
     * Which kernel runs the bf16 expert products ({@code -Dmoe4j.cuda.groupedKernel=auto|cublas|wgmma|mma_sync}).
     * AUTO is the default: our wgmma kernels on an H100/H200 for the products where they were measured faster than
     * cuBLAS ({@link #autoPicksWgmma}, docs/benchmarks.md "Grouped GEMM on wgmma"), cuBLAS elsewhere and on every other
     * GPU; in the layer benchmark 2% faster than CUBLAS on 350M+MoE-128 capped and 1% on 1.3B+MoE-128, the same
     * kernels as CUBLAS on the other configurations (H100, docs/benchmarks.md). WGMMA (native/grouped_gemm_sm90.cu, compute capability 9.0 only)
     * and MMA_SYNC (native/grouped_gemm.cu, sm_80 on, slower than cuBLAS everywhere measured) force ours: one launch,
     * offsets read on the device, no host round trip (a dropless layer then reads no counts to the host).
     */
    enum GroupedKernel { AUTO, CUBLAS, WGMMA, MMA_SYNC }

    GroupedKernel groupedKernel = GroupedKernel.valueOf(System.getProperty("moe4j.cuda.groupedKernel", "auto").toUpperCase(java.util.Locale.ROOT));

    /**
     * Blocks of a persistent wgmma grid: one per multiprocessor, or (tests, above 0) this many, so that each walks many
     * tiles; above 0 it also makes every product persistent (wgmmaProduct).
     */
    int wgmmaBlocks;

    private int persistentBlocks() { return wgmmaBlocks > 0 ? wgmmaBlocks : kernels.multiprocessors(); }

    /** The forms of a grouped product: C = A W[e] (W [E,K,N]), C = A W[e]^T (W [E,N,K]), dW[e] = A^T dY. */
    enum GroupedForm { FORWARD, DATA_GRAD, WEIGHT_GRAD }

    private static final int GG_BN = 128, GG_PAD = 8, GG_THREADS = 256;
    // grouped_gemm_sm90.cu: 384 threads; the products 4 stages of A [128 x 64] and B [256 x 64] bf16 and two 64 x 64
    // fp32 staging buffers (WG_EPI), the weight gradient 3 stages and two 64 x 256 bf16 output tiles; + 1 KiB for
    // alignment. The products' ping-pong schedule: 64-row tiles, so stages of A [64 x 64] and B [256 x 64], and four
    // 64 x 64 bf16 buffers of what the epilogues read (WG_PP_READ).
    private static final int WG_THREADS = 384, WG_BM = 128, WG_PP_BM = 64, WG_BN = 256, WG_EPI = 2 * 64 * 64 * 4, WG_PP_READ = 4 * 64 * 128;
    private static final int WG_SHARED = 4 * (WG_BM + WG_BN) * 128 + WG_EPI + 1024, WG_PP_SHARED = 4 * (WG_PP_BM + WG_BN) * 128 + WG_EPI + WG_PP_READ + 1024;
    private static final int WG_WGRAD_SHARED = 3 * (WG_BM + WG_BN) * 128 + 2 * 64 * WG_BN * 2 + 1024;

    /** Dynamic shared memory of a grouped kernel: its stages of A and B tiles (Tiles in grouped_gemm.cu). */
    private static int groupedKernelShared(int bm, int bk, int stages, boolean aKContig, boolean bKContig) {
        int aElems = aKContig ? bm * (bk + GG_PAD) : bk * (bm + GG_PAD);
        int bElems = bKContig ? GG_BN * (bk + GG_PAD) : bk * (GG_BN + GG_PAD);
        return stages * (aElems + bElems) * 2;
    }

    /** Whether this device runs the wgmma kernels (compute capability 9.0, and the jar has their sm_90a fatbin). */
    boolean hasWgmma() { return kernels.hopper(); }

    @Override
    public boolean wantsHostOffsets(DType dtype, long rows, int groups) {
        // cuBLAS needs the offsets on the host to size its GEMMs; our kernels read them on the device
        if (dtype != DType.BF16) return true;
        return switch (groupedKernel) {
            case CUBLAS -> true;
            case WGMMA, MMA_SYNC -> false;
            case AUTO -> !(hasWgmma() && java.util.Arrays.stream(GroupedForm.values()).allMatch(f -> autoPicksWgmma(f, groups, rows, null, false)));
        };
    }

    @Override
    public boolean prefersEqualGroups(DType dtype, long rows, int groups) {
        // equal groups are one strided-batched cuBLAS GEMM; unequal ones a grouped-batched call or a loop of GEMMs
        // (measured 1.4x-1.8x slower for 64-128 experts, docs/benchmarks.md); ours cost the same either way
        return wantsHostOffsets(dtype, rows, groups);
    }

    /**
     * The kernel for a grouped product over t rows of e groups: CUBLAS, WGMMA or MMA_SYNC. offs: the offsets on the
     * host, or null where the caller has not read them and this backend does not want them. Ours need bf16 operands,
     * K and N multiples of 8 and 16-byte aligned operands and outputs (16-byte loads, tensor-map addresses and strides).
     */
    private GroupedKernel groupedKernelFor(GroupedForm form, Tensor a, Tensor b, Tensor c, int e, int t, int k, int n, int[] offs, boolean fused) {
        boolean fits = a.dtype() == DType.BF16 && b.dtype() == DType.BF16 && k % 8 == 0 && n % 8 == 0 && p(a) % 16 == 0
                && p(b) % 16 == 0 && p(c) % 16 == 0 && t > 0 && k > 0;
        return switch (groupedKernel) {
            case CUBLAS -> GroupedKernel.CUBLAS;
            case WGMMA -> {
                if (!hasWgmma()) throw new IllegalStateException("moe4j.cuda.groupedKernel=wgmma needs a compute capability 9.0 GPU (H100, H200) "
                        + "and moe-cuda built with nvcc (its sm_90a fatbin, loaded when the backend starts); " + name() + " has not loaded them");
                yield fits ? GroupedKernel.WGMMA : GroupedKernel.CUBLAS;
            }
            // the grid's y dimension: m-tiles (products) or experts (weight gradient)
            case MMA_SYNC -> fits && t / 64 + e + 1 <= 65535 ? GroupedKernel.MMA_SYNC : GroupedKernel.CUBLAS;
            case AUTO -> fits && hasWgmma() && autoPicksWgmma(form, e, t, offs, fused) ? GroupedKernel.WGMMA : GroupedKernel.CUBLAS;
        };
    }

    /**
     * AUTO's choice, from the H100 measurements of both on the layer benchmark's products (docs/benchmarks.md,
     * "Grouped GEMM on wgmma"): ours where the product is bound by reading the expert weights (about 64 rows per
     * expert), cuBLAS where it is bound by tensor-core throughput (256 rows and more per expert, where ours is level to
     * 7% behind). Among the weight-bound products: the data gradient is ours (0.91-0.97x cuBLAS's time); the forward is
     * ours over unequal groups only (cuBLAS's one strided-batched GEMM over equal groups is level with ours; unequal
     * groups are a grouped-batched cuBLAS call, 1.4-1.8x slower); the weight gradient stays cuBLAS's (ours 1.06-1.38x).
     * The fused activation epilogues (fused: the product with its activation; they run on the ping-pong schedule,
     * wgmmaProduct) only where the host offsets show every group within one 64-row tile (a capacity layout of 64 rows
     * or fewer per expert): there the epilogue runs under the other warpgroup's products and the activation's pass is
     * saved (350M+MoE-128 capped 2.698 ms against 2.734 unfused). Over larger groups a 64-row tile reads an expert's
     * weights once per 64 rows, twice as often as the cooperative 128-row tile: a dropless layout padded to about 100
     * rows ran 3.55 ms against 2.95 (H100, docs/benchmarks.md).
     */
    static boolean autoPicksWgmma(GroupedForm form, int e, long t, int[] offs, boolean fused) {
        if (tensorCoreBound(e, t)) return false;
        if (fused) {
            if (offs == null) return false;
            for (int g = 0; g < e; g++) if (offs[g + 1] - offs[g] > WG_PP_BM) return false;
        }
        return switch (form) {
            case DATA_GRAD -> true;
            case WEIGHT_GRAD -> false;
            case FORWARD -> {
                if (fused || offs == null) yield true;   // offs null: not on the host, a dropless routing's unequal groups
                for (int g = 1; g < e; g++) if (offs[g + 1] - offs[g] != offs[1] - offs[0]) yield true;
                yield false;
            }
        };
    }

    /**
     * Whether a grouped product over t rows of e groups is bound by tensor-core throughput rather than by reading the
     * expert weights: more than 128 rows per group on average (measured at 256 and more; docs/benchmarks.md).
     */
    private static boolean tensorCoreBound(int e, long t) { return t > 128L * e; }

    /** A tensor map over t's packed rows (bf16 or fp32): dims innermost first, moved in boxes (Kernels.TensorMap). */
    private Kernels.TensorMap map(Tensor t, int[] box, long... dims) { return new Kernels.TensorMap(p(t), t.dtype() == DType.F32, dims, box); }

    // Grouped GEMMs: cuBLAS in the form groupedGemm picks per shape (strided-batched for equal experts,
    // cublasGemmGroupedBatchedEx for many unequal ones, a loop of cublasGemmEx otherwise; GPU-HOST.md has why),
    // or our own kernel when chosen (groupedKernel).
    @Override
    public void groupedMatmul(Tensor a, Tensor w, boolean transW, Tensor offsets, Tensor c, float beta) {
        groupedMatmul(a, w, transW, offsets, null, c, beta);
    }

    @Override
    public void groupedMatmul(Tensor a, Tensor w, boolean transW, Tensor offsets, int[] hostOffsets, Tensor c, float beta) {
        String op = "groupedMatmul";
        mainStreamOnly(op);
        floating(op, "a", a); floating(op, "w", w); floating(op, "c", c);
        int[] d = Checks.groupedMatmul(op, a, w, transW, offsets, c);
        int e = d[0], k = d[1], n = d[2], t = d[3];
        if (t == 0 || n == 0) return;
        int[] offs = wantsHostOffsets(a.dtype(), t, e) ? hostOffsets(op, offsets, hostOffsets, e, t) : hostOffsets;
        GroupedForm form = transW ? GroupedForm.DATA_GRAD : GroupedForm.FORWARD;
        switch (groupedKernelFor(form, a, w, c, e, t, k, n, offs, false)) {
            case WGMMA -> {
                wgmmaProduct(a, w, transW, offsets, c, e, t, k, n, beta, null, EPI_PLAIN, 0);
                return;
            }
            case MMA_SYNC -> {
                // ~64-row experts (8192 tokens over 128 experts) fill half-height tiles without idle tensor-core work
                int bm = t <= 96L * e ? 64 : 128;
                int mTiles = (t + bm - 1) / bm + e;   // a bound: each group adds at most one partial tile; the rest exit
                // the data-gradient form (W read as [N, K]) takes 64-wide k-tiles in 3 stages, the others 32-wide in 4
                launch((transW ? "k_ggemm_nt_" : "k_ggemm_nn_") + bm, (n + GG_BN - 1) / GG_BN, mTiles, GG_THREADS,
                        groupedKernelShared(bm, transW ? 64 : 32, transW ? 3 : 4, true, transW), p(a), p(w), p(c), dt(c), p(offsets), e, k, n, beta);
                return;
            }
            default -> { }
        }
        if (offs == null) offs = hostOffsets(op, offsets, null, e, t);
        try (GemmOperands o = new GemmOperands(a, w, c, beta != 0f)) {
            java.util.List<Group> groups = new java.util.ArrayList<>();
            for (int g = 0; g < e; g++) {
                int rows = offs[g + 1] - offs[g];
                if (rows > 0) groups.add(new Group((long) offs[g] * k, (long) g * k * n, (long) offs[g] * n, false, transW, rows, n, k, beta));
            }
            groupedGemm(o, groups);
            o.finish();
        }
    }

    // grouped_gemm_sm90.cu's product epilogues: plain, the forward with its activation, the data gradient through it
    private static final int EPI_PLAIN = 0, EPI_ACT = 1, EPI_ACT_GRAD = 2;

    /** k_wg_nn / k_wg_nt over t rows of e groups with epilogue mode (aux and act: EPI_ACT, EPI_ACT_GRAD). */
    private void wgmmaProduct(Tensor a, Tensor w, boolean transW, Tensor offsets, Tensor c, int e, int t, int k, int n, float beta,
                              Tensor aux, int mode, int act) {
        // an upper bound of tiles: each group adds at most one partial m-tile; blocks past the last exit. Persistent
        // (one block per multiprocessor walking them, the next tile's loads under the last one's stores) where the
        // tensor cores bound the product (tensorCoreBound, AUTO's line too; measured at 256 rows and more per group:
        // 0.96-1.04x cuBLAS against 1.01-1.15x for a block per tile, which is 1-3% the faster on 64-row groups; H100,
        // docs/benchmarks.md "Grouped GEMM on wgmma").
        // The fused epilogues run on the ping-pong schedule (each consumer warpgroup its own 64-row tiles, one's epilogue
        // under the other's products; measured against the cooperative schedule's: 350M fc2 data gradient through
        // GeLU' 0.44 against 0.66 ms; faster on 9 of 10 shapes, not the top-2 forward), always persistent (a block of one
        // tile would leave one consumer idle); the plain products on the cooperative one (ping-pong level on 64-row
        // groups, 1.1-1.2x on tensor-core-bound shapes).
        boolean pp = mode != EPI_PLAIN;
        int bm = pp ? WG_PP_BM : WG_BM;
        long tiles = (long) ((t + bm - 1) / bm + e) * ((n + WG_BN - 1) / WG_BN);
        if (pp || wgmmaBlocks > 0 || tensorCoreBound(e, t)) tiles = Math.min(tiles, persistentBlocks());
        Kernels.TensorMap wm = transW ? map(w, new int[] {64, WG_BN, 1}, k, n, e) : map(w, new int[] {64, 64, 1}, n, k, e);
        launch((transW ? "k_wg_nt" : "k_wg_nn") + (pp ? "_pp" : ""), Math.toIntExact(tiles), 1, WG_THREADS, pp ? WG_PP_SHARED : WG_SHARED,
                map(a, new int[] {64, bm}, k, t), wm, p(c), dt(c), p(offsets), e, k, n, beta, aux == null ? 0L : p(aux), mode, act);
    }

    /** The activation in the forward product's epilogue where our wgmma kernel runs it (not for gated activations). */
    @Override
    public void groupedMatmulActivation(Tensor a, Tensor w, Tensor offsets, int[] hostOffsets, Activation act, Tensor h, Tensor out) {
        if (!fusedProduct("groupedMatmulActivation", a, w, false, offsets, hostOffsets, act, h, out, EPI_ACT)) {
            Backend.super.groupedMatmulActivation(a, w, offsets, hostOffsets, act, h, out);
        }
    }

    /** The activation's backward in the data-gradient product's epilogue where our wgmma kernel runs it: da never stored. */
    @Override
    public void groupedMatmulActivationBackward(Tensor dy, Tensor w, Tensor offsets, int[] hostOffsets, Activation act, Tensor h, Tensor dh) {
        if (!fusedProduct("groupedMatmulActivationBackward", dy, w, true, offsets, hostOffsets, act, dh, h, EPI_ACT_GRAD)) {
            Backend.super.groupedMatmulActivationBackward(dy, w, offsets, hostOffsets, act, h, dh);
        }
    }

    /**
     * Runs c = a w[e] (transW: a w[e]^T) with epilogue mode and its second tensor aux (c's dtype and shape) in our
     * wgmma kernel where the kernel choice gives it; false (nothing done) otherwise, for the unfused default.
     */
    private boolean fusedProduct(String op, Tensor a, Tensor w, boolean transW, Tensor offsets, int[] hostOffsets, Activation act,
                                 Tensor c, Tensor aux, int mode) {
        if (act.gated() || !hasWgmma()) return false;   // the kernel choice below says the rest
        mainStreamOnly(op);
        floating(op, "a", a); floating(op, "w", w); floating(op, "c", c); floating(op, "aux", aux);
        int[] d = Checks.groupedMatmul(op, a, w, transW, offsets, c);
        int e = d[0], k = d[1], n = d[2], t = d[3];
        Checks.matrix(op, "aux", aux, t, n);
        if (aux.dtype() != c.dtype() || p(aux) % 16 != 0) return false;
        if (t == 0 || n == 0) return true;
        // AUTO fuses only where the caller has the offsets on the host (autoPicksWgmma): none read here
        int[] offs = hostOffsets == null ? null : hostOffsets(op, offsets, hostOffsets, e, t);   // checked, not read
        GroupedForm form = transW ? GroupedForm.DATA_GRAD : GroupedForm.FORWARD;
        if (groupedKernelFor(form, a, w, c, e, t, k, n, offs, true) != GroupedKernel.WGMMA) return false;
        wgmmaProduct(a, w, transW, offsets, c, e, t, k, n, 0f, aux, mode, actCode(act));
        return true;
    }

    @Override
    public void groupedMatmulWeightGrad(Tensor a, Tensor dy, Tensor offsets, Tensor dw, float beta) {
        groupedMatmulWeightGrad(a, dy, offsets, null, dw, beta);
    }

    @Override
    public void groupedMatmulWeightGrad(Tensor a, Tensor dy, Tensor offsets, int[] hostOffsets, Tensor dw, float beta) {
        String op = "groupedMatmulWeightGrad";
        mainStreamOnly(op);
        floating(op, "a", a); floating(op, "dy", dy); floating(op, "dw", dw);
        int[] d = Checks.groupedMatmulWeightGrad(op, a, dy, offsets, dw);
        int e = d[0], k = d[1], n = d[2], t = d[3];
        if (k == 0 || n == 0) return;
        int[] offs = wantsHostOffsets(a.dtype(), t, e) ? hostOffsets(op, offsets, hostOffsets, e, t) : hostOffsets;
        switch (groupedKernelFor(GroupedForm.WEIGHT_GRAD, a, dy, dw, e, t, k, n, offs, false)) {
            case WGMMA -> {
                // persistent: one block per multiprocessor walks the tiles of every expert's dW
                long tiles = (long) e * ((k + WG_BM - 1) / WG_BM) * ((n + WG_BN - 1) / WG_BN);
                // dW's map: boxes of 128 bytes of columns (64 bf16, 32 fp32) by 64 rows
                launch("k_wg_wgrad", (int) Math.min(tiles, persistentBlocks()), 1, WG_THREADS, WG_WGRAD_SHARED,
                        map(a, new int[] {64, 64}, k, t), map(dy, new int[] {64, 64}, n, t),
                        map(dw, new int[] {dw.dtype() == DType.F32 ? 32 : 64, 64, 1}, n, k, e), p(dw), dt(dw), p(offsets), e, k, n, beta);
                return;
            }
            case MMA_SYNC -> {
                long tiles = (long) ((k + 127) / 128) * ((n + GG_BN - 1) / GG_BN);
                launch("k_ggemm_wgrad", Math.toIntExact(tiles), e, GG_THREADS, groupedKernelShared(128, 32, 4, false, false),
                        p(a), p(dy), p(dw), dt(dw), p(offsets), k, n, beta);
                return;
            }
            default -> { }
        }
        if (offs == null) offs = hostOffsets(op, offsets, null, e, t);
        try (GemmOperands o = new GemmOperands(a, dy, dw, true)) {
            java.util.List<Group> groups = new java.util.ArrayList<>();
            for (int g = 0; g < e; g++) {
                int rows = offs[g + 1] - offs[g];
                if (rows == 0) {
                    if (beta != 1f) {
                        long cells = (long) k * n, start = g * cells;
                        Tensor slice = dw.view(start, k, n);
                        if (beta == 0f) fill(slice, 0);   // beta 0 must not read a stale gradient (NaN * 0 is NaN)
                        else scale(slice, beta, slice);
                        if (o.tc != null) { Tensor ts = o.tc.view(start, k, n); copy(slice, ts); }
                    }
                    continue;
                }
                // dW_g [K,N] = A_g^T [K,rows] * dY_g [rows,N]
                groups.add(new Group((long) offs[g] * k, (long) offs[g] * n, (long) g * k * n, true, false, k, n, rows, beta));
            }
            groupedGemm(o, groups);
            o.finish();
        }
    }

    // ------------------------------------------------------------------ elementwise

    @Override
    public void add(Tensor a, double alpha, Tensor b, double beta, Tensor out) {
        floating("add", "a", a); floating("add", "b", b); floating("add", "out", out);
        Checks.numel("add", "b", b, a.numel());
        Checks.numel("add", "out", out, a.numel());
        if (bf16x8(a, b, out)) launchN("k_add_bf16x8", a.numel() / 8, p(a), alpha, p(b), beta, p(out), a.numel() / 8);
        else launchN("k_add", a.numel(), p(a), dt(a), alpha, p(b), dt(b), beta, p(out), dt(out), a.numel());
    }

    @Override
    public void mul(Tensor a, Tensor b, Tensor out) {
        floating("mul", "a", a); floating("mul", "b", b); floating("mul", "out", out);
        Checks.numel("mul", "b", b, a.numel());
        Checks.numel("mul", "out", out, a.numel());
        launchN("k_mul", a.numel(), p(a), dt(a), p(b), dt(b), p(out), dt(out), a.numel());
    }

    @Override
    public void scale(Tensor x, double alpha, Tensor out) {
        floating("scale", "x", x); floating("scale", "out", out);
        Checks.numel("scale", "out", out, x.numel());
        launchN("k_scale", x.numel(), p(x), dt(x), alpha, p(out), dt(out), x.numel());
    }

    @Override
    public void addBias(Tensor x, Tensor bias, Tensor out) {
        floating("addBias", "x", x); floating("addBias", "bias", bias); floating("addBias", "out", out);
        int c = x.cols();
        Checks.numel("addBias", "bias", bias, c);
        Checks.matrix("addBias", "out", out, x.rows(), c);
        if (rows8(c, x.numel(), x, bias, out)) {
            int n8 = (int) (x.numel() / 8);
            launchN("k_add_bias_bf16x8", n8, p(x), p(bias), 0L, p(out), n8, c / 8);
            return;
        }
        launchN("k_add_bias", x.numel(), p(x), dt(x), p(bias), dt(bias), 0L, p(out), dt(out), x.numel(), c);
    }

    @Override
    public void addGroupBias(Tensor x, Tensor bias, Tensor group, Tensor out) {
        String op = "addGroupBias";
        floating(op, "x", x); floating(op, "bias", bias); floating(op, "out", out);
        Checks.dtype(op, "group", group, DType.I32);
        int c = x.cols();
        Checks.matrix(op, "bias", bias, bias.rows(), c);
        Checks.numel(op, "group", group, x.rows());
        Checks.matrix(op, "out", out, x.rows(), c);
        if (rows8(c, x.numel(), x, bias, out)) {   // the bias rows are read in place: no gathered copy
            int n8 = (int) (x.numel() / 8);
            launchN("k_add_bias_bf16x8", n8, p(x), p(bias), p(group), p(out), n8, c / 8);
            return;
        }
        launchN("k_add_bias", x.numel(), p(x), dt(x), p(bias), dt(bias), p(group), p(out), dt(out), x.numel(), c);
    }

    @Override
    public void sumRows(Tensor x, Tensor out, float beta) {
        floating("sumRows", "x", x); floating("sumRows", "out", out);
        int c = x.cols(), n = x.rows();
        Checks.numel("sumRows", "out", out, c);
        if (c == 0) return;
        boolean wide = rows8(c, (long) n * c, x);
        int parts = rowParts(n, wide ? c / 8 : c);
        if (parts == 1) {
            launch("k_sum_rows", (c + 127) / 128, 1, 128, 0, p(x), dt(x), p(out), dt(out), n, c, beta);
            return;
        }
        int chunk = (n + parts - 1) / parts;
        try (Tensor partial = scratch(DType.F32, parts * c)) {
            if (wide) {
                launch("k_sum_rows_partial_bf16x8", (c / 8 + 127) / 128, parts, 128, 0, p(x), p(partial), n, c / 8, chunk);
            } else {
                launch("k_sum_rows_partial", (c + 127) / 128, parts, 128, 0, p(x), dt(x), p(partial), n, c, chunk);
            }
            launch("k_sum_rows_final", (c + 31) / 32, 1, 256, 0, p(partial), parts, p(out), dt(out), c, beta);
        }
    }

    /** The groups' sums on the device (no read of the offsets): each group's rows in blocks of {@link #GROUPED_ROW_BLOCK}. */
    @Override
    public void sumRowsGrouped(Tensor x, Tensor offsets, Tensor out) {
        String op = "sumRowsGrouped";
        floating(op, "x", x); floating(op, "out", out);
        Checks.dtype(op, "offsets", offsets, DType.I32);
        int c = x.cols(), groups = Math.toIntExact(offsets.numel() - 1);
        Checks.matrix(op, "out", out, groups, c);
        if (groups <= 0 || c == 0 || x.rows() == 0) return;
        boolean wide = rows8(c, x.numel(), x);
        // row blocks of GROUPED_ROW_BLOCK rows within each group: at most rows / RB + groups of them (elementwise.cu)
        int rb = GROUPED_ROW_BLOCK, blocks = x.rows() / rb + groups;
        try (Tensor partial = scratch(DType.F32, Math.toIntExact((long) blocks * c))) {
            if (wide) {
                launch("k_sum_rows_grouped_partial_bf16x8", (c / 8 + 127) / 128, blocks, 128, 0, p(x), p(offsets), groups, rb, p(partial), c / 8);
            } else {
                launch("k_sum_rows_grouped_partial", (c + 127) / 128, blocks, 128, 0, p(x), dt(x), p(offsets), groups, rb, p(partial), c);
            }
            launch("k_sum_rows_grouped_final", (c + 31) / 32, groups, 256, 0, p(partial), p(offsets), rb, p(out), dt(out), c);
        }
    }

    /** Rows a thread of sumRowsGrouped sums (one row block of a group). */
    private static final int GROUPED_ROW_BLOCK = 32;

    @Override
    public void rowDot(Tensor a, Tensor b, Tensor out) {
        floating("rowDot", "a", a); floating("rowDot", "b", b); floating("rowDot", "out", out);
        int c = a.cols(), n = a.rows();
        Checks.matrix("rowDot", "b", b, n, c);
        Checks.numel("rowDot", "out", out, n);
        if (n == 0) return;
        launch("k_row_dot", n, 1, rowThreads(c), 0, p(a), dt(a), p(b), dt(b), p(out), dt(out), c);
    }

    private static int actCode(Activation act) {
        return switch (act) { case RELU -> 0; case GELU -> 1; case GEGLU -> 2; case SWIGLU -> 3; };
    }

    @Override
    public void activation(Activation act, Tensor x, Tensor out) {
        floating("activation", "x", x); floating("activation", "out", out);
        int f = out.cols(), n = out.rows();
        Checks.matrix("activation", "x", x, n, act.inputWidth(f));
        if (vec8(act, x, out)) launchN("k_activation_bf16x8", out.numel() / 8, actCode(act), p(x), p(out), out.numel() / 8);
        else launchN("k_activation", out.numel(), actCode(act), p(x), dt(x), 0L, 0, 0L, p(out), dt(out), out.numel(), f);
    }

    @Override
    public void activationBackward(Activation act, Tensor x, Tensor dout, Tensor dx) {
        floating("activationBackward", "x", x); floating("activationBackward", "dout", dout); floating("activationBackward", "dx", dx);
        int f = dout.cols(), n = dout.rows(), w = act.inputWidth(f);
        Checks.matrix("activationBackward", "x", x, n, w);
        Checks.matrix("activationBackward", "dx", dx, n, w);
        if (vec8(act, x, dout, dx)) launchN("k_activation_bwd_bf16x8", dout.numel() / 8, actCode(act), p(x), p(dout), p(dx), dout.numel() / 8);
        else launchN("k_activation_bwd", dout.numel(), actCode(act), p(x), dt(x), 0L, 0, 0L, p(dout), dt(dout), p(dx), dt(dx), dout.numel(), f);
    }

    @Override
    public void activationGroupBias(Activation act, Tensor x, Tensor bias, Tensor group, Tensor out) {
        String op = "activationGroupBias";
        int f = out.cols(), n = out.rows();
        checkGroupBias(op, act, x, bias, group, "out", out, n, f);
        if (vec8(act, x, bias, out) && rows8(x.cols(), x.numel())) {
            int n8 = (int) (x.numel() / 8);
            launchN("k_bias_act_bf16x8", n8, actCode(act), p(x), p(bias), p(group), p(out), n8, x.cols() / 8);
        } else {
            launchN("k_activation", out.numel(), actCode(act), p(x), dt(x), p(bias), dt(bias), p(group), p(out), dt(out), out.numel(), f);
        }
    }

    @Override
    public void activationGroupBiasBackward(Activation act, Tensor x, Tensor bias, Tensor group, Tensor offsets, Tensor dout,
                                            Tensor dx, Tensor dbias) {
        String op = "activationGroupBiasBackward";
        int f = dout.cols(), n = dout.rows(), c = x.cols();
        checkGroupBias(op, act, x, bias, group, "dout", dout, n, f);
        floating(op, "dx", dx);
        Checks.matrix(op, "dx", dx, n, c);
        Checks.dtype(op, "offsets", offsets, DType.I32);
        int groups = Math.toIntExact(offsets.numel() - 1);
        floating(op, "dbias", dbias);
        Checks.matrix(op, "dbias", dbias, groups, c);
        if (!(vec8(act, x, bias, dout, dx) && rows8(c, x.numel()))) {
            // the generic kernel adds the bias as it reads x (no biased copy written), then the per-expert sums of dx
            launchN("k_activation_bwd", dout.numel(), actCode(act), p(x), dt(x), p(bias), dt(bias), p(group), p(dout), dt(dout), p(dx), dt(dx), dout.numel(), f);
            sumRowsGrouped(dx, offsets, dbias);
            return;
        }
        if (groups <= 0 || n == 0) throw new IllegalArgumentException(op + ": needs at least one group and one row, got " + groups + " groups, " + n + " rows");
        // sumRowsGrouped's row blocks, plus the blocks of the rows past offsets[G] (at most n / RB + 1 of them)
        int rb = GROUPED_ROW_BLOCK, blocks = n / rb + groups + 1;
        try (Tensor partial = scratch(DType.F32, Math.toIntExact((long) blocks * c))) {
            launch("k_bias_act_bwd_grouped_bf16x8", (c / 8 + 127) / 128, blocks, 128, 0, actCode(act), p(x), p(bias), p(group), p(dout),
                    p(dx), p(offsets), groups, rb, n, p(partial), c / 8);
            launch("k_sum_rows_grouped_final", (c + 31) / 32, groups, 256, 0, p(partial), p(offsets), rb, p(dbias), dt(dbias), c);
        }
    }

    /** The arguments of the group-bias activations: x [n, act.inputWidth(f)], bias [G, that width], group I32 [n], y [n, f] (out or dout). */
    private static void checkGroupBias(String op, Activation act, Tensor x, Tensor bias, Tensor group, String yName, Tensor y, int n, int f) {
        floating(op, "x", x); floating(op, "bias", bias); floating(op, yName, y);
        Checks.matrix(op, "x", x, n, act.inputWidth(f));
        Checks.matrix(op, "bias", bias, bias.rows(), x.cols());
        Checks.dtype(op, "group", group, DType.I32);
        Checks.numel(op, "group", group, n);
    }

    /** The bf16 x 8 kernels apply: a non-gated activation, every tensor bf16 and 16-byte aligned, whole 8-element groups. */
    private boolean vec8(Activation act, Tensor... ts) {
        return (act == Activation.GELU || act == Activation.RELU) && bf16x8(ts);
    }

    /**
     * The 8-column bf16 row kernels apply: rows of width m in whole 8-element groups, bf16 tensors 16-byte aligned,
     * and n elements (0: not indexed per element) within 32-bit indices of 8-element groups.
     */
    private boolean rows8(int m, long n, Tensor... ts) {
        return m % 8 == 0 && n / 8 < Integer.MAX_VALUE && bf16x8(ts);
    }

    private boolean aligned16(Tensor... ts) {
        for (Tensor t : ts) if (p(t) % 16 != 0) return false;
        return true;
    }

    /** Every tensor bf16, 16-byte aligned, with a multiple of 8 elements (so 8-element groups never straddle rows of width % 8 == 0). */
    private boolean bf16x8(Tensor... ts) {
        for (Tensor t : ts) if (t.dtype() != DType.BF16 || p(t) % 16 != 0 || t.numel() % 8 != 0) return false;
        return true;
    }

    // ------------------------------------------------------------------ normalisation and softmax

    @Override
    public void layerNorm(Tensor x, Tensor gamma, Tensor beta, float eps, Tensor out, Tensor mean, Tensor rstd) {
        String op = "layerNorm";
        floating(op, "x", x); floating(op, "gamma", gamma); floating(op, "beta", beta); floating(op, "out", out);
        floating(op, "mean", mean); floating(op, "rstd", rstd);
        int c = x.cols(), n = x.rows();
        Checks.numel(op, "gamma", gamma, c);
        Checks.numel(op, "beta", beta, c);
        Checks.matrix(op, "out", out, n, c);
        Checks.numel(op, "mean", mean, n);
        Checks.numel(op, "rstd", rstd, n);
        if (n == 0) return;
        if (warpNorm(c, n, x, gamma, beta, out)) {
            launch("k_layernorm_warp_bf16x8", (n + 7) / 8, 1, 256, 0, p(x), p(gamma), p(beta), eps, p(out),
                    p(mean), dt(mean), p(rstd), dt(rstd), n, c / 256);
            return;
        }
        launch("k_layernorm", n, 1, normThreads(c), 0, p(x), dt(x), p(gamma), dt(gamma), p(beta), dt(beta), eps,
                p(out), dt(out), p(mean), dt(mean), p(rstd), dt(rstd), c);
    }

    @Override
    public void layerNormBackward(Tensor dout, Tensor x, Tensor gamma, Tensor mean, Tensor rstd, Tensor dx, Tensor dgamma, Tensor dbeta) {
        layerNormBackwardImpl(dout, x, gamma, mean, rstd, null, dx, dgamma, dbeta);
    }

    @Override
    public void layerNormBackward(Tensor dout, Tensor x, Tensor gamma, Tensor mean, Tensor rstd, Tensor residual, Tensor dx,
                                  Tensor dgamma, Tensor dbeta) {
        floating("layerNormBackward", "residual", residual);
        Checks.matrix("layerNormBackward", "residual", residual, x.rows(), x.cols());
        layerNormBackwardImpl(dout, x, gamma, mean, rstd, residual, dx, dgamma, dbeta);
    }

    /** dx = the input gradient (+ residual, added before dx's rounding, where not null). */
    private void layerNormBackwardImpl(Tensor dout, Tensor x, Tensor gamma, Tensor mean, Tensor rstd, Tensor residual, Tensor dx,
                                       Tensor dgamma, Tensor dbeta) {
        String op = "layerNormBackward";
        floating(op, "dout", dout); floating(op, "x", x); floating(op, "gamma", gamma); floating(op, "mean", mean);
        floating(op, "rstd", rstd); floating(op, "dx", dx); floating(op, "dgamma", dgamma); floating(op, "dbeta", dbeta);
        int c = x.cols(), n = x.rows();
        Checks.matrix(op, "dout", dout, n, c);
        Checks.matrix(op, "dx", dx, n, c);
        Checks.numel(op, "dgamma", dgamma, c);
        Checks.numel(op, "dbeta", dbeta, c);
        Checks.numel(op, "mean", mean, n);
        Checks.numel(op, "rstd", rstd, n);
        if (n == 0 || c == 0) return;
        long res = residual == null ? 0 : p(residual);
        boolean warp = warpNorm(c, n, dout, x, gamma, dx) && (residual == null || warpNorm(c, n, residual));
        if (warp && c <= 1024) {
            // dx and the column sums in one pass (layernorm.cu), about 4 rows a warp, then the sums of the blocks' parts
            int parts = Math.max(1, Math.min(1024, (n + 31) / 32));
            try (Tensor partial = scratch(DType.F32, 2 * parts * c)) {
                launch("k_layernorm_bwd_fused_bf16x8", parts, 1, 256, 0, p(dout), p(x), p(gamma), p(mean), dt(mean), p(rstd), dt(rstd),
                        res, p(dx), p(partial), n, c / 256);
                launch("k_layernorm_bwd_dgb_final", (c + 31) / 32, 1, 256, 0, p(partial), parts, p(dgamma), dt(dgamma), p(dbeta), dt(dbeta), c);
            }
            return;
        }
        if (warp) {
            launch("k_layernorm_bwd_dx_warp_bf16x8", (n + 7) / 8, 1, 256, 0, p(dout), p(x), p(gamma), p(mean), dt(mean),
                    p(rstd), dt(rstd), res, p(dx), n, c / 256);
        } else {
            launch("k_layernorm_bwd_dx", n, 1, normThreads(c), 0, p(dout), dt(dout), p(x), dt(x), p(gamma), dt(gamma),
                    p(mean), dt(mean), p(rstd), dt(rstd), res, residual == null ? 0 : dt(residual), p(dx), dt(dx), c);
        }
        boolean wide = rows8(c, (long) n * c, dout, x);
        int parts = rowParts(n, wide ? c / 8 : c);
        if (parts == 1) {
            launch("k_layernorm_bwd_dgb", (c + 127) / 128, 1, 128, 0, p(dout), dt(dout), p(x), dt(x), p(mean), dt(mean),
                    p(rstd), dt(rstd), p(dgamma), dt(dgamma), p(dbeta), dt(dbeta), n, c);
        } else {
            int chunk = (n + parts - 1) / parts;
            try (Tensor partial = scratch(DType.F32, 2 * parts * c)) {
                if (wide) {
                    launch("k_layernorm_bwd_dgb_partial_bf16x8", (c / 8 + 127) / 128, parts, 128, 0, p(dout), p(x), p(mean), dt(mean),
                            p(rstd), dt(rstd), p(partial), n, c / 8, chunk);
                } else {
                    launch("k_layernorm_bwd_dgb_partial", (c + 127) / 128, parts, 128, 0, p(dout), dt(dout), p(x), dt(x), p(mean), dt(mean),
                            p(rstd), dt(rstd), p(partial), n, c, chunk);
                }
                launch("k_layernorm_bwd_dgb_final", (c + 31) / 32, 1, 256, 0, p(partial), parts, p(dgamma), dt(dgamma), p(dbeta), dt(dbeta), c);
            }
        }
    }

    @Override
    public void softmax(Tensor x, Tensor out) {
        floating("softmax", "x", x); floating("softmax", "out", out);
        int c = x.cols(), n = x.rows();
        Checks.matrix("softmax", "out", out, n, c);
        if (n == 0) return;
        launch("k_softmax", n, 1, rowThreads(c), 0, p(x), dt(x), p(out), dt(out), c);
    }

    @Override
    public void softmaxBackward(Tensor y, Tensor dy, Tensor dx) {
        floating("softmaxBackward", "y", y); floating("softmaxBackward", "dy", dy); floating("softmaxBackward", "dx", dx);
        int c = y.cols(), n = y.rows();
        Checks.matrix("softmaxBackward", "dy", dy, n, c);
        Checks.matrix("softmaxBackward", "dx", dx, n, c);
        if (n == 0) return;
        launch("k_softmax_bwd", n, 1, rowThreads(c), 0, p(y), dt(y), p(dy), dt(dy), p(dx), dt(dx), c);
    }

    // ------------------------------------------------------------------ attention

    private int[] attnDims(String op, Tensor qkv, int heads, Tensor out, Tensor lse) {
        floating(op, "qkv", qkv); floating(op, "out", out); floating(op, "lse", lse);
        return Checks.attention(op, qkv, heads, out, lse);
    }

    /** Head sizes up to this use the tiled (flash-style) kernels; larger ones the row kernels. */
    static final int FLASH_MAX_D = 128;
    /** -Dmoe4j.cuda.rowAttention=true: the row kernels for every head size (for comparisons). */
    private static final boolean ROW_ATTENTION = Boolean.getBoolean("moe4j.cuda.rowAttention");
    /** -Dmoe4j.cuda.noTensorCoreAttention=true: the CUDA-core tiled kernels even for bf16 heads of 64 / 128. */
    private static final boolean NO_TC_ATTENTION = Boolean.getBoolean("moe4j.cuda.noTensorCoreAttention");

    /**
     * Whether this attention call runs the tensor-core kernels (native/attention_fa2.cu, FlashAttention-2 form on
     * mma.sync): bf16 qkv, D 64 / 128, and the alignment they rely on (16-byte cp.async / float4 chunks of qkv and
     * dout, pairs of columns stored together in out / dqkv). Other calls take the CUDA-core tiled kernels.
     */
    private boolean useFa2(Tensor qkv, int hd, Tensor... others) {
        if (NO_TC_ATTENTION || qkv.dtype() != DType.BF16 || (hd != 64 && hd != 128)) return false;
        if (p(qkv) % 16 != 0) return false;
        for (Tensor x : others) if (p(x) % 16 != 0) return false;
        return true;
    }

    // Tile shapes of attention_fa2.cu (its launch table): the forward's query rows per block (16 per warp) and the
    // backward's query tile (its blocks hold 64 keys); rows padded to D + 8 bf16.
    private static int fa2FwdRows(int hd) { return hd == 64 ? 64 : 128; }
    private static int fa2BwdTile(int hd) { return hd == 64 ? 64 : 32; }

    /** k_fa2_fwd: Q [BM][D+8], K and V [2][64][D+8] bf16. */
    private static int fa2FwdShared(int hd) { return (fa2FwdRows(hd) + 4 * 64) * (hd + 8) * 2; }
    /** k_fa2_bwd: K, V [64][D+8], Q and dO [2][BQ][D+8], dS [64][BQ+8] bf16; lse, delta [2][BQ] f32. */
    private static int fa2BwdShared(int hd) {
        int bq = fa2BwdTile(hd);
        return (2 * 64 + 4 * bq) * (hd + 8) * 2 + 64 * (bq + 8) * 2 + 4 * bq * 4;
    }
    private static int rowKernelShared(String op, int t, int d) {
        long shared = (2L * t + 2L * d) * 4;
        if (shared > 48 * 1024) {
            throw new IllegalArgumentException(op + ": head size " + d + " > " + FLASH_MAX_D + " uses the row kernel, whose shared memory limits "
                    + "the sequence length to about 6000; got T = " + t);
        }
        return (int) shared;
    }

    @Override
    public void attention(Tensor qkv, int heads, Tensor out, Tensor lse) {
        int[] d = attnDims("attention", qkv, heads, out, lse);
        int b = d[0], t = d[1], hd = d[3];
        if (b == 0 || t == 0) return;
        if (!ROW_ATTENTION && useFa2(qkv, hd, out)) {
            // tensor cores (mma.sync bf16, FlashAttention-2 form): attention_fa2.cu; 4 warps (D 64) or 8 (D 128)
            int rows = fa2FwdRows(hd);
            launch("k_fa2_fwd" + hd, (t + rows - 1) / rows, b * heads, 2 * rows, fa2FwdShared(hd), p(qkv), p(out), dt(out), p(lse), dt(lse), t, heads);
        } else if (hd <= FLASH_MAX_D && !ROW_ATTENTION) {
            int shared = (16 * hd + 32 * (hd + 1) + 32 * hd) * 4;
            launch("k_flash_fwd", (t + 15) / 16, b * heads, 128, shared, p(qkv), dt(qkv), p(out), dt(out), p(lse), dt(lse), t, heads, hd);
        } else {
            launch("k_attention", t, b * heads, 128, rowKernelShared("attention", t, hd), p(qkv), dt(qkv), p(out), dt(out), p(lse), dt(lse), t, heads, hd);
        }
    }

    @Override
    public void attentionBackward(Tensor dout, Tensor qkv, Tensor out, Tensor lse, int heads, Tensor dqkv) {
        String op = "attentionBackward";
        int[] d = attnDims(op, qkv, heads, out, lse);
        floating(op, "dout", dout); floating(op, "dqkv", dqkv);
        Checks.matrix(op, "dout", dout, (long) d[0] * d[1], d[2]);
        Checks.matrix(op, "dqkv", dqkv, (long) d[0] * d[1], 3L * d[2]);
        int b = d[0], t = d[1], hd = d[3];
        if (b == 0 || t == 0) return;
        if (hd <= FLASH_MAX_D && !ROW_ATTENTION) {
            if (useFa2(qkv, hd, dout, out, dqkv)) {
                // tensor cores (mma.sync bf16, FlashAttention-2 form): attention_fa2.cu. delta and a zeroed fp32 dQ
                // accumulator, one kernel for dK, dV and dQ (dQ added atomically per 64 keys), then dQ stored scaled.
                long rows = (long) b * t;
                try (Tensor delta = scratch(DType.F32, b * heads * t); Tensor dqAcc = scratch(DType.F32, Math.toIntExact(rows * d[2]))) {
                    launchN("k_fa2_bwd_prep", rows * d[2] / 8, p(dout), dt(dout), p(out), dt(out), p(delta), p(dqAcc), b, t, heads, hd);
                    launch("k_fa2_bwd" + hd, (t + 63) / 64, b * heads, 128, fa2BwdShared(hd), p(dout), dt(dout), p(qkv),
                            p(lse), dt(lse), p(delta), p(dqAcc), p(dqkv), dt(dqkv), t, heads);
                    launchN("k_fa2_bwd_dq", rows * d[2] / 4, p(dqAcc), p(dqkv), dt(dqkv), rows, d[2], (float) (1.0 / Math.sqrt(hd)));
                }
                return;
            }
            try (Tensor delta = scratch(DType.F32, b * heads * t)) {
                launchN("k_flash_delta", (long) b * heads * t * 32, p(dout), dt(dout), p(out), dt(out), p(delta), b, t, heads, hd);
                int sharedKv = (16 * hd + 64 * (hd + 1) + 64) * 4, sharedQ = (16 * hd + 64 * (hd + 1)) * 4;
                launch("k_flash_bwd_dkv", (t + 7) / 8, b * heads, 128, sharedKv, p(dout), dt(dout), p(qkv), dt(qkv), p(lse), dt(lse), p(delta),
                        p(dqkv), dt(dqkv), t, heads, hd);
                launch("k_flash_bwd_dq", (t + 7) / 8, b * heads, 128, sharedQ, p(dout), dt(dout), p(qkv), dt(qkv), p(lse), dt(lse), p(delta),
                        p(dqkv), dt(dqkv), t, heads, hd);
            }
        } else {
            int shared = rowKernelShared(op, t, hd);
            Object[] args = {p(dout), dt(dout), p(qkv), dt(qkv), p(out), dt(out), p(lse), dt(lse), p(dqkv), dt(dqkv), t, heads, hd};
            launch("k_attention_bwd_dq", t, b * heads, 128, shared, args);
            launch("k_attention_bwd_dkv", t, b * heads, 128, shared, args);
        }
    }

    // ------------------------------------------------------------------ embedding and losses

    @Override
    public void embedding(Tensor tokens, Tensor wte, Tensor wpe, Tensor out) {
        String op = "embedding";
        Checks.open(op, "tokens", tokens);
        Checks.dtype(op, "tokens", tokens, DType.I32);
        Checks.rank(op, "tokens", tokens, 2);
        floating(op, "wte", wte); floating(op, "out", out);
        int b = tokens.dim(0), t = tokens.dim(1), c = wte.cols(), v = wte.rows();
        Checks.matrix(op, "out", out, (long) b * t, c);
        if (wpe != null) {
            floating(op, "wpe", wpe);
            Checks.cols(op, "wpe", wpe, c);
            if (wpe.rows() < t) throw new IllegalArgumentException(op + ": sequence length " + t + " exceeds the " + wpe.rows() + " positions of wpe");
        }
        launchN("k_embedding", out.numel(), p(tokens), p(wte), dt(wte), p(wpe), (int) dtOrZero(wpe), p(out), dt(out), out.numel(), t, c, v);
    }

    @Override
    public void embeddingBackward(Tensor dout, Tensor tokens, Tensor dwte, Tensor dwpe) {
        String op = "embeddingBackward";
        floating(op, "dout", dout); floating(op, "dwte", dwte);
        Checks.dtype(op, "tokens", tokens, DType.I32);
        Checks.rank(op, "tokens", tokens, 2);
        int b = tokens.dim(0), t = tokens.dim(1), c = dwte.cols();
        Checks.matrix(op, "dout", dout, (long) b * t, c);
        if (b * t == 0 || c == 0) return;
        addInF32(dwte, acc -> launchN("k_embedding_bwd_wte_atomic", dout.numel(), p(dout), dt(dout), p(tokens), p(acc), dout.numel(), c));
        if (dwpe != null) {
            floating(op, "dwpe", dwpe);
            Checks.cols(op, "dwpe", dwpe, c);
            launchN("k_embedding_bwd_wpe", (long) t * c, p(dout), dt(dout), p(dwpe), dt(dwpe), (long) t * c, b, t, c);
        }
    }

    @Override
    public void crossEntropy(Tensor logits, Tensor targets, Tensor losses) {
        floating("crossEntropy", "logits", logits); floating("crossEntropy", "losses", losses);
        int v = logits.cols(), n = logits.rows();
        Checks.dtype("crossEntropy", "targets", targets, DType.I32);
        Checks.numel("crossEntropy", "targets", targets, n);
        Checks.numel("crossEntropy", "losses", losses, n);
        if (n == 0) return;
        launch("k_cross_entropy", n, 1, rowThreads(v), 0, p(logits), dt(logits), p(targets), p(losses), dt(losses), v);
    }

    @Override
    public void crossEntropyBackward(Tensor logits, Tensor targets, float scale, Tensor dlogits) {
        floating("crossEntropyBackward", "logits", logits); floating("crossEntropyBackward", "dlogits", dlogits);
        int v = logits.cols(), n = logits.rows();
        Checks.dtype("crossEntropyBackward", "targets", targets, DType.I32);
        Checks.numel("crossEntropyBackward", "targets", targets, n);
        Checks.matrix("crossEntropyBackward", "dlogits", dlogits, n, v);
        if (n == 0) return;
        launch("k_cross_entropy_bwd", n, 1, rowThreads(v), 0, p(logits), dt(logits), p(targets), scale, p(dlogits), dt(dlogits), v);
    }

    @Override
    public void distillationLoss(Tensor student, Tensor teacher, float temperature, Tensor losses) {
        floating("distillationLoss", "student", student); floating("distillationLoss", "teacher", teacher); floating("distillationLoss", "losses", losses);
        int v = student.cols(), n = student.rows();
        Checks.matrix("distillationLoss", "teacher", teacher, n, v);
        Checks.numel("distillationLoss", "losses", losses, n);
        if (!(temperature > 0)) throw new IllegalArgumentException("distillationLoss: temperature must be > 0, got " + temperature);
        if (n == 0) return;
        launch("k_distill", n, 1, rowThreads(v), 0, p(student), dt(student), p(teacher), dt(teacher), temperature, p(losses), dt(losses), v);
    }

    @Override
    public void distillationLossBackward(Tensor student, Tensor teacher, float temperature, float scale, Tensor dstudent) {
        floating("distillationLossBackward", "student", student); floating("distillationLossBackward", "teacher", teacher);
        floating("distillationLossBackward", "dstudent", dstudent);
        int v = student.cols(), n = student.rows();
        Checks.matrix("distillationLossBackward", "teacher", teacher, n, v);
        Checks.matrix("distillationLossBackward", "dstudent", dstudent, n, v);
        if (!(temperature > 0)) throw new IllegalArgumentException("distillationLossBackward: temperature must be > 0, got " + temperature);
        if (n == 0) return;
        launch("k_distill_bwd", n, 1, rowThreads(v), 0, p(student), dt(student), p(teacher), dt(teacher), temperature, scale, p(dstudent), dt(dstudent), v);
    }

    // ------------------------------------------------------------------ rows by index

    @Override
    public void gatherRows(Tensor src, Tensor idx, Tensor out) {
        int c = src.cols(), m = Math.toIntExact(idx.numel());
        Checks.dtype("gatherRows", "idx", idx, DType.I32);
        Checks.matrix("gatherRows", "out", out, m, c);
        if (src.dtype() == out.dtype() && src.dtype() != DType.F64) {
            // Same dtype: a bit-exact move (I32 included), no conversion through float; 16-byte chunks where rows allow.
            long rowBytes = (long) c * src.dtype().bytes();
            if (rowBytes % 16 == 0 && aligned16(src, out) && (long) m * (rowBytes / 16) < Integer.MAX_VALUE) {
                int c16 = (int) (rowBytes / 16), n16 = m * c16;
                launchN("k_gather_rows_16b", n16, p(src), p(idx), p(out), n16, c16);
            } else {
                launchN("k_gather_rows_raw", out.numel(), p(src), p(idx), p(out), src.dtype().bytes(), out.numel(), c);
            }
            return;
        }
        floating("gatherRows", "src", src); floating("gatherRows", "out", out);
        launchN("k_gather_rows", out.numel(), p(src), dt(src), p(idx), p(out), dt(out), out.numel(), c);
    }

    /**
     * One launch for up to 8 destinations (a node's GPUs) when rows are whole 16-byte chunks; else the SPI's per
     * destination default. Destination rows are not checked on the device (the exchange builds them).
     */
    @Override
    public void scatterRowsTo(Tensor src, Tensor dest, Tensor[] dsts) {
        Checks.scatterRowsTo(src, dest, dsts);
        long rowBytes = (long) src.cols() * src.dtype().bytes();
        long n16 = src.rows() * (rowBytes / 16);
        if (rowBytes % 16 != 0 || n16 >= Integer.MAX_VALUE || dsts.length > 8 || !aligned16(src) || !aligned16(dsts)) {
            Backend.super.scatterRowsTo(src, dest, dsts);
            return;
        }
        launchN("k_scatter_rows_to_16b", n16, withPeerRows(new Object[] {p(src)}, dest, dsts, (int) n16, (int) (rowBytes / 16)));
    }

    @Override
    public void releaseCachedMemory() {
        synchronize();
        allocator.emptyCache();   // blocks freed beside a side stream's work stay deferred, not cached: untouched
    }

    @Override
    public dev.moe4j.core.tensor.Storage wrapDeviceMemory(long address, long bytes) {
        if (address == 0 || bytes <= 0) throw new IllegalArgumentException("wrapDeviceMemory: address " + address + ", " + bytes + " bytes");
        return new CudaStorage(this, address, bytes, true);
    }

    @Override
    public void scatterAddRows(Tensor src, Tensor idx, Tensor w, Tensor dst) {
        floating("scatterAddRows", "src", src); floating("scatterAddRows", "dst", dst);
        int c = src.cols(), m = src.rows();
        Checks.dtype("scatterAddRows", "idx", idx, DType.I32);
        Checks.numel("scatterAddRows", "idx", idx, m);
        Checks.cols("scatterAddRows", "dst", dst, c);
        if (w != null) { floating("scatterAddRows", "w", w); Checks.numel("scatterAddRows", "w", w, m); }
        if (c == 0 || m == 0) return;
        addInF32(dst, acc -> launchN("k_scatter_add_rows_atomic", src.numel(), p(src), dt(src), p(idx), p(w), (int) dtOrZero(w), p(acc), src.numel(), c));
    }

    /**
     * Runs {@code add}, an fp32 atomic scatter-add, on dst: directly when dst is F32, else on an F32 copy that goes
     * back once, so the many additions into one row (a frequent token, an expert's bias gradient) round to bf16 once,
     * as on the CPU, not at every addition.
     */
    private void addInF32(Tensor dst, java.util.function.Consumer<Tensor> add) {
        if (dst.dtype() == DType.F32) {
            add.accept(dst);
            return;
        }
        try (Tensor acc = scratch(DType.F32, dst.shape().dims())) {
            copy(dst, acc);
            add.accept(acc);
            copy(acc, dst);
        }
    }

    // ------------------------------------------------------------------ reductions

    private static final int REDUCE_BLOCKS = 1024;

    private void reduce(Tensor x, Tensor out, boolean squares, float beta) {
        try (Tensor partial = scratch(DType.F32, 2 * REDUCE_BLOCKS)) {  // REDUCE_BLOCKS doubles
            int per = x.dtype() == DType.BF16 ? 8 : x.dtype() == DType.F32 ? 4 : 0;
            if (per > 0 && x.numel() % per == 0 && aligned16(x)) {
                launch("k_reduce_partial_x16", REDUCE_BLOCKS, 1, THREADS, 0, p(x), dt(x), x.numel() / per, squares ? 1 : 0, p(partial));
            } else {
                launch("k_reduce_partial", REDUCE_BLOCKS, 1, THREADS, 0, p(x), dt(x), x.numel(), squares ? 1 : 0, p(partial));
            }
            launch("k_reduce_final", 1, 1, THREADS, 0, p(partial), REDUCE_BLOCKS, p(out), dt(out), beta);
        }
    }

    @Override
    public void sum(Tensor x, Tensor out) {
        floating("sum", "x", x); floating("sum", "out", out);
        Checks.numel("sum", "out", out, 1);
        reduce(x, out, false, 0f);
    }

    @Override
    public void sumSquares(Tensor x, Tensor out, float beta) {
        floating("sumSquares", "x", x); floating("sumSquares", "out", out);
        Checks.numel("sumSquares", "out", out, 1);
        reduce(x, out, true, beta);
    }

    // ------------------------------------------------------------------ MoE routing

    /**
     * A bf16 x times the fp32 gate weight runs as the split product (the weight's three bf16 pieces side by side,
     * {@link #splitMatmul}) whose partial products the top-k kernel sums as it reads them, writing the logits: the
     * product's own pass over them saved. Other dtypes: the product, then {@link #moeGate}.
     */
    @Override
    public void moeGateLinear(GateSpec spec, Tensor x, Tensor weight, Tensor logits, GateOutputs out) {
        String op = "moeGateLinear";
        floating(op, "x", x); floating(op, "weight", weight); floating(op, "logits", logits);
        int[] d = Checks.matmul(x, false, weight, true, logits);
        int batch = d[0], s = d[1], e = d[2], m = d[3];
        if (x.dtype() == DType.BF16 && weight.dtype() == DType.F32 && logits.dtype() == DType.F32 && s > 0 && m > 0
                && splitsF32(x, weight, logits, batch, s, e, m)) {
            try (Tensor pieces = productOfPiecesOfB(x, false, weight, true, 3, s, e, m)) {
                gate(spec, logits, pieces, out);
            }
            return;
        }
        Backend.super.moeGateLinear(spec, x, weight, logits, out);
    }

    @Override
    public void moeGate(GateSpec spec, Tensor logits, GateOutputs out) { gate(spec, logits, null, out); }

    /** moeGate; pieces non-null: fp32 [S, tE], the logits' t partial products side by side, summed into logits (fp32) first. */
    private void gate(GateSpec spec, Tensor logits, Tensor pieces, GateOutputs out) {
        String op = "moeGate";
        floating(op, "logits", logits);
        Checks.rank(op, "logits", logits, 2);
        int s = logits.dim(0), e = logits.dim(1), k = spec.k();
        if (k > e) throw new IllegalArgumentException(op + ": k = " + k + " exceeds the " + e + " experts");
        checkGateOutputs(op, out, s, e, k);
        if (s == 0) throw new IllegalArgumentException(op + ": logits has no rows (S = 0 tokens)");
        int cap = spec.dropless() ? 0 : spec.capacity();
        // k_gate_tile: blocks of `threads` (256, fewer where (threads / 32) * E ints of shared memory pass 48 KiB), tiles of
        // `tile` tokens (64; larger where there would be more than 256 tiles or 4M tile counts, to keep k_gate_scan short)
        int threads = 256;
        while (threads > 32 && (threads / 32) * 4L * e > 48 * 1024) threads /= 2;
        int tile = Math.min(64, threads);
        while (tile < threads && ((s + tile - 1) / tile > 256 || (long) ((s + tile - 1) / tile) * k * e > (1L << 22))) tile *= 2;
        int tiles = (s + tile - 1) / tile;
        int tileCounts = Math.toIntExact((long) tiles * k * e);
        // k_gate_scan: a warp per expert, 8 a block, and at least one block per 2048 tokens (up to 64) for the z-loss's sum
        int scanBlocks = Math.max((e + 7) / 8, Math.min((s + 2047) / 2048, 64));
        try (Tensor lse = scratch(DType.F32, s); Tensor cnt = scratch(DType.I32, tileCounts); Tensor base = scratch(DType.I32, tileCounts);
             Tensor gsum = scratch(DType.F32, Math.toIntExact((long) tiles * e)); Tensor parts = scratch(DType.F32, e + scanBlocks);
             Tensor ticket = scratch(DType.I32, 1)) {
            // a warp per token
            launch("k_gate_topk", Math.toIntExact((32L * s + 255) / 256), 1, 256, 0, p(logits), dt(logits), p(pieces), pieces == null ? 0 : pieces.cols() / e,
                    p(out.gates()), dt(out.gates()), p(out.experts()), p(lse), s, e, k, spec.rsample() ? 1 : 0, spec.secondSampling() ? 1 : 0,
                    spec.seed(), spec.offset());
            launch("k_gate_tile", tiles, 1, threads, (threads / 32) * 4 * e, p(out.experts()), p(out.gates()), dt(out.gates()), s, e, k, tile,
                    p(out.dest()), p(cnt), p(gsum), p(ticket));
            launch("k_gate_scan", scanBlocks, 1, 256, 0, p(cnt), p(gsum), p(lse), s, e, k, tiles, cap, p(base), p(out.counts()), p(out.offsets()),
                    p(out.losses()), dt(out.losses()), p(parts), p(parts) + 4L * e, p(ticket));
            if (spec.useRts()) {
                int blocksSk = (int) (((long) s * k + 127) / 128);
                try (Tensor prio = scratch(DType.F32, s * k)) {
                    launch("k_gate_priorities", blocksSk, 1, 128, 0, s, e, k, spec.seed(), spec.offset(), p(prio));
                    // base's first tile is rankBase [k][E]
                    launch("k_gate_slots", blocksSk, 1, 128, 0, p(out.experts()), p(base), p(out.offsets()), p(prio), s, e, k, cap, p(out.dest()));
                }
            }
            launch("k_gate_dest", (s + 127) / 128, 1, 128, 0, p(out.gates()), dt(out.gates()), p(out.experts()), p(base), p(out.offsets()),
                    p(out.dest()), p(out.weights()), dt(out.weights()), s, e, k, tile, cap, spec.useRts() ? 1 : 0);
        }
    }

    private void checkGateOutputs(String op, GateOutputs out, int s, int e, int k) {
        Checks.gateOutputs(op, out, s, e, k);
        // the kernels take F32 or BF16, not F64
        floating(op, "gates", out.gates());
        floating(op, "weights", out.weights());
        floating(op, "losses", out.losses());
    }

    @Override
    public void moeGateBackward(GateSpec spec, Tensor logits, GateOutputs saved, Tensor dweights, float lauxCoeff, float zlossCoeff, Tensor dlogits) {
        String op = "moeGateBackward";
        floating(op, "logits", logits);
        Checks.rank(op, "logits", logits, 2);
        int s = logits.dim(0), e = logits.dim(1), k = spec.k();
        checkGateOutputs(op, saved, s, e, k);
        floating(op, "dweights", dweights);
        Checks.matrix(op, "dweights", dweights, s, k);
        floating(op, "dlogits", dlogits);
        Checks.matrix(op, "dlogits", dlogits, s, e);
        if (s == 0) throw new IllegalArgumentException(op + ": logits has no rows (S = 0 tokens)");
        // first-choice counts: for k = 1 they are the forward's counts (all choices, before dropping)
        try (Tensor first = k == 1 ? null : scratch(DType.I32, e)) {
            if (first != null) launch("k_gate_first_counts", 1, 1, 1024, 4 * e, p(saved.experts()), s, e, k, p(first));
            // a warp per token
            launch("k_gate_bwd", Math.toIntExact((32L * s + 255) / 256), 1, 256, 0, p(logits), dt(logits), p(saved.gates()), dt(saved.gates()),
                    p(saved.experts()), p(saved.dest()), p(dweights), dt(dweights), p(first != null ? first : saved.counts()), lauxCoeff, zlossCoeff,
                    p(dlogits), dt(dlogits), s, e, k);
        }
    }

    /** On the device, without reading the counts: the caller's capacity must be at least the largest count. */
    @Override
    public void moeGatePad(GateOutputs dropless, int capacity, Tensor dest, Tensor offsets) {
        String op = "moeGatePad";
        Checks.gatePad(op, dropless, capacity, dest, offsets);
        int e = Math.toIntExact(offsets.numel() - 1);
        // the threads read every old offset while others write the new ones
        if (p(offsets) == p(dropless.offsets())) throw new IllegalArgumentException(op + ": offsets must not be the dropless routing's own");
        long n = dest.numel();
        launchN("k_gate_pad", Math.max(n, e + 1L), p(dropless.experts()), p(dropless.dest()), p(dropless.offsets()), n, e, capacity, p(dest), p(offsets));
    }

    @Override
    public void moePermute(Tensor x, Tensor dest, Tensor buf) {
        permute(x, dest, null, 0, buf);
    }

    @Override
    public void moePermute(Tensor x, Tensor dest, Tensor counts, int capacity, Tensor buf) {
        permute(x, dest, Objects.requireNonNull(counts, "counts"), capacity, buf);
    }

    /** The dispatch; with counts also zeroes buf's free slots (capacity &gt; 0) so that every row is written. */
    private void permute(Tensor x, Tensor dest, Tensor counts, int capacity, Tensor buf) {
        String op = "moePermute";
        floating(op, "x", x); floating(op, "buf", buf);
        int k = checkDispatch(op, x, dest);
        int s = x.rows(), m = x.cols();
        Checks.cols(op, "buf", buf, m);
        boolean zero = counts != null && freeSlots(op, counts, capacity, s, k, buf.rows());
        long n = (long) s * k * m;
        if (rows8(m, n, x, buf)) {
            int n8 = (int) (n / 8), copyBlocks = blocks(n8);
            launch("k_moe_permute_bf16x8", copyBlocks + (zero ? zeroBlocks(buf.rows()) : 0), 1, THREADS, 0, p(x), p(dest), p(buf), n8, k, m / 8,
                    copyBlocks, p(counts), capacity, buf.rows());
        } else {
            launchN("k_moe_permute", n, p(x), dt(x), p(dest), p(buf), dt(buf), n, k, m);
            if (zero) zeroFreeSlots(buf, counts, capacity);
        }
    }

    /** One launch that stores every row at its place in dsts (PeerRows in native/common.cuh), where the rows suit it. */
    @Override
    public void moePermuteTo(Tensor x, Tensor dest, Tensor counts, int capacity, Tensor rowDest, Tensor[] dsts) {
        String op = "moePermuteTo";
        floating(op, "x", x);
        int k = checkDispatch(op, x, dest);
        int s = x.rows(), m = x.cols(), rows = rowDest.rows();
        Checks.rowDestinations(op, rows, m, x.dtype(), rowDest, dsts);
        long n = (long) s * k * m;
        if (!peerRows(m, n, x, dsts)) {
            Backend.super.moePermuteTo(x, dest, counts, capacity, rowDest, dsts);
            return;
        }
        boolean zero = freeSlots(op, Objects.requireNonNull(counts, "counts"), capacity, s, k, rows);
        int n8 = (int) (n / 8), copyBlocks = blocks(n8);
        launch("k_moe_permute_to_bf16x8", copyBlocks + (zero ? zeroBlocks(rows) : 0), 1, THREADS, 0,
                withPeerRows(new Object[] {p(x), p(dest)}, rowDest, dsts, n8, k, m / 8, copyBlocks, p(counts), capacity, rows));
    }

    /** The dispatch's x and dest [S, k] I32; returns k. */
    private static int checkDispatch(String op, Tensor x, Tensor dest) {
        Checks.open(op, "dest", dest);
        Checks.dtype(op, "dest", dest, DType.I32);
        if (dest.rows() != x.rows()) throw new IllegalArgumentException(op + ": dest has " + dest.rows() + " rows, x has " + x.rows());
        return dest.cols();
    }

    /**
     * Whether rows of m bf16 (n elements in all, x and the other tensors given) can be stored into dsts by one of the
     * 16-byte PeerRows kernels: at most 8 destinations, all bf16 and 16-byte aligned.
     */
    private boolean peerRows(int m, long n, Tensor x, Tensor[] dsts) {
        return dsts.length <= 8 && rows8(m, n, x) && bf16x8(dsts);
    }

    /** A kernel's arguments: head, then a PeerRows' (native/common.cuh: rowDest and eight destinations, 0 for none), then tail. */
    private Object[] withPeerRows(Object[] head, Tensor rowDest, Tensor[] dsts, Object... tail) {
        Object[] args = new Object[head.length + 9 + tail.length];
        System.arraycopy(head, 0, args, 0, head.length);
        args[head.length] = p(rowDest);
        for (int q = 0; q < 8; q++) args[head.length + 1 + q] = q < dsts.length ? p(dsts[q]) : 0L;
        System.arraycopy(tail, 0, args, head.length + 9, tail.length);
        return args;
    }

    /**
     * Checks the layout of the counts forms of the dispatch and its backward (buf [E*C, M] for capacity C &gt; 0, else
     * [S*k, M]) and says whether it has free slots to zero (capacity &gt; 0).
     */
    private static boolean freeSlots(String op, Tensor counts, int capacity, int s, int k, long bufRows) {
        Checks.open(op, "counts", counts);
        Checks.dtype(op, "counts", counts, DType.I32);
        long rows = capacity > 0 ? counts.numel() * capacity : (long) s * k;
        if (bufRows != rows) {
            throw new IllegalArgumentException(op + ": the buffer has " + bufRows + " rows, expected " + rows
                    + (capacity > 0 ? " (" + counts.numel() + " experts x capacity " + capacity + ")" : " (S*k, dropless)"));
        }
        return capacity > 0 && rows > 0;
    }

    /** Blocks of THREADS that zero the free slots of a buffer of that many rows: a warp per row. */
    private static int zeroBlocks(long rows) { return blocks(32L * rows); }

    /** The free slots of buf [E*C, M] zeroed on their own (also the dtype-generic dispatch paths'), a warp per row. */
    @Override
    public void zeroFreeSlots(Tensor buf, Tensor counts, int capacity) {
        String op = "zeroFreeSlots";
        floating(op, "buf", buf);
        Checks.open(op, "counts", counts);
        Checks.dtype(op, "counts", counts, DType.I32);
        if (counts.numel() * capacity != buf.rows()) {
            throw new IllegalArgumentException(op + ": buf has " + buf.rows() + " rows, expected " + counts.numel() + " x " + capacity);
        }
        if (buf.rows() == 0) return;
        launch("k_moe_zero_free_slots", zeroBlocks(buf.rows()), 1, THREADS, 0, p(buf), Math.toIntExact(buf.cols() * (long) buf.dtype().bytes() / 2),
                p(counts), capacity, buf.rows());
    }

    /** One launch, as epDispatchDestinations (native/moe.cu k_ep_combine_dest). */
    @Override
    public void epCombineDestinations(Tensor counts, int me, int P, double maxPadding, long bufRows, Tensor out, Tensor local) {
        String op = "epCombineDestinations";
        int E = epCounts(op, counts, me, P, out);
        int rows = out.rows(), El = E / P;
        if (local != null) {
            Checks.dtype(op, "local", local, DType.I32);
            Checks.numel(op, "local", local, 2L * El + 1);
        }
        if (rows == 0 && local == null) return;
        if ((P + 2L) * El + 1 > 12000) {   // the kernel's tables beyond 48 KB of shared memory
            Backend.super.epCombineDestinations(counts, me, P, maxPadding, bufRows, out, local);
            return;
        }
        launch("k_ep_combine_dest", Math.max(1, Math.min(blocks(rows), 64)), 1, THREADS, (int) (((P + 2L) * El + 1) * 4), p(counts), me, P, E,
                (float) Math.min(maxPadding, Float.MAX_VALUE), (int) Math.min(bufRows, Integer.MAX_VALUE), p(out), rows, p(local));
    }

    /** The checks of the expert-parallel destination ops; returns E. */
    private static int epCounts(String op, Tensor counts, int me, int P, Tensor out) {
        Checks.open(op, "counts", counts);
        Checks.dtype(op, "counts", counts, DType.I32);
        Checks.dtype(op, "out", out, DType.I32);
        long n = counts.numel();
        if (P < 1 || n % P != 0 || (n / P) % P != 0 || me < 0 || me >= P) {
            throw new IllegalArgumentException(op + ": " + n + " counts for rank " + me + " of " + P + " (expected P * E, E a multiple of P)");
        }
        if (out.cols() != 2) throw new IllegalArgumentException(op + ": out is " + out.shape() + ", expected [rows, 2]");
        return (int) (n / P);
    }

    /** One launch; every block rebuilds the small per-expert tables in shared memory (native/moe.cu k_ep_dispatch_dest). */
    @Override
    public void epDispatchDestinations(Tensor counts, int me, int P, double maxPadding, long windowRows, Tensor out) {
        String op = "epDispatchDestinations";
        int E = epCounts(op, counts, me, P, out), R = out.rows();
        if (R == 0) return;
        if (E > 4000) {   // the kernel's tables beyond 48 KB of shared memory
            Backend.super.epDispatchDestinations(counts, me, P, maxPadding, windowRows, out);
            return;
        }
        // float: the kernel compares El * most <= maxPadding * rows in fp32 (exact for the counts of any real layer)
        float pad = (float) Math.min(maxPadding, Float.MAX_VALUE);
        launch("k_ep_dispatch_dest", Math.min(blocks(R), 64), 1, THREADS, 3 * (E + 1) * 4, p(counts), me, P, E, pad,
                (int) Math.min(windowRows, Integer.MAX_VALUE), p(out), R);
    }

    @Override
    public void moeUnpermute(Tensor buf, Tensor dest, Tensor w, Tensor out) {
        String op = "moeUnpermute";
        floating(op, "buf", buf); floating(op, "out", out);
        Checks.open(op, "dest", dest);
        Checks.dtype(op, "dest", dest, DType.I32);
        int s = out.rows(), m = out.cols(), k = dest.cols();
        if (dest.rows() != s) throw new IllegalArgumentException(op + ": dest has " + dest.rows() + " rows, out has " + s);
        Checks.cols(op, "buf", buf, m);
        if (w != null) { floating(op, "w", w); Checks.matrix(op, "w", w, s, k); }
        if (rows8(m, out.numel(), buf, out)) {
            int n8 = (int) (out.numel() / 8);
            launchN("k_moe_unpermute_bf16x8", n8, p(buf), p(dest), p(w), (int) dtOrZero(w), p(out), n8, k, m / 8);
        } else {
            launchN("k_moe_unpermute", out.numel(), p(buf), dt(buf), p(dest), p(w), (int) dtOrZero(w), p(out), dt(out), out.numel(), k, m);
        }
    }

    @Override
    public void moeUnpermuteBackward(Tensor dout, Tensor buf, Tensor dest, Tensor w, Tensor dbuf, Tensor dw) {
        unpermuteBackward(dout, buf, dest, w, null, 0, dbuf, dw);
    }

    @Override
    public void moeUnpermuteBackward(Tensor dout, Tensor buf, Tensor dest, Tensor w, Tensor counts, int capacity, Tensor dbuf, Tensor dw) {
        unpermuteBackward(dout, buf, dest, w, Objects.requireNonNull(counts, "counts"), capacity, dbuf, dw);
    }

    /** The combine's backward; with counts also zeroes dbuf's free slots (capacity &gt; 0) so that every row is written. */
    private void unpermuteBackward(Tensor dout, Tensor buf, Tensor dest, Tensor w, Tensor counts, int capacity, Tensor dbuf, Tensor dw) {
        String op = "moeUnpermuteBackward";
        floating(op, "dbuf", dbuf);
        int k = checkCombineBackward(op, dout, buf, dest, w, dbuf.rows(), dw);
        int s = dout.rows(), m = dout.cols();
        Checks.cols(op, "dbuf", dbuf, m);
        boolean zero = counts != null && freeSlots(op, counts, capacity, s, k, dbuf.rows());
        long n = (long) s * k * m;
        boolean fast = rows8(m, n, dout, dbuf), fastDw = dw != null && fast && bf16x8(buf);
        if (fast) {   // dbuf and (bf16 buf) dw in one pass over dout, a warp per (token, choice)
            int sk = s * k, workBlocks = blocks(32L * sk);
            if (sk > 0 || zero) {
                launch("k_moe_unpermute_bwd_bf16x8", workBlocks + (zero ? zeroBlocks(dbuf.rows()) : 0), 1, THREADS, 0, p(dout), p(fastDw ? buf : null),
                        p(dest), p(w), (int) dtOrZero(w), p(dbuf), p(fastDw ? dw : null), (int) (fastDw ? dt(dw) : 0), sk, k, m / 8, workBlocks,
                        p(counts), capacity, dbuf.rows());
            }
        } else {
            launchN("k_moe_unpermute_bwd_dbuf", n, p(dout), dt(dout), p(dest), p(w), (int) dtOrZero(w), p(dbuf), dt(dbuf), n, k, m);
            if (zero) zeroFreeSlots(dbuf, counts, capacity);
        }
        if (dw != null && !fastDw) unpermuteBackwardDw(dout, buf, dest, dw, k);
    }

    /** One launch that stores every row of dbuf at its place in dsts (PeerRows), where the rows suit it. */
    @Override
    public void moeUnpermuteBackwardTo(Tensor dout, Tensor buf, Tensor dest, Tensor w, Tensor counts, int capacity, Tensor rowDest,
                                       Tensor[] dsts, Tensor dw) {
        String op = "moeUnpermuteBackwardTo";
        int rows = rowDest.rows();
        int k = checkCombineBackward(op, dout, buf, dest, w, rows, dw);
        int s = dout.rows(), m = dout.cols();
        Checks.rowDestinations(op, rows, m, dout.dtype(), rowDest, dsts);
        long n = (long) s * k * m;
        if (!peerRows(m, n, dout, dsts) || (dw != null && !bf16x8(buf))) {
            Backend.super.moeUnpermuteBackwardTo(dout, buf, dest, w, counts, capacity, rowDest, dsts, dw);
            return;
        }
        boolean zero = freeSlots(op, Objects.requireNonNull(counts, "counts"), capacity, s, k, rows);
        int sk = s * k, workBlocks = blocks(32L * sk);
        if (sk == 0 && !zero) return;
        launch("k_moe_unpermute_bwd_to_bf16x8", workBlocks + (zero ? zeroBlocks(rows) : 0), 1, THREADS, 0,
                withPeerRows(new Object[] {p(dout), p(dw != null ? buf : null), p(dest), p(w), (int) dtOrZero(w)}, rowDest, dsts,
                        p(dw), (int) (dw != null ? dt(dw) : 0), sk, k, m / 8, workBlocks, p(counts), capacity, rows));
    }

    /** The combine backward's dout [S, M], dest [S, k], w, and (dw computed) buf [bufRows, M] and dw [S, k]; returns k. */
    private static int checkCombineBackward(String op, Tensor dout, Tensor buf, Tensor dest, Tensor w, long bufRows, Tensor dw) {
        floating(op, "dout", dout);
        Checks.open(op, "dest", dest);
        Checks.dtype(op, "dest", dest, DType.I32);
        int s = dout.rows(), m = dout.cols(), k = dest.cols();
        if (dest.rows() != s) throw new IllegalArgumentException(op + ": dest has " + dest.rows() + " rows, dout has " + s);
        if (dw != null) { floating(op, "buf", buf); Checks.matrix(op, "buf", buf, bufRows, m); }
        if (w != null) { floating(op, "w", w); Checks.matrix(op, "w", w, s, k); }
        if (dw != null) { floating(op, "dw", dw); Checks.matrix(op, "dw", dw, s, k); }
        return k;
    }

    /** dw [S, k] of the combine's backward on its own (the dtype-generic path). */
    private void unpermuteBackwardDw(Tensor dout, Tensor buf, Tensor dest, Tensor dw, int k) {
        int s = dout.rows(), m = dout.cols();
        if ((long) s * k > 0) {
            launch("k_moe_unpermute_bwd_dw", s * k, 1, rowThreads(m), 0, p(dout), dt(dout), p(buf), dt(buf), p(dest), p(dw), dt(dw), k, m);
        }
    }

    // ------------------------------------------------------------------ optimizer

    @Override
    public void adamw(Tensor param, Tensor grad, Tensor m, Tensor v, AdamWParams h, Tensor normSq, Tensor modelCopy) {
        floating("adamw", "param", param); floating("adamw", "grad", grad); floating("adamw", "m", m); floating("adamw", "v", v);
        long n = param.numel();
        Checks.numel("adamw", "grad", grad, n);
        Checks.numel("adamw", "m", m, n);
        Checks.numel("adamw", "v", v, n);
        if (modelCopy != null) { floating("adamw", "modelCopy", modelCopy); Checks.numel("adamw", "modelCopy", modelCopy, n); }
        if (normSq != null) { floating("adamw", "normSq", normSq); Checks.numel("adamw", "normSq", normSq, 1); }
        double c1 = 1 - Math.pow(h.beta1(), h.step()), c2 = 1 - Math.pow(h.beta2(), h.step());
        boolean f32x4 = n % 4 == 0 && param.dtype() == DType.F32 && m.dtype() == DType.F32 && v.dtype() == DType.F32 && aligned16(param, m, v)
                && (grad.dtype() == DType.F32 ? aligned16(grad) : grad.dtype() == DType.BF16 && p(grad) % 8 == 0)
                && (modelCopy == null || modelCopy.dtype() == DType.BF16 && p(modelCopy) % 8 == 0);
        if (f32x4) {
            launchN("k_adamw_f32x4", n / 4, p(param), p(grad), dt(grad), p(m), p(v), p(modelCopy), n / 4,
                    h.lr(), h.beta1(), h.beta2(), h.eps(), h.weightDecay(), c1, c2, p(normSq), (int) dtOrZero(normSq), h.maxGradNorm());
            return;
        }
        launchN("k_adamw", n, p(param), dt(param), p(grad), dt(grad), p(m), dt(m), p(v), dt(v), p(modelCopy), (int) dtOrZero(modelCopy), n,
                h.lr(), h.beta1(), h.beta2(), h.eps(), h.weightDecay(), c1, c2, p(normSq), (int) dtOrZero(normSq), h.maxGradNorm());
    }

    // ------------------------------------------------------------------ lifecycle

    @Override
    public synchronized void close() {
        if (closed) return;
        bind();
        cudart.cudaStreamSynchronize(mainStream);
        if (besideStream != null) cudart.cudaStreamSynchronize(besideStream);
        closed = true;
        kernels.close();
        cublas.cublasDestroy_v2(blas);
        if (sideStreams != null) {
            for (int s = 0; s < SIDE_STREAMS; s++) {
                cublas.cublasDestroy_v2(sideBlas[s]);
                cudart.cudaStreamDestroy(sideStreams[s]);
                cudart.cudaEventDestroy(joins[s]);
            }
            cudart.cudaEventDestroy(fork);
        }
        if (timingStart != null) {
            cudart.cudaEventDestroy(timingStart);
            cudart.cudaEventDestroy(timingEnd);
        }
        if (ltTuner != null) ltTuner.close();   // its workspace goes back to the allocator, freed next
        if (uploads != null) uploads.close();
        if (readBuf != null) cudart.cudaFreeHost(readBuf);
        if (readDone != null) cudart.cudaEventDestroy(readDone);
        allocator.emptyCache();
        if (besideStream != null) {
            cudart.cudaStreamDestroy(besideStream);
            cudart.cudaEventDestroy(besideFork);
            cudart.cudaEventDestroy(besideDone);
        }
        cudart.cudaStreamDestroy(mainStream);
        scalars.close();
    }
}
