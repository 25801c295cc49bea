package dev.moe4j.comm.rendezvous;

import dev.moe4j.core.comm.CommTimeoutException;
import org.junit.jupiter.api.Test;

import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ConcurrentHashMap;

import static org.junit.jupiter.api.Assertions.*;

/** The rendezvous store on loopback. */
class TcpStoreTest {
    static final Duration T = Duration.ofSeconds(10);

    @Test
    void setGetWaitsAndAddIsAtomic() throws Exception {
        try (TcpStore server = TcpStore.open("127.0.0.1", 0, true, T)) {
            int port = server.serverPort();
            // A client that waits for a key set later by the server rank.
            CompletableFuture<String> waiter = CompletableFuture.supplyAsync(() -> {
                try (TcpStore c = TcpStore.open("127.0.0.1", port, false, T)) {
                    return new String(c.get("uid"), StandardCharsets.UTF_8);
                }
            });
            Thread.sleep(100);
            assertFalse(waiter.isDone());
            assertFalse(server.check("uid"));
            server.set("uid", "hello".getBytes(StandardCharsets.UTF_8));
            assertEquals("hello", waiter.get());
            assertTrue(server.check("uid"));

            // 4 clients x 50 increments.
            var futures = new CompletableFuture<?>[4];
            var seen = ConcurrentHashMap.<Long>newKeySet();
            for (int i = 0; i < 4; i++) {
                futures[i] = CompletableFuture.runAsync(() -> {
                    try (TcpStore c = TcpStore.open("127.0.0.1", port, false, T)) {
                        for (int k = 0; k < 50; k++) seen.add(c.add("n", 1));
                    }
                });
            }
            CompletableFuture.allOf(futures).get();
            assertEquals(200, server.add("n", 0));
            assertEquals(200, seen.size(), "every add returned a distinct value");
        }
    }

    @Test
    void getTimesOutNamingTheKey() {
        try (TcpStore s = TcpStore.open("127.0.0.1", 0, true, T)) {
            var e = assertThrows(CommTimeoutException.class, () -> s.get("never", Duration.ofMillis(200)));
            assertTrue(e.getMessage().contains("key 'never' did not appear within 200 ms"), e.getMessage());
        }
    }

    @Test
    void unreachableServerFailsWithinTheTimeout() throws Exception {
        int port;
        try (var ss = new java.net.ServerSocket(0)) { port = ss.getLocalPort(); }   // a port nobody listens on
        long t0 = System.nanoTime();
        var e = assertThrows(CommTimeoutException.class, () -> TcpStore.open("127.0.0.1", port, false, Duration.ofMillis(500)));
        long ms = (System.nanoTime() - t0) / 1_000_000;
        assertTrue(ms < 3000, "took " + ms + " ms");
        assertTrue(e.getMessage().contains("cannot reach 127.0.0.1:" + port) && e.getMessage().contains("is rank 0 running"), e.getMessage());
    }
}
