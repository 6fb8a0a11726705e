package com.example.webhooks;

import java.nio.file.Path;
import java.time.Duration;
import java.util.Map;

/** The receiver's settings, read from the environment (the same names as every example). */
public record ReceiverSettings(
        String secret,
        String host,
        int port,
        Path stateDir,
        Path output,
        int failFirst,
        Duration processDelay) {

    public static ReceiverSettings fromEnvironment() {
        Map<String, String> env = System.getenv();
        String secret = env.get("WEBHOOK_SECRET");
        if (secret == null || secret.isBlank()) {
            throw new IllegalStateException("WEBHOOK_SECRET is required (the endpoint's whsec_... secret)");
        }
        Path stateDir = Path.of(env.getOrDefault("RECEIVER_STATE_DIR", "state"));
        String output = env.get("RECEIVER_OUTPUT");
        return new ReceiverSettings(
                secret,
                env.getOrDefault("HOST", "127.0.0.1"),
                Integer.parseInt(env.getOrDefault("PORT", "8000")),
                stateDir,
                output != null ? Path.of(output) : stateDir.resolve("processed.jsonl"),
                Integer.parseInt(env.getOrDefault("RECEIVER_FAIL_FIRST", "0")),
                Duration.ofMillis(Long.parseLong(env.getOrDefault("RECEIVER_PROCESS_DELAY_MS", "0"))));
    }
}
