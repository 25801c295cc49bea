package dev.moe4j.comm.ep;

import dev.moe4j.comm.InProcessWorld;
import dev.moe4j.core.backend.Backend;
import dev.moe4j.core.comm.ProcessGroups;
import dev.moe4j.core.nn.Init;
import dev.moe4j.core.nn.ModelContext;
import dev.moe4j.core.nn.Parameter;
import dev.moe4j.core.tensor.DType;
import dev.moe4j.core.train.GradientSync;
import org.junit.jupiter.api.Test;

import java.util.List;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;

class GradientSyncTest {
    /**
     * A gradient that one rank wrote this step and another did not (the layer got no work there) is all-reduced
     * with the other rank's part as zero, not as the stale values left from before zeroGrad (NaN here).
     */
    @Test
    void aGradientOneRankDidNotWriteIsReducedAsZeroThere() {
        List<double[]> got = InProcessWorld.run(2, comm -> {
            try (ProcessGroups groups = new ProcessGroups(comm)) {
                ModelContext ctx = new ModelContext(comm.backend(), DType.F64, 1);
                Parameter w = ctx.params().add("h.0.w", Init.zeros(), true, 2);
                ctx.allocateParameters();
                GradientSync sync = new GradientSync(ctx.params(), groups);
                Backend b = comm.backend();
                b.fill(ctx.params().grad(), Double.NaN);
                ctx.params().zeroGrad();
                if (comm.rank() == 0) b.sumRows(b.fromDoubles(DType.F64, new double[] {1, 2, 3, 4}, 2, 2), w.grad(), w.gradBeta());
                sync.blockDone(0);
                sync.allReduceGradients();
                return w.grad().toDoubles();
            }
        });
        for (double[] g : got) assertArrayEquals(new double[] {4, 6}, g, 0.0);
    }
}
