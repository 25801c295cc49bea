package dev.moe4j.core.comm;

import java.time.Duration;

/**
 * Settings shared by communicator implementations.
 *
 * @param timeout how long a blocking collective (and communicator creation) may wait for its peers before
 *                the communicator is aborted and every waiting rank fails with a {@link CommTimeoutException}
 */
public record CommOptions(Duration timeout) {
    /** The default timeout, 60 s (overridden by the environment variable {@code MOE4J_COMM_TIMEOUT_S}). */
    public static final Duration DEFAULT_TIMEOUT = Duration.ofSeconds(60);

    public CommOptions {
        if (timeout == null || timeout.isNegative() || timeout.isZero()) {
            throw new IllegalArgumentException("CommOptions: timeout must be > 0, got " + timeout);
        }
    }

    /** 60 s, or {@code MOE4J_COMM_TIMEOUT_S} seconds when that variable is set. */
    public static CommOptions defaults() {
        String s = System.getenv("MOE4J_COMM_TIMEOUT_S");
        if (s == null || s.isBlank()) return new CommOptions(DEFAULT_TIMEOUT);
        try {
            double sec = Double.parseDouble(s.trim());
            return new CommOptions(Duration.ofMillis(Math.round(sec * 1000)));
        } catch (NumberFormatException e) {
            throw new IllegalArgumentException("MOE4J_COMM_TIMEOUT_S must be a number of seconds > 0, got '" + s + "'");
        }
    }

    public static CommOptions withTimeout(Duration timeout) { return new CommOptions(timeout); }

    public long timeoutMillis() { return timeout.toMillis(); }
}
