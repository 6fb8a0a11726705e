package com.example.webhooks;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.time.Duration;
import java.util.logging.Logger;

/**
 * The application's work, here: append one JSON line per processed event to a file.
 *
 * <p>The line embeds the verified body as it came (postbox sends compact JSON; a raw line break
 * can only be white space between JSON tokens, so it is replaced by a space to keep one event per
 * line). A real application would parse it with its JSON library.
 */
public final class JsonLinesProcessor implements WebhookInbox.Handler {
    private static final Logger LOG = Logger.getLogger(JsonLinesProcessor.class.getName());

    private final String receiver;
    private final Path output;
    private final Duration delay;

    public JsonLinesProcessor(String receiver, Path output, Duration delay) {
        this.receiver = receiver;
        this.output = output;
        this.delay = delay;
    }

    @Override
    public void handle(String webhookId, byte[] body) throws IOException, InterruptedException {
        if (!delay.isZero()) {
            Thread.sleep(delay.toMillis()); // stands in for slow work
        }
        String payload = new String(body, StandardCharsets.UTF_8).replace('\r', ' ').replace('\n', ' ');
        String line =
                "{\"receiver\":" + quote(receiver) + ",\"webhook_id\":" + quote(webhookId) + ",\"payload\":" + payload + "}\n";
        Files.writeString(output, line, StandardCharsets.UTF_8, StandardOpenOption.CREATE, StandardOpenOption.APPEND);
        LOG.info("processed " + webhookId);
    }

    /** A JSON string literal. */
    static String quote(String s) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                default -> {
                    if (c < 0x20) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
                }
            }
        }
        return out.append('"').toString();
    }
}
