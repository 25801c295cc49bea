package dev.moe4j.core.tensor;

import java.util.ArrayList;
import java.util.List;

/**
 * The tensors a layer's forward keeps for its backward. Closing releases them all at once (when the next forward
 * starts or the layer is closed), which frees memory before the step's {@link Scope} ends.
 */
public final class SavedTensors implements AutoCloseable {
    private final List<Tensor> tensors = new ArrayList<>();

    /** Keeps {@code t} until {@link #close()}; returns it. */
    public Tensor keep(Tensor t) {
        tensors.add(t);
        return t;
    }

    @Override
    public void close() {
        for (Tensor t : tensors) t.close();
        tensors.clear();
    }
}
