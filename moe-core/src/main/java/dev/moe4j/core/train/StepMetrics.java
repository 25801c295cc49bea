package dev.moe4j.core.train;

/**
 * What one optimizer step did.
 *
 * @param step           the step index (from 0)
 * @param loss           mean training cross-entropy over the step's micro-batches
 * @param auxLoss        mean of the MoE auxiliary losses (already scaled by their coefficients; 0 for dense models)
 * @param kdLoss         mean distillation term T^2 * KL (0 without a teacher or after its stop step)
 * @param gradNorm       global gradient norm before clipping (NaN/Inf when the step was skipped)
 * @param lr             learning rate used
 * @param tokens         tokens processed in this step
 * @param seconds        wall time of the step
 * @param skipped        true when the loss or gradient was not finite and the update was skipped
 */
public record StepMetrics(int step, double loss, double auxLoss, double kdLoss, double gradNorm, float lr, long tokens, double seconds, boolean skipped) {
    public double tokensPerSecond() { return seconds > 0 ? tokens / seconds : 0; }
}
