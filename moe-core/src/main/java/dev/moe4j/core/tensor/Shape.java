package dev.moe4j.core.tensor;

import java.util.Arrays;

/** An immutable tensor shape (row-major, contiguous). */
public final class Shape {
    private final int[] dims;

    private Shape(int[] dims) {
        for (int i = 0; i < dims.length; i++) {
            if (dims[i] < 0) throw new IllegalArgumentException("shape " + Arrays.toString(dims) + ": dimension " + i + " is negative");
        }
        this.dims = dims;
    }

    public static Shape of(int... dims) { return new Shape(dims.clone()); }

    public int rank() { return dims.length; }

    public int dim(int i) { return dims[i < 0 ? dims.length + i : i]; }

    public int[] dims() { return dims.clone(); }

    public long numel() {
        long n = 1;
        for (int d : dims) n *= d;
        return n;
    }

    /** Product of all dimensions but the last: the number of rows of the tensor seen as a matrix. */
    public long rows() {
        return dims.length == 0 ? 1 : numel() / Math.max(1, dims[dims.length - 1]);
    }

    /** The last dimension (1 for a scalar). */
    public int cols() { return dims.length == 0 ? 1 : dims[dims.length - 1]; }

    @Override public boolean equals(Object o) { return o instanceof Shape s && Arrays.equals(dims, s.dims); }

    @Override public int hashCode() { return Arrays.hashCode(dims); }

    @Override public String toString() { return Arrays.toString(dims); }
}
