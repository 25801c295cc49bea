package dev.moe4j.core.comm;

/**
 * A collective started by an asynchronous call ({@link Communicator#allReduceAsync}). {@link #await()} orders
 * what the backend queues afterwards after the collective (on a GPU: the backend's stream waits for it; the host
 * does not); until then the tensors it moves must stay alive and untouched.
 */
@FunctionalInterface
public interface CommWork {
    /** A collective that has already completed (what communicators without a side stream return). */
    CommWork DONE = () -> { };

    void await();
}
