package dev.moe4j.comm.launch;

import dev.moe4j.comm.rendezvous.DistributedEnv;
import dev.moe4j.comm.rendezvous.Rendezvous;
import dev.moe4j.comm.rendezvous.TcpStore;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;

/** A rank of a multi-process rendezvous test: rank 0 publishes a value, every rank reads it and counts in. */
public final class StoreProbe {
    public static void main(String[] args) throws Exception {
        DistributedEnv env = DistributedEnv.fromEnvironment();
        TcpStore s = Rendezvous.store(env, Duration.ofSeconds(20));
        if (env.rank() == 0) s.set("token", ("from-0-of-" + env.worldSize()).getBytes(StandardCharsets.UTF_8));
        String token = new String(s.get("token"), StandardCharsets.UTF_8);
        s.add("arrived", 1);
        // Wait until everyone has counted in (rank 0 must keep serving until then).
        long deadline = System.nanoTime() + 20_000_000_000L;
        while (s.add("arrived", 0) < env.worldSize()) {
            if (System.nanoTime() > deadline) throw new IllegalStateException("not everyone arrived");
            Thread.sleep(20);
        }
        s.add("done", 1);
        if (env.rank() == 0) while (s.add("done", 0) < env.worldSize() && System.nanoTime() < deadline) Thread.sleep(20);
        Files.writeString(Path.of(args[0], "rank" + env.rank()),
                env.rank() + " " + env.worldSize() + " " + env.localRank() + " " + env.localWorldSize() + " " + token);
    }
}
