package dev.moe4j.core.comm;

import java.util.Arrays;

/**
 * A blocking collective did not complete within the communicator's timeout. Names the collective and the
 * ranks (of the world) that had not reached it, when they can be known.
 */
public class CommTimeoutException extends CommunicationException {
    private final String collective;
    private final int[] missingRanks;

    public CommTimeoutException(String message, String collective, int[] missingRanks) {
        super(message);
        this.collective = collective;
        this.missingRanks = missingRanks.clone();
    }

    /** The collective that timed out, e.g. "allToAllV #12". */
    public String collective() { return collective; }

    /** World ranks that had not reached the collective (empty when unknown). */
    public int[] missingRanks() { return missingRanks.clone(); }

    @Override
    public String toString() {
        return super.toString() + " (missing " + Arrays.toString(missingRanks) + ")";
    }
}
