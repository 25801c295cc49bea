package dev.moe4j.core.optim;

/** Linear warmup to {@code maxLr}, then cosine decay to {@code minLr} at {@code totalSteps} (steps count from 0). */
public record CosineSchedule(float maxLr, float minLr, int warmupSteps, int totalSteps) {
    public CosineSchedule {
        if (!(maxLr > 0)) throw new IllegalArgumentException("maxLr must be > 0, got " + maxLr);
        if (minLr < 0 || minLr > maxLr) throw new IllegalArgumentException("minLr must be in [0, maxLr], got " + minLr);
        if (warmupSteps < 0) throw new IllegalArgumentException("warmupSteps must be >= 0, got " + warmupSteps);
        if (totalSteps <= 0) throw new IllegalArgumentException("totalSteps must be > 0, got " + totalSteps);
    }

    public float lr(int step) {
        if (step < warmupSteps) return maxLr * (step + 1) / warmupSteps;
        if (step >= totalSteps) return minLr;
        double progress = (double) (step - warmupSteps) / Math.max(1, totalSteps - warmupSteps);
        return (float) (minLr + 0.5 * (maxLr - minLr) * (1 + Math.cos(Math.PI * progress)));
    }
}
