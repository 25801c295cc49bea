package dev.moe4j.comm.nccl;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.BFloat16;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Shape;
import dev.moe4j.core.tensor.Storage;
import dev.moe4j.core.tensor.Tensor;
import org.bytedeco.cuda.cudart.CUstream_st;
import org.bytedeco.cuda.global.cudart;
import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.javacpp.Pointer;

import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;
import java.lang.reflect.Proxy;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.concurrent.atomic.AtomicLong;

import static dev.moe4j.comm.nccl.NcclCommunicator.cuda;

/**
 * A minimal device backend for the NCCL tests, so that moe-comm needs no dependency on moe-cuda: device memory
 * (cudaMalloc) on its own stream, host transfers, copy, and gatherRows through the host (the real CUDA backend
 * runs it as a kernel). Every other op throws. Built as a {@link Proxy} of {@link Backend}.
 */
final class CudaTestBackend {
    private CudaTestBackend() {}

    static Backend create(int device) {
        cuda("cudaSetDevice", cudart.cudaSetDevice(device));
        CUstream_st stream = new CUstream_st();
        cuda("cudaStreamCreateWithFlags", cudart.cudaStreamCreateWithFlags(stream, cudart.cudaStreamNonBlocking));
        Impl impl = new Impl(device, stream);
        Backend b = (Backend) Proxy.newProxyInstance(Backend.class.getClassLoader(), new Class<?>[] {Backend.class}, (proxy, m, args) -> {
            Method target;
            try {
                target = Impl.class.getMethod(m.getName(), prepend(m.getParameterTypes()));
            } catch (NoSuchMethodException e) {
                if (m.getName().equals("toString")) return "CudaTestBackend(cuda:" + device + ")";
                if (m.getName().equals("hashCode")) return System.identityHashCode(proxy);
                if (m.getName().equals("equals")) return proxy == args[0];
                throw new UnsupportedOperationException("CudaTestBackend does not implement " + m.getName());
            }
            Object[] a = new Object[(args == null ? 0 : args.length) + 1];
            a[0] = proxy;
            if (args != null) System.arraycopy(args, 0, a, 1, args.length);
            try {
                return target.invoke(impl, a);
            } catch (InvocationTargetException e) {
                throw e.getCause();
            }
        });
        return b;
    }

    private static Class<?>[] prepend(Class<?>[] p) {
        Class<?>[] out = new Class<?>[p.length + 1];
        out[0] = Backend.class;
        System.arraycopy(p, 0, out, 1, p.length);
        return out;
    }

    static final class DeviceStorage implements Storage {
        final long address, bytes;
        final AtomicLong counter;
        boolean released;

        DeviceStorage(long bytes, AtomicLong counter, CUstream_st stream) {
            Pointer p = new Pointer();
            cuda("cudaMalloc", cudart.cudaMalloc(p, Math.max(16, bytes)));
            // On the backend's stream: a memset on the legacy stream could land after NCCL wrote the buffer.
            cuda("cudaMemsetAsync", cudart.cudaMemsetAsync(p, 0, Math.max(16, bytes), stream));
            this.address = p.address();
            this.bytes = bytes;
            this.counter = counter;
            counter.addAndGet(bytes);
        }

        @Override public long byteSize() { return bytes; }

        @Override public long deviceAddress() { return address; }

        @Override public void release() {
            if (released) return;
            released = true;
            cudart.cudaFree(NcclCommunicator.pointer(address));
            counter.addAndGet(-bytes);
        }
    }

    /** The implemented methods, each taking the proxy first. */
    public static final class Impl {
        final int device;
        final CUstream_st stream;
        final AtomicLong allocated = new AtomicLong();

        Impl(int device, CUstream_st stream) {
            this.device = device;
            this.stream = stream;
        }

        public String name(Backend self) { return "cuda-test:" + device; }

        public int deviceIndex(Backend self) { return device; }

        public long nativeStream(Backend self) { return stream.address(); }

        public boolean supports(Backend self, DType dt) { return true; }

        public long allocatedBytes(Backend self) { return allocated.get(); }

        public Tensor zeros(Backend self, DType dt, int[] shape) {
            Shape s = Shape.of(shape);
            cudart.cudaSetDevice(device);
            return Tensor.owning(self, new DeviceStorage(s.numel() * dt.bytes(), allocated, stream), dt, s);
        }

        public Tensor empty(Backend self, DType dt, int[] shape) { return zeros(self, dt, shape); }

        public Tensor fromDoubles(Backend self, DType dt, double[] data, int[] shape) {
            Tensor t = zeros(self, dt, shape);
            if (data.length != t.numel()) throw new IllegalArgumentException("fromDoubles: " + data.length + " values for " + t.shape());
            upload(t, encode(dt, data));
            return t;
        }

        public Tensor fromFloats(Backend self, DType dt, float[] data, int[] shape) {
            double[] d = new double[data.length];
            for (int i = 0; i < d.length; i++) d[i] = data[i];
            return fromDoubles(self, dt, d, shape);
        }

        public Tensor fromInts(Backend self, int[] data, int[] shape) {
            double[] d = new double[data.length];
            for (int i = 0; i < d.length; i++) d[i] = data[i];
            return fromDoubles(self, DType.I32, d, shape);
        }

        public double[] toDoubles(Backend self, Tensor t) { return decode(t.dtype(), download(t), Math.toIntExact(t.numel())); }

        public float[] toFloats(Backend self, Tensor t) {
            double[] d = toDoubles(self, t);
            float[] f = new float[d.length];
            for (int i = 0; i < d.length; i++) f[i] = (float) d[i];
            return f;
        }

        public int[] toInts(Backend self, Tensor t) {
            double[] d = toDoubles(self, t);
            int[] v = new int[d.length];
            for (int i = 0; i < d.length; i++) v[i] = (int) d[i];
            return v;
        }

        public void copy(Backend self, Tensor src, Tensor dst) {
            if (src.numel() != dst.numel()) throw new IllegalArgumentException("copy: " + src + " -> " + dst);
            if (src.numel() == 0) return;
            if (src.dtype() == dst.dtype()) {
                cuda("cudaMemcpyAsync", cudart.cudaMemcpyAsync(ptr(dst), ptr(src), src.numel() * src.dtype().bytes(),
                        cudart.cudaMemcpyDeviceToDevice, stream));
            } else {
                upload(dst, encode(dst.dtype(), toDoubles(self, src)));
            }
        }

        public void synchronize(Backend self) { cuda("cudaStreamSynchronize", cudart.cudaStreamSynchronize(stream)); }

        /** Through the host: enough for the tests (the CUDA backend runs it as a kernel). */
        public void gatherRows(Backend self, Tensor src, Tensor idx, Tensor out) {
            int c = src.cols();
            double[] s = toDoubles(self, src);
            int[] ix = toInts(self, idx);
            double[] o = new double[ix.length * c];
            for (int r = 0; r < ix.length; r++) if (ix[r] >= 0) System.arraycopy(s, ix[r] * c, o, r * c, c);
            if (o.length > 0) upload(out, encode(out.dtype(), o));
        }

        public void close(Backend self) {
            cudart.cudaStreamSynchronize(stream);
            cudart.cudaStreamDestroy(stream);
        }

        private static Pointer ptr(Tensor t) { return NcclCommunicator.pointer(t.storage().deviceAddress() + t.byteOffset()); }

        private void upload(Tensor t, byte[] bytes) {
            if (bytes.length == 0) return;
            synchronize(null);
            try (BytePointer h = new BytePointer(bytes.length)) {
                h.put(bytes);
                cuda("cudaMemcpy", cudart.cudaMemcpy(ptr(t), h, bytes.length, cudart.cudaMemcpyHostToDevice));
            }
        }

        private byte[] download(Tensor t) {
            int n = Math.toIntExact(t.numel() * t.dtype().bytes());
            byte[] b = new byte[n];
            if (n == 0) return b;
            synchronize(null);
            try (BytePointer h = new BytePointer(n)) {
                cuda("cudaMemcpy", cudart.cudaMemcpy(h, ptr(t), n, cudart.cudaMemcpyDeviceToHost));
                h.get(b);
            }
            return b;
        }

        private static byte[] encode(DType dt, double[] v) {
            ByteBuffer b = ByteBuffer.allocate(v.length * dt.bytes()).order(ByteOrder.LITTLE_ENDIAN);
            for (double x : v) {
                switch (dt) {
                    case F32 -> b.putFloat((float) x);
                    case BF16 -> b.putShort(BFloat16.fromFloat((float) x));
                    case I32 -> b.putInt((int) x);
                    case F64 -> b.putDouble(x);
                }
            }
            return b.array();
        }

        private static double[] decode(DType dt, byte[] bytes, int n) {
            ByteBuffer b = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN);
            double[] v = new double[n];
            for (int i = 0; i < n; i++) {
                v[i] = switch (dt) {
                    case F32 -> b.getFloat();
                    case BF16 -> BFloat16.toFloat(b.getShort());
                    case I32 -> b.getInt();
                    case F64 -> b.getDouble();
                };
            }
            return v;
        }
    }
}
