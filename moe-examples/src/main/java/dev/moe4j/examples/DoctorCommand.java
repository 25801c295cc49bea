package dev.moe4j.examples;

import dev.moe4j.core.backend.Backends;
import picocli.CommandLine.Command;

import java.util.concurrent.Callable;

/** Prints what this machine offers MoE4J: the JVM, the backends found and why any cannot run. */
@Command(name = "doctor", mixinStandardHelpOptions = true, description = "Print the environment: JDK, backends, GPUs.")
final class DoctorCommand implements Callable<Integer> {
    @Override
    public Integer call() {
        System.out.printf("java     %s (%s), %d processors, max heap %d MiB%n", System.getProperty("java.version"),
                System.getProperty("java.vm.name"), Runtime.getRuntime().availableProcessors(), Runtime.getRuntime().maxMemory() >> 20);
        System.out.printf("os       %s %s%n", System.getProperty("os.name"), System.getProperty("os.arch"));
        System.out.print(Backends.debugEnvironment());
        return 0;
    }
}
