package dev.moe4j.comm.launch;

import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.net.ServerSocket;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;

/**
 * Starts one process per GPU with the torchrun variables set, for machines without torchrun, srun or mpirun:
 * <pre>
 *   java -cp moe-comm.jar dev.moe4j.comm.launch.Launcher --nproc-per-node 2 [--nnodes 1 --node-rank 0]
 *        [--master-addr 127.0.0.1] [--master-port 29500] -- java -cp ... my.Main args...
 * </pre>
 * Each process gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR and MASTER_PORT (a free
 * port when there is one node and none is given); its output lines are prefixed with "[rank]". When a process
 * exits with a non-zero code the others are stopped (SIGTERM, then killed after a grace period) and the launcher
 * exits with that code, so a failed rank never leaves the others hanging.
 */
public final class Launcher {
    private Launcher() {}

    public static void main(String[] args) {
        int code;
        try {
            code = run(args, System.out);
        } catch (IllegalArgumentException e) {
            System.err.println("launcher: " + e.getMessage());
            System.err.println(usage());
            code = 2;
        }
        System.exit(code);
    }

    static String usage() {
        return "usage: Launcher --nproc-per-node N [--nnodes M] [--node-rank K] [--master-addr HOST] [--master-port PORT]"
                + " [--grace-s S] -- COMMAND [ARGS...]";
    }

    /** Parsed options. */
    record Options(int nprocPerNode, int nnodes, int nodeRank, String masterAddr, int masterPort, long graceMs, List<String> command) {}

    static Options parse(String[] args) {
        int nproc = -1, nnodes = 1, nodeRank = 0, port = -1;
        long graceMs = 5_000;
        String addr = "127.0.0.1";
        List<String> cmd = new ArrayList<>();
        for (int i = 0; i < args.length; i++) {
            String a = args[i];
            if (a.equals("--")) {
                cmd.addAll(Arrays.asList(args).subList(i + 1, args.length));
                break;
            }
            String v = a.contains("=") ? a.substring(a.indexOf('=') + 1) : (i + 1 < args.length ? args[++i] : null);
            String k = a.contains("=") ? a.substring(0, a.indexOf('=')) : a;
            if (v == null) throw new IllegalArgumentException(k + " needs a value");
            switch (k.replace('_', '-')) {
                case "--nproc-per-node" -> nproc = integer(k, v);
                case "--nnodes" -> nnodes = integer(k, v);
                case "--node-rank" -> nodeRank = integer(k, v);
                case "--master-addr" -> addr = v;
                case "--master-port" -> port = integer(k, v);
                case "--grace-s" -> graceMs = Math.round(Double.parseDouble(v) * 1000);
                default -> throw new IllegalArgumentException("unknown option " + k);
            }
        }
        if (nproc < 1) throw new IllegalArgumentException("--nproc-per-node must be >= 1" + (nproc == -1 ? " (it is required)" : ", got " + nproc));
        if (nnodes < 1) throw new IllegalArgumentException("--nnodes must be >= 1, got " + nnodes);
        if (nodeRank < 0 || nodeRank >= nnodes) throw new IllegalArgumentException("--node-rank must be in [0, " + nnodes + "), got " + nodeRank);
        if (port != -1 && (port < 1 || port > 65535)) throw new IllegalArgumentException("--master-port must be in [1, 65535], got " + port);
        if (nnodes > 1 && port == -1) port = 29500;
        if (cmd.isEmpty()) throw new IllegalArgumentException("no command given after --");
        return new Options(nproc, nnodes, nodeRank, addr, port, graceMs, cmd);
    }

    private static int integer(String k, String v) {
        try {
            return Integer.parseInt(v.trim());
        } catch (NumberFormatException e) {
            throw new IllegalArgumentException(k + " must be an integer, got '" + v + "'");
        }
    }

    /** Starts the processes, waits, returns the exit code (0 when all succeeded, else the first failure's). */
    public static int run(String[] args, PrintStream out) {
        Options o = parse(args);
        int port = o.masterPort() == -1 ? freePort() : o.masterPort();
        int world = o.nprocPerNode() * o.nnodes();
        List<Process> procs = new ArrayList<>();
        List<Thread> pumps = new ArrayList<>();
        try {
            for (int local = 0; local < o.nprocPerNode(); local++) {
                int rank = o.nodeRank() * o.nprocPerNode() + local;
                ProcessBuilder pb = new ProcessBuilder(o.command()).redirectErrorStream(true);
                Map<String, String> env = pb.environment();
                env.put("RANK", Integer.toString(rank));
                env.put("WORLD_SIZE", Integer.toString(world));
                env.put("LOCAL_RANK", Integer.toString(local));
                env.put("LOCAL_WORLD_SIZE", Integer.toString(o.nprocPerNode()));
                env.put("NODE_RANK", Integer.toString(o.nodeRank()));
                env.put("GROUP_RANK", Integer.toString(o.nodeRank()));
                env.put("MASTER_ADDR", o.masterAddr());
                env.put("MASTER_PORT", Integer.toString(port));
                env.remove("TORCHELASTIC_USE_AGENT_STORE");   // no agent holds MASTER_PORT here
                Process p;
                try {
                    p = pb.start();
                } catch (IOException e) {
                    throw new IllegalArgumentException("cannot start " + o.command() + ": " + e.getMessage());
                }
                procs.add(p);
                Thread t = new Thread(() -> pump(p, rank, out), "launcher-out-" + rank);
                t.setDaemon(true);
                t.start();
                pumps.add(t);
            }
            int code = waitAll(procs, o.graceMs(), out);
            for (Thread t : pumps) {
                try { t.join(2_000); } catch (InterruptedException e) { Thread.currentThread().interrupt(); }
            }
            return code;
        } finally {
            for (Process p : procs) if (p.isAlive()) p.destroyForcibly();
        }
    }

    private static int waitAll(List<Process> procs, long graceMs, PrintStream out) {
        while (true) {
            boolean allDone = true;
            for (int i = 0; i < procs.size(); i++) {
                Process p = procs.get(i);
                if (p.isAlive()) { allDone = false; continue; }
                int code = p.exitValue();
                if (code != 0) {
                    out.println("launcher: local rank " + i + " exited with code " + code + "; stopping the others");
                    stopAll(procs, graceMs);
                    return code;
                }
            }
            if (allDone) return 0;
            try {
                Thread.sleep(50);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                stopAll(procs, graceMs);
                return 130;
            }
        }
    }

    private static void stopAll(List<Process> procs, long graceMs) {
        for (Process p : procs) if (p.isAlive()) p.destroy();
        long deadline = System.nanoTime() + graceMs * 1_000_000L;
        for (Process p : procs) {
            try {
                long left = Math.max(0, deadline - System.nanoTime());
                if (!p.waitFor(left, TimeUnit.NANOSECONDS)) p.destroyForcibly();
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                p.destroyForcibly();
            }
        }
    }

    private static void pump(Process p, int rank, PrintStream out) {
        try (BufferedReader r = new BufferedReader(new InputStreamReader(p.getInputStream(), StandardCharsets.UTF_8))) {
            String line;
            while ((line = r.readLine()) != null) {
                synchronized (out) { out.println("[" + rank + "] " + line); }
            }
        } catch (IOException ignored) {
            // the process went away
        }
    }

    private static int freePort() {
        try (ServerSocket s = new ServerSocket(0)) {
            return s.getLocalPort();
        } catch (IOException e) {
            return 29500;
        }
    }
}
