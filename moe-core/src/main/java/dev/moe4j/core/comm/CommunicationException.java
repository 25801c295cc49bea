package dev.moe4j.core.comm;

/**
 * A collective failed: a peer failed or disappeared, the library reported an error, or the communicator was
 * aborted. The communicator that threw it is unusable afterwards (like an aborted NCCL communicator).
 */
public class CommunicationException extends RuntimeException {
    public CommunicationException(String message) { super(message); }

    public CommunicationException(String message, Throwable cause) { super(message, cause); }
}
