package dev.moe4j.comm.rendezvous;

import dev.moe4j.core.comm.CommTimeoutException;
import dev.moe4j.core.comm.CommunicationException;

import java.io.BufferedInputStream;
import java.io.BufferedOutputStream;
import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.net.SocketTimeoutException;
import java.time.Duration;
import java.util.HashMap;
import java.util.Map;

/**
 * A small key-value store over TCP for rendezvous (the NCCL unique id, progress for the watchdog): rank 0 serves
 * it, every rank (rank 0 included) is a client. Values are bytes; {@link #get} waits until the key exists, with a
 * timeout. Not a general-purpose server: no authentication, meant for a cluster's private network.
 *
 * <p>Protocol (big-endian, one request at a time per connection): op byte, key (modified UTF-8), then
 * SET: int length + bytes -> byte 0; GET: long timeout ms -> int length (-1: timed out) + bytes;
 * ADD: long delta -> long new value; CHECK: -> byte 0/1.
 */
public final class TcpStore implements AutoCloseable {
    private static final byte SET = 1, GET = 2, ADD = 3, CHECK = 4;

    private final Server server;          // non-null on the serving rank
    private final Socket socket;
    private final DataInputStream in;
    private final DataOutputStream out;
    private final String where;
    private final Duration timeout;
    private boolean closed;

    private TcpStore(Server server, Socket socket, String where, Duration timeout) throws IOException {
        this.server = server;
        this.socket = socket;
        this.in = new DataInputStream(new BufferedInputStream(socket.getInputStream()));
        this.out = new DataOutputStream(new BufferedOutputStream(socket.getOutputStream()));
        this.where = where;
        this.timeout = timeout;
    }

    /** Rank 0 serves on env.storePort(); every rank connects to env.masterAddr():env.storePort(). */
    public static TcpStore open(DistributedEnv env, Duration timeout) {
        return open(env.masterAddr(), env.storePort(), env.isStoreServer(), timeout);
    }

    /**
     * Serves (if serve) on port of all interfaces, then connects to host:port, retrying until timeout so that
     * clients may start before the server.
     */
    public static TcpStore open(String host, int port, boolean serve, Duration timeout) {
        if (timeout == null || timeout.isNegative() || timeout.isZero()) throw new IllegalArgumentException("TcpStore: timeout must be > 0");
        Server server = null;
        if (serve) {
            try {
                server = new Server(port);
            } catch (IOException e) {
                throw new CommunicationException("rendezvous store: rank 0 cannot listen on port " + port + " (" + e.getMessage()
                        + "); is another job using it? Choose another MASTER_PORT (or MOE4J_STORE_PORT)", e);
            }
        }
        int connectPort = server != null ? server.socket.getLocalPort() : port;   // port 0: the one the server got
        String where = host + ":" + connectPort;
        long deadline = System.nanoTime() + timeout.toNanos();
        IOException last = null;
        while (System.nanoTime() < deadline) {
            Socket s = new Socket();
            try {
                s.setTcpNoDelay(true);
                s.connect(new InetSocketAddress(host, connectPort), (int) Math.max(1, Math.min(2000, timeout.toMillis())));
                return new TcpStore(server, s, where, timeout);
            } catch (IOException e) {
                last = e;
                try { s.close(); } catch (IOException ignored) { }
                try {
                    Thread.sleep(50);
                } catch (InterruptedException ie) {
                    Thread.currentThread().interrupt();
                    break;
                }
            }
        }
        if (server != null) server.close();
        throw new CommTimeoutException("rendezvous store: cannot reach " + where + " within " + timeout.toMillis()
                + " ms (is MASTER_ADDR/MASTER_PORT right, and is rank 0 running?): " + last, "rendezvous", new int[] {0});
    }

    /** The port the server listens on (when this rank serves; useful with port 0 in tests). */
    public int serverPort() {
        if (server == null) throw new IllegalStateException("this rank does not serve the store");
        return server.socket.getLocalPort();
    }

    public synchronized void set(String key, byte[] value) {
        io("set " + key, () -> {
            out.writeByte(SET);
            out.writeUTF(key);
            out.writeInt(value.length);
            out.write(value);
            out.flush();
            in.readByte();
            return null;
        });
    }

    /** Waits until key exists (at most the store's timeout) and returns its value. */
    public byte[] get(String key) { return get(key, timeout); }

    public synchronized byte[] get(String key, Duration wait) {
        byte[] v = io("get " + key, () -> {
            out.writeByte(GET);
            out.writeUTF(key);
            out.writeLong(wait.toMillis());
            out.flush();
            int n = in.readInt();
            if (n < 0) return null;
            byte[] b = new byte[n];
            in.readFully(b);
            return b;
        });
        if (v == null) {
            throw new CommTimeoutException("rendezvous store " + where + ": key '" + key + "' did not appear within " + wait.toMillis() + " ms",
                    "get " + key, new int[0]);
        }
        return v;
    }

    /** Atomically adds delta to the long stored at key (0 if absent) and returns the new value. */
    public synchronized long add(String key, long delta) {
        return io("add " + key, () -> {
            out.writeByte(ADD);
            out.writeUTF(key);
            out.writeLong(delta);
            out.flush();
            return in.readLong();
        });
    }

    /** True when key exists (does not wait). */
    public synchronized boolean check(String key) {
        return io("check " + key, () -> {
            out.writeByte(CHECK);
            out.writeUTF(key);
            out.flush();
            return in.readByte() == 1;
        });
    }

    private interface Call<T> { T run() throws IOException; }

    private <T> T io(String what, Call<T> call) {
        if (closed) throw new IllegalStateException("rendezvous store " + where + " is closed");
        try {
            socket.setSoTimeout((int) Math.min(Integer.MAX_VALUE, timeout.toMillis() * 2 + 5_000));
            return call.run();
        } catch (SocketTimeoutException e) {
            throw new CommTimeoutException("rendezvous store " + where + ": no answer to " + what, what, new int[] {0});
        } catch (IOException e) {
            throw new CommunicationException("rendezvous store " + where + ": " + what + " failed (rank 0, which serves it, may have exited): " + e, e);
        }
    }

    @Override
    public synchronized void close() {
        if (closed) return;
        closed = true;
        try { socket.close(); } catch (IOException ignored) { }
        if (server != null) server.close();
    }

    /** The server: one daemon thread per connection, one monitor over the map. */
    private static final class Server {
        final ServerSocket socket;
        final Map<String, byte[]> data = new HashMap<>();
        final Thread acceptor;
        volatile boolean closed;

        Server(int port) throws IOException {
            socket = new ServerSocket();
            socket.setReuseAddress(true);
            socket.bind(new InetSocketAddress(port));
            acceptor = new Thread(this::accept, "moe4j-store-accept");
            acceptor.setDaemon(true);
            acceptor.start();
        }

        void accept() {
            while (!closed) {
                try {
                    Socket s = socket.accept();
                    s.setTcpNoDelay(true);
                    Thread t = new Thread(() -> serve(s), "moe4j-store-conn");
                    t.setDaemon(true);
                    t.start();
                } catch (IOException e) {
                    if (closed) return;
                }
            }
        }

        void serve(Socket s) {
            try (s; DataInputStream in = new DataInputStream(new BufferedInputStream(s.getInputStream()));
                 DataOutputStream out = new DataOutputStream(new BufferedOutputStream(s.getOutputStream()))) {
                while (!closed) {
                    byte op = in.readByte();
                    String key = in.readUTF();
                    switch (op) {
                        case SET -> {
                            byte[] v = new byte[in.readInt()];
                            in.readFully(v);
                            synchronized (data) {
                                data.put(key, v);
                                data.notifyAll();
                            }
                            out.writeByte(0);
                        }
                        case GET -> {
                            long deadline = System.nanoTime() + in.readLong() * 1_000_000L;
                            byte[] v;
                            synchronized (data) {
                                while ((v = data.get(key)) == null && !closed) {
                                    long left = (deadline - System.nanoTime()) / 1_000_000L;
                                    if (left <= 0) break;
                                    data.wait(left);
                                }
                            }
                            if (v == null) out.writeInt(-1);
                            else { out.writeInt(v.length); out.write(v); }
                        }
                        case ADD -> {
                            long delta = in.readLong(), now;
                            synchronized (data) {
                                byte[] old = data.get(key);
                                now = (old == null ? 0 : java.nio.ByteBuffer.wrap(old).getLong()) + delta;
                                data.put(key, java.nio.ByteBuffer.allocate(8).putLong(now).array());
                                data.notifyAll();
                            }
                            out.writeLong(now);
                        }
                        case CHECK -> {
                            boolean has;
                            synchronized (data) { has = data.containsKey(key); }
                            out.writeByte(has ? 1 : 0);
                        }
                        default -> { return; }
                    }
                    out.flush();
                }
            } catch (IOException | InterruptedException e) {
                // client went away or server closing
            }
        }

        void close() {
            closed = true;
            try { socket.close(); } catch (IOException ignored) { }
            synchronized (data) { data.notifyAll(); }
        }
    }
}
