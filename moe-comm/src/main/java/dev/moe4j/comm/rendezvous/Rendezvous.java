package dev.moe4j.comm.rendezvous;

import java.time.Duration;

/** The process-wide rendezvous store of a multi-process job (opened once, on first use; rank 0 serves it). */
public final class Rendezvous {
    private static TcpStore store;
    private static DistributedEnv storeEnv;

    private Rendezvous() {}

    /** The store at env.masterAddr():env.storePort(), opened on first call and kept for the life of the process. */
    public static synchronized TcpStore store(DistributedEnv env, Duration timeout) {
        if (store != null) {
            if (!storeEnv.masterAddr().equals(env.masterAddr()) || storeEnv.storePort() != env.storePort()) {
                throw new IllegalStateException("the rendezvous store is already open at " + storeEnv.masterAddr() + ":" + storeEnv.storePort()
                        + ", not " + env.masterAddr() + ":" + env.storePort());
            }
            return store;
        }
        store = TcpStore.open(env, timeout);
        storeEnv = env;
        return store;
    }
}
