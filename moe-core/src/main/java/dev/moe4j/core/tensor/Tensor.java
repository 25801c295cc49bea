package dev.moe4j.core.tensor;

import dev.moe4j.core.backend.Backend;

/**
 * A contiguous, row-major, typed view into a backend {@link Storage}.
 *
 * <p>Tensors are created by a {@link Backend}; a tensor that owns its storage frees it on {@link #close()}.
 * Views ({@link #view}, {@link #reshape}) share the storage and never free it. A tensor created while a
 * {@link Scope} is open on the thread is closed with that scope, so a training step's temporaries need no
 * explicit close.
 */
public final class Tensor implements AutoCloseable {
    private final Backend backend;
    private final Storage storage;
    private final long offset;   // in elements of dtype
    private final DType dtype;
    private final Shape shape;
    private final boolean owner;
    private boolean closed;

    private Tensor(Backend backend, Storage storage, long offset, DType dtype, Shape shape, boolean owner) {
        this.backend = backend;
        this.storage = storage;
        this.offset = offset;
        this.dtype = dtype;
        this.shape = shape;
        this.owner = owner;
    }

    /** For backends: a new tensor owning {@code storage}, registered with the current scope if there is one. */
    public static Tensor owning(Backend backend, Storage storage, DType dtype, Shape shape) {
        fits(storage, dtype, shape);
        Tensor t = new Tensor(backend, storage, 0, dtype, shape, true);
        Scope.register(t);
        return t;
    }

    /**
     * For backends and communicators: a tensor over {@code storage} that does not own it (closing it frees nothing), for
     * memory whose owner is elsewhere, such as a peer's window ({@link dev.moe4j.core.comm.PeerWindow}).
     */
    public static Tensor borrowing(Backend backend, Storage storage, DType dtype, Shape shape) {
        fits(storage, dtype, shape);
        return new Tensor(backend, storage, 0, dtype, shape, false);
    }

    private static void fits(Storage storage, DType dtype, Shape shape) {
        if (shape.numel() * dtype.bytes() > storage.byteSize()) {
            throw new IllegalArgumentException("storage of " + storage.byteSize() + " bytes cannot hold " + dtype + shape);
        }
    }

    public Backend backend() { return backend; }

    public Storage storage() { return storage; }

    /** Offset of the first element in the storage, counted in elements of {@link #dtype()}. */
    public long offset() { return offset; }

    /** Offset of the first element in bytes. */
    public long byteOffset() { return offset * dtype.bytes(); }

    public DType dtype() { return dtype; }

    public Shape shape() { return shape; }

    public int dim(int i) { return shape.dim(i); }

    public int rank() { return shape.rank(); }

    public long numel() { return shape.numel(); }

    /** Rows when seen as a matrix [numel / last dim, last dim]. */
    public int rows() { return Math.toIntExact(shape.rows()); }

    /** The last dimension. */
    public int cols() { return shape.cols(); }

    public boolean isClosed() { return closed || storage == null; }

    /** A view of {@code count} elements starting at element {@code start} of this tensor, with the given shape. */
    public Tensor view(long start, int... dims) {
        Shape s = Shape.of(dims);
        if (start < 0 || start + s.numel() > numel()) {
            throw new IllegalArgumentException("view of " + s + " at element " + start + " does not fit in " + dtype + shape);
        }
        return new Tensor(backend, storage, offset + start, dtype, s, false);
    }

    /** The same elements with another shape of equal element count. */
    public Tensor reshape(int... dims) {
        Shape s = Shape.of(dims);
        if (s.numel() != numel()) throw new IllegalArgumentException("cannot reshape " + shape + " (" + numel() + " elements) to " + s);
        return new Tensor(backend, storage, offset, dtype, s, false);
    }

    /** Row {@code i} .. {@code i+n} of this tensor seen as a matrix [rows, cols]. */
    public Tensor rowSlice(int i, int n) {
        return view((long) i * cols(), n, cols());
    }

    /** Copies the values to a new float array (a host transfer: for tests, logging and checkpoints). */
    public float[] toFloats() { return backend.toFloats(this); }

    public double[] toDoubles() { return backend.toDoubles(this); }

    public int[] toInts() { return backend.toInts(this); }

    /** Frees the storage if this tensor owns it; idempotent. Views only mark themselves closed. */
    @Override
    public void close() {
        if (closed) return;
        closed = true;
        if (owner) storage.release();
    }

    @Override
    public String toString() {
        return "Tensor(" + dtype + shape + " on " + backend.name() + (owner ? "" : ", view") + (closed ? ", closed" : "") + ")";
    }
}
