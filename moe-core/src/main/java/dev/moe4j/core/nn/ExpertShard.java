package dev.moe4j.core.nn;

/**
 * Which part of an MoE layer's whole expert tensor [globalRows, ...] one rank holds under expert parallelism:
 * rows [firstRow, firstRow + rows). With epSize = 1 a rank holds all rows (the parameter is still an expert
 * parameter: its gradient is all-reduced in the expert-data-parallel group, which is then the whole world).
 *
 * @param epSize    the layer's expert-parallel degree
 * @param firstRow  the first expert (row of dimension 0) held here
 * @param rows      experts held here (numExperts / epSize)
 * @param globalRows the layer's expert count E
 */
public record ExpertShard(int epSize, int firstRow, int rows, int globalRows) {
    public ExpertShard {
        if (epSize < 1) throw new IllegalArgumentException("ExpertShard: epSize must be >= 1, got " + epSize);
        if (rows < 1 || firstRow < 0 || (long) firstRow + rows > globalRows) {
            throw new IllegalArgumentException("ExpertShard: rows [" + firstRow + ", " + ((long) firstRow + rows) + ") must lie in [0, " + globalRows + ")");
        }
    }
}
