package dev.moe4j.core.comm;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.tensor.Tensor;

import java.util.concurrent.atomic.AtomicLong;

/**
 * A communicator that adds up the host time spent in its collectives, for logging how long a rank waits in the
 * expert-parallel all-to-alls. With an asynchronous communicator (NCCL) this is the time to enqueue and to wait
 * for host-side results such as exchanged counts, not the device transfer; device timings come from the benchmarks.
 */
public final class TimedCommunicator implements Communicator {
    private final Communicator inner;
    private final AtomicLong nanos = new AtomicLong(), calls = new AtomicLong();

    public TimedCommunicator(Communicator inner) {
        if (inner == null) throw new IllegalArgumentException("TimedCommunicator: inner communicator is null");
        this.inner = inner;
    }

    /** Seconds spent in collectives since the last call, and resets the count. */
    public double takeSeconds() { return nanos.getAndSet(0) / 1e9; }

    /** Collective calls since construction. */
    public long calls() { return calls.get(); }

    private <T> T timed(java.util.function.Supplier<T> op) {
        long t0 = System.nanoTime();
        try {
            return op.get();
        } finally {
            nanos.addAndGet(System.nanoTime() - t0);
            calls.incrementAndGet();
        }
    }

    private void timed(Runnable op) {
        timed(() -> { op.run(); return null; });
    }

    @Override public int rank() { return inner.rank(); }

    @Override public int size() { return inner.size(); }

    @Override public Backend backend() { return inner.backend(); }

    @Override public String describe() { return "timed " + inner.describe(); }

    @Override public void allToAll(Tensor send, Tensor recv) { timed(() -> inner.allToAll(send, recv)); }

    @Override public void allToAllV(Tensor send, int[] sendRows, Tensor recv, int[] recvRows) {
        timed(() -> inner.allToAllV(send, sendRows, recv, recvRows));
    }

    @Override public int[] exchangeCounts(int[] sendCounts) { return timed(() -> inner.exchangeCounts(sendCounts)); }

    @Override public void allReduce(Tensor t, ReduceOp op) { timed(() -> inner.allReduce(t, op)); }

    @Override public CommWork allReduceAsync(Tensor t, ReduceOp op) { return timed(() -> inner.allReduceAsync(t, op)); }

    @Override public CommWork allToAllVAsync(Tensor send, int[] sendRows, Tensor recv, int[] recvRows) {
        return timed(() -> inner.allToAllVAsync(send, sendRows, recv, recvRows));
    }

    @Override public void exchangeRows(Tensor send, RowBlocks sendBlocks, Tensor recv, RowBlocks recvBlocks) {
        timed(() -> inner.exchangeRows(send, sendBlocks, recv, recvBlocks));
    }

    @Override public CommWork exchangeRowsAsync(Tensor send, RowBlocks sendBlocks, Tensor recv, RowBlocks recvBlocks) {
        return timed(() -> inner.exchangeRowsAsync(send, sendBlocks, recv, recvBlocks));
    }


    /** The inner communicator's windows, their handshakes timed as the collectives are. */
    @Override public PeerWindow openWindow(long bytes) {
        PeerWindow w = timed(() -> inner.openWindow(bytes));
        if (w == null) return null;
        return new PeerWindow() {
            @Override public long bytes() { return w.bytes(); }
            @Override public Tensor tensor(int q, dev.moe4j.core.tensor.DType dtype, int rows, int cols) { return w.tensor(q, dtype, rows, cols); }
            @Override public void open() { timed(w::open); }
            @Override public void publish() { timed(w::publish); }
            @Override public void await() { timed(w::await); }
            @Override public void close() { w.close(); }
        };
    }

    @Override public void allGather(Tensor send, Tensor recv) { timed(() -> inner.allGather(send, recv)); }

    @Override public void reduceScatter(Tensor send, Tensor recv, ReduceOp op) { timed(() -> inner.reduceScatter(send, recv, op)); }

    @Override public void broadcast(Tensor t, int root) { timed(() -> inner.broadcast(t, root)); }

    @Override public void barrier() { timed(inner::barrier); }

    @Override public void send(Tensor t, int peer) { timed(() -> inner.send(t, peer)); }

    @Override public void recv(Tensor t, int peer) { timed(() -> inner.recv(t, peer)); }

    /** Sub-groups are not timed (wrap them too if needed). */
    @Override public Communicator split(int color, int key) { return inner.split(color, key); }

    /** Closes nothing: the wrapped communicator belongs to whoever made it. */
    @Override public void close() {}
}
