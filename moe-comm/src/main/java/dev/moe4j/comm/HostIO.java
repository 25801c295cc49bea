package dev.moe4j.comm;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.tensor.Tensor;

/**
 * Host transfers through the Backend API, for the in-process communicator. Values travel as doubles, which hold
 * every F32, BF16, I32 and F64 value exactly, so moving data through here never changes a bit.
 */
final class HostIO {
    private HostIO() {}

    static double[] read(Tensor t) {
        if (t.dtype() == DType.I32) {
            int[] v = t.backend().toInts(t);
            double[] d = new double[v.length];
            for (int i = 0; i < v.length; i++) d[i] = v[i];
            return d;
        }
        return t.backend().toDoubles(t);
    }

    /** dst = data (data.length == dst.numel()). */
    static void write(Tensor dst, double[] data) {
        if (data.length != dst.numel()) throw new IllegalStateException("write of " + data.length + " values into " + dst);
        if (data.length == 0) return;
        Backend b = dst.backend();
        Tensor tmp;
        if (dst.dtype() == DType.I32) {
            int[] v = new int[data.length];
            for (int i = 0; i < v.length; i++) v[i] = (int) data[i];
            tmp = b.fromInts(v, data.length);
        } else {
            tmp = b.fromDoubles(dst.dtype(), data, data.length);
        }
        try {
            b.copy(tmp, dst);
        } finally {
            tmp.close();
        }
    }
}
