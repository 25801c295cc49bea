package dev.moe4j.core.backend;

import java.util.ArrayList;
import java.util.Comparator;
import java.util.List;
import java.util.Locale;
import java.util.ServiceLoader;

/**
 * Finds backends with {@link ServiceLoader}. {@code -Dmoe4j.backend=cpu|cuda} (or the MOE4J_BACKEND
 * environment variable) overrides the choice; otherwise the highest-ranked available one is used.
 */
public final class Backends {
    public static final String PROPERTY = "moe4j.backend";

    private Backends() {}

    public static List<BackendProvider> providers() {
        List<BackendProvider> list = new ArrayList<>();
        ServiceLoader.load(BackendProvider.class).forEach(list::add);
        list.sort(Comparator.comparingInt(BackendProvider::rank).reversed());
        return list;
    }

    /** The provider named by the property / environment, or the best available one. */
    public static BackendProvider select(String requested) {
        String name = requested;
        if (name == null || name.isBlank()) name = System.getProperty(PROPERTY);
        if (name == null || name.isBlank()) name = System.getenv("MOE4J_BACKEND");
        List<BackendProvider> all = providers();
        if (name != null && !name.isBlank() && !name.equalsIgnoreCase("auto")) {
            String want = name.toLowerCase(Locale.ROOT);
            for (BackendProvider p : all) {
                if (p.name().equals(want)) {
                    String why = p.unavailableReason();
                    if (why != null) throw new IllegalStateException("backend '" + want + "' cannot run here: " + why);
                    return p;
                }
            }
            throw new IllegalArgumentException("unknown backend '" + name + "'; found: " + names(all)
                    + (want.equals("cuda") ? " (add the dev.moe4j:moe-cuda dependency)" : ""));
        }
        for (BackendProvider p : all) if (p.unavailableReason() == null) return p;
        throw new IllegalStateException("no backend can run here; " + debugEnvironment());
    }

    /** Creates the selected backend on device 0. */
    public static Backend create(String requested) {
        return select(requested).create(0);
    }

    /** One line per provider: name, rank and whether it can run, with the reason when not. */
    public static String debugEnvironment() {
        StringBuilder sb = new StringBuilder();
        for (BackendProvider p : providers()) {
            String why;
            try {
                why = p.unavailableReason();
            } catch (RuntimeException | LinkageError e) {
                why = "failed to probe: " + e;
            }
            sb.append(String.format("%-6s rank %3d  %s%n", p.name(), p.rank(), why == null ? "available" : "unavailable: " + why));
        }
        return sb.toString();
    }

    private static String names(List<BackendProvider> all) {
        return all.stream().map(BackendProvider::name).toList().toString();
    }
}
