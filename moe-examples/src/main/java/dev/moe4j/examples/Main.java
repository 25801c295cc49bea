package dev.moe4j.examples;

import picocli.CommandLine;
import picocli.CommandLine.Command;

/** The {@code moe4j} command line: {@code train} and {@code doctor}. */
@Command(name = "moe4j", mixinStandardHelpOptions = true, versionProvider = Main.Version.class,
        description = "Train Mixture-of-Experts GPT models on the JVM (CPU or NVIDIA GPU).",
        subcommands = {TrainCommand.class, DoctorCommand.class})
public final class Main implements Runnable {
    @CommandLine.Spec
    CommandLine.Model.CommandSpec spec;

    @Override
    public void run() {
        throw new CommandLine.ParameterException(spec.commandLine(), "name a command: train or doctor (try --help)");
    }

    public static void main(String[] args) {
        System.exit(commandLine().execute(args));
    }

    /** The configured command line (also used by tests). Errors print one plain line, not a stack trace. */
    public static CommandLine commandLine() {
        CommandLine cl = new CommandLine(new Main());
        cl.setExecutionExceptionHandler((ex, cmd, parsed) -> {
            cmd.getErr().println("error: " + message(ex));
            if (Boolean.getBoolean("moe4j.stacktrace")) ex.printStackTrace(cmd.getErr());
            return 1;
        });
        return cl;
    }

    private static String message(Throwable ex) {
        String m = ex.getMessage();
        return m == null ? ex.toString() : m;
    }

    static final class Version implements CommandLine.IVersionProvider {
        @Override public String[] getVersion() {
            String v = Main.class.getPackage().getImplementationVersion();
            return new String[] {"MoE4J " + (v == null ? "(development build)" : v)};
        }
    }
}
