package dev.moe4j.comm;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.comm.ReduceOp;
import dev.moe4j.core.tensor.Tensor;

/**
 * A test communicator that hands every required collective to {@code inner}; subclasses override what they watch
 * or change (split and close included). The SPI's default methods (the asynchronous forms, the block exchange) are
 * not forwarded, so a subclass that does not override them gets the SPI's defaults over inner's collectives.
 */
public abstract class ForwardingCommunicator implements Communicator {
    protected final Communicator inner;

    protected ForwardingCommunicator(Communicator inner) { this.inner = inner; }

    @Override public int rank() { return inner.rank(); }
    @Override public int size() { return inner.size(); }
    @Override public Backend backend() { return inner.backend(); }
    @Override public void allToAll(Tensor send, Tensor recv) { inner.allToAll(send, recv); }
    @Override public void allToAllV(Tensor send, int[] sr, Tensor recv, int[] rr) { inner.allToAllV(send, sr, recv, rr); }
    @Override public void allReduce(Tensor t, ReduceOp op) { inner.allReduce(t, op); }
    @Override public void allGather(Tensor send, Tensor recv) { inner.allGather(send, recv); }
    @Override public void reduceScatter(Tensor send, Tensor recv, ReduceOp op) { inner.reduceScatter(send, recv, op); }
    @Override public void broadcast(Tensor t, int root) { inner.broadcast(t, root); }
    @Override public void barrier() { inner.barrier(); }
    @Override public void send(Tensor t, int peer) { inner.send(t, peer); }
    @Override public void recv(Tensor t, int peer) { inner.recv(t, peer); }
}
