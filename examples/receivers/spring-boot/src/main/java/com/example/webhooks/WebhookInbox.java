package com.example.webhooks;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.OpenOption;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.nio.file.attribute.FileTime;
import java.util.HashSet;
import java.util.HexFormat;
import java.util.List;
import java.util.Set;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.TimeUnit;
import java.util.logging.Level;
import java.util.logging.Logger;
import java.util.stream.Stream;

/**
 * Received webhooks, deduplicated on webhook-id and processed after the answer.
 *
 * <p>A small persistent store in a directory, with no database:
 *
 * <ul>
 *   <li>{@code seen-ids.log}: every webhook-id ever accepted, one per line, loaded at start. A
 *       retry or replay of an event (postbox sends the same webhook-id every time) is found here
 *       and not stored again.
 *   <li>{@code pending/<hex id>.json}: accepted events not processed yet. They survive a restart
 *       and are processed then.
 * </ul>
 *
 * <p>One background thread processes the events in the order they arrived. One process owns the
 * directory; with several instances, keep the ids in a shared database under a unique key
 * instead.
 */
public final class WebhookInbox implements AutoCloseable {
    /** The application's work for one event. */
    @FunctionalInterface
    public interface Handler {
        void handle(String webhookId, byte[] body) throws Exception;
    }

    private static final Logger LOG = Logger.getLogger(WebhookInbox.class.getName());

    private final Path pendingDir;
    private final Path seenLog;
    private final Handler handler;
    private final Set<String> seen = new HashSet<>();
    private final ScheduledExecutorService processor =
            Executors.newSingleThreadScheduledExecutor(
                    r -> {
                        Thread t = new Thread(r, "webhook-inbox");
                        t.setDaemon(true);
                        return t;
                    });

    public WebhookInbox(Path dir, Handler handler) throws IOException {
        this.pendingDir = dir.resolve("pending");
        this.seenLog = dir.resolve("seen-ids.log");
        this.handler = handler;
        Files.createDirectories(pendingDir);
        if (Files.exists(seenLog)) {
            for (String id : Files.readAllLines(seenLog, StandardCharsets.UTF_8)) {
                if (!id.isEmpty()) {
                    seen.add(id);
                }
            }
        }
        // Events acknowledged before a restart but not processed yet, oldest first.
        List<Path> pending;
        try (Stream<Path> files = Files.list(pendingDir)) {
            pending =
                    files.filter(f -> f.getFileName().toString().endsWith(".json"))
                            .sorted((a, b) -> modified(a).compareTo(modified(b)))
                            .toList();
        }
        for (Path file : pending) {
            String name = file.getFileName().toString();
            String id = new String(HexFormat.of().parseHex(name.substring(0, name.length() - 5)), StandardCharsets.UTF_8);
            seen.add(id);
            processor.execute(() -> process(id));
        }
    }

    /** Stores the event for processing; false if this webhook-id was already received. */
    public synchronized boolean add(String webhookId, byte[] body) throws IOException {
        if (seen.contains(webhookId)) {
            return false;
        }
        writeDurably(fileOf(webhookId), body, StandardOpenOption.TRUNCATE_EXISTING);
        writeDurably(seenLog, (webhookId + "\n").getBytes(StandardCharsets.UTF_8), StandardOpenOption.APPEND);
        seen.add(webhookId);
        processor.execute(() -> process(webhookId));
        return true;
    }

    private void process(String webhookId) {
        Path file = fileOf(webhookId);
        try {
            handler.handle(webhookId, Files.readAllBytes(file));
            Files.delete(file);
        } catch (Exception e) {
            LOG.log(Level.WARNING, "processing " + webhookId + " failed; trying again shortly", e);
            processor.schedule(() -> process(webhookId), 2, TimeUnit.SECONDS);
        }
    }

    private Path fileOf(String webhookId) {
        // Hex keeps any webhook-id a safe file name.
        return pendingDir.resolve(HexFormat.of().formatHex(webhookId.getBytes(StandardCharsets.UTF_8)) + ".json");
    }

    private static void writeDurably(Path file, byte[] data, OpenOption mode) throws IOException {
        try (FileChannel ch = FileChannel.open(file, StandardOpenOption.CREATE, StandardOpenOption.WRITE, mode)) {
            ByteBuffer buf = ByteBuffer.wrap(data);
            while (buf.hasRemaining()) {
                ch.write(buf);
            }
            ch.force(true);
        }
    }

    private static FileTime modified(Path file) {
        try {
            return Files.getLastModifiedTime(file);
        } catch (IOException e) {
            return FileTime.fromMillis(0);
        }
    }

    @Override
    public void close() {
        processor.shutdown();
    }
}
