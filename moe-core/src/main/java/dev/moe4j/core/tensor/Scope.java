package dev.moe4j.core.tensor;

import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.Deque;
import java.util.List;

/**
 * A per-thread arena of tensors: every tensor created while a scope is open on the thread belongs to the
 * innermost scope and is closed when the scope closes, unless it was {@link #keep kept}. A training step
 * runs inside one scope, so its activations and temporaries are freed (returned to the backend's caching
 * allocator on a GPU) when the step ends.
 */
public final class Scope implements AutoCloseable {
    private static final ThreadLocal<Deque<Scope>> STACK = ThreadLocal.withInitial(ArrayDeque::new);

    private final List<Tensor> owned = new ArrayList<>();
    private boolean closed;

    private Scope() {}

    /** Opens a scope nested in the current one (if any). Use with try-with-resources. */
    public static Scope open() {
        Scope s = new Scope();
        STACK.get().push(s);
        return s;
    }

    static void register(Tensor t) {
        Scope s = STACK.get().peek();
        if (s != null) s.owned.add(t);
    }

    /**
     * Moves {@code t} out of the innermost scope into the enclosing one (or out of all scopes), so it
     * outlives the current step. Returns {@code t}.
     */
    public static Tensor keep(Tensor t) {
        Deque<Scope> stack = STACK.get();
        Scope inner = stack.peek();
        if (inner == null) return t;
        if (inner.owned.remove(t)) {
            Scope outer = null;
            var it = stack.iterator();
            it.next();
            if (it.hasNext()) outer = it.next();
            if (outer != null) outer.owned.add(t);
        }
        return t;
    }

    /**
     * Takes {@code t} out of every open scope of this thread: the caller owns it and closes it (state that lives
     * across steps, allocated during one). Returns {@code t}.
     */
    public static Tensor detach(Tensor t) {
        for (Scope s : STACK.get()) s.owned.remove(t);
        return t;
    }

    /** Number of tensors this scope will close. */
    public int size() { return owned.size(); }

    @Override
    public void close() {
        if (closed) return;
        closed = true;
        Deque<Scope> stack = STACK.get();
        if (stack.peek() != this) throw new IllegalStateException("scopes must be closed innermost first");
        stack.pop();
        for (int i = owned.size() - 1; i >= 0; i--) owned.get(i).close();
        owned.clear();
    }
}
