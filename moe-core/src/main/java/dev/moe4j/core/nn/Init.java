package dev.moe4j.core.nn;

/** How a parameter is initialised. */
public record Init(Kind kind, double std) {
    public enum Kind { ZEROS, ONES, NORMAL }

    public static Init zeros() { return new Init(Kind.ZEROS, 0); }

    public static Init ones() { return new Init(Kind.ONES, 0); }

    /** Normal(0, std). */
    public static Init normal(double std) { return new Init(Kind.NORMAL, std); }
}
