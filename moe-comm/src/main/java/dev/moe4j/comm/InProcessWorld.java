package dev.moe4j.comm;

import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.comm.CommOptions;
import dev.moe4j.core.comm.CommunicationException;
import dev.moe4j.core.comm.Communicator;
import dev.moe4j.core.cpu.CpuBackend;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.function.IntFunction;

/**
 * Runs a function on N in-process ranks (one thread and one backend each) and returns their results in rank
 * order. The first rank to fail aborts the world, so the others fail fast instead of waiting for it; the failure
 * is rethrown as a {@link CommunicationException} naming the rank, with that rank's exception as the cause and
 * the other ranks' exceptions suppressed.
 */
public final class InProcessWorld {
    private InProcessWorld() {}

    /** The body a rank runs. */
    @FunctionalInterface
    public interface RankBody<T> {
        T run(Communicator comm) throws Exception;
    }

    /** N ranks on CPU backends with the default options. */
    public static <T> List<T> run(int size, RankBody<T> body) {
        return run(size, CommOptions.defaults(), r -> new CpuBackend(), body);
    }

    /** N ranks on CPU backends. */
    public static <T> List<T> run(int size, CommOptions opts, RankBody<T> body) {
        return run(size, opts, r -> new CpuBackend(), body);
    }

    /**
     * N ranks; backends.apply(rank) makes each rank's backend (called on that rank's thread, closed when the rank
     * ends).
     */
    public static <T> List<T> run(int size, CommOptions opts, IntFunction<Backend> backends, RankBody<T> body) {
        if (size < 1) throw new IllegalArgumentException("InProcessWorld.run: size must be >= 1, got " + size);
        if (body == null) throw new IllegalArgumentException("InProcessWorld.run: body is null");
        CommOptions o = opts == null ? CommOptions.defaults() : opts;
        Object[] results = new Object[size];
        Throwable[] errors = new Throwable[size];
        AtomicInteger first = new AtomicInteger(-1);
        // Backends are made on the rank threads; the world is wired once all exist.
        Backend[] made = new Backend[size];
        java.util.concurrent.CountDownLatch ready = new java.util.concurrent.CountDownLatch(size);
        java.util.concurrent.atomic.AtomicReference<List<InProcessCommunicator>> comms = new java.util.concurrent.atomic.AtomicReference<>();
        Object wire = new Object();
        Thread[] threads = new Thread[size];
        for (int r = 0; r < size; r++) {
            final int rank = r;
            threads[r] = new Thread(() -> {
                Backend b = null;
                try {
                    b = backends.apply(rank);
                    made[rank] = b;
                    ready.countDown();
                    ready.await();
                    synchronized (wire) {
                        if (comms.get() == null) comms.set(InProcessCommunicator.createWorld(Arrays.asList(made), o));
                    }
                    try (InProcessCommunicator c = comms.get().get(rank)) {
                        results[rank] = body.run(c);
                    }
                } catch (Throwable t) {
                    errors[rank] = t;
                    first.compareAndSet(-1, rank);
                    while (ready.getCount() > 0) ready.countDown();     // a rank that failed before wiring
                    synchronized (wire) {
                        if (comms.get() != null) comms.get().get(0).abortWorld("rank " + rank + " failed: " + t);
                    }
                } finally {
                    if (b != null) b.close();
                }
            }, "moe4j-rank-" + r);
            threads[r].setDaemon(true);
            threads[r].start();
        }
        // Wait for all; once one failed, give the others the timeout (plus a grace) to notice, then interrupt.
        long graceMs = o.timeoutMillis();
        long failedAt = -1;
        for (int r = 0; r < size; r++) {
            while (threads[r].isAlive()) {
                if (first.get() >= 0 && failedAt < 0) failedAt = System.nanoTime();
                if (failedAt >= 0 && (System.nanoTime() - failedAt) / 1_000_000 > graceMs) break;
                try {
                    threads[r].join(20);
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                    for (Thread t : threads) t.interrupt();
                    throw new CommunicationException("InProcessWorld.run interrupted");
                }
            }
        }
        List<Integer> hung = new ArrayList<>();
        for (int r = 0; r < size; r++) {
            if (threads[r].isAlive()) {
                hung.add(r);
                threads[r].interrupt();
            }
        }
        int f = first.get();
        if (f >= 0) {
            CommunicationException e = new CommunicationException("rank " + f + " of " + size + " failed first: " + errors[f]
                    + (hung.isEmpty() ? "" : "; rank(s) " + hung + " still running and interrupted"), errors[f]);
            for (int r = 0; r < size; r++) if (r != f && errors[r] != null) e.addSuppressed(errors[r]);
            throw e;
        }
        @SuppressWarnings("unchecked")
        List<T> out = (List<T>) Arrays.asList(results);
        return out;
    }

    /** The exceptions of every failed rank of a {@link #run} failure: the cause and the suppressed ones. */
    public static List<Throwable> rankFailures(CommunicationException e) {
        List<Throwable> all = new ArrayList<>();
        if (e.getCause() != null) all.add(e.getCause());
        all.addAll(Arrays.asList(e.getSuppressed()));
        return all;
    }
}
