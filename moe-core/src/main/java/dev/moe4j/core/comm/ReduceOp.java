package dev.moe4j.core.comm;

/** Element-wise reductions of {@link Communicator#allReduce} and {@link Communicator#reduceScatter}. */
public enum ReduceOp {
    /** Sum (gradients). */
    SUM,
    /** Maximum (e.g. the largest per-expert count, for a capacity agreed by all ranks). */
    MAX,
    /** Minimum. */
    MIN
}
