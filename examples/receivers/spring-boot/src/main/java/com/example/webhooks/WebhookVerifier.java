package com.example.webhooks;

import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.security.MessageDigest;
import java.time.Duration;
import java.time.Instant;
import java.util.Base64;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

/**
 * Verifies Standard Webhooks signatures with the JDK alone.
 *
 * <p>The signed content is {@code "{webhook-id}.{webhook-timestamp}.{body}"}, signed with
 * HMAC-SHA256 under the key that follows {@code whsec_} in the secret (base64). The
 * {@code webhook-signature} header holds one or more space-separated {@code v1,<base64>}
 * entries (several while the sender rotates its secret); one match is enough. The timestamp
 * must be within five minutes of this machine's clock, so a captured request cannot be replayed
 * later.
 */
public final class WebhookVerifier {
    public static final Duration TOLERANCE = Duration.ofMinutes(5);
    private static final String PREFIX = "whsec_";

    private final byte[] key;

    public WebhookVerifier(String secret) {
        String encoded = secret.startsWith(PREFIX) ? secret.substring(PREFIX.length()) : secret;
        this.key = Base64.getDecoder().decode(encoded);
        if (key.length == 0) {
            throw new IllegalArgumentException("the webhook secret is empty");
        }
    }

    /** Checks the three Standard Webhooks headers against the raw body, at the current time. */
    public void verify(String id, String timestamp, String signatures, byte[] body)
            throws InvalidWebhookException {
        verify(id, timestamp, signatures, body, Instant.now());
    }

    public void verify(String id, String timestamp, String signatures, byte[] body, Instant now)
            throws InvalidWebhookException {
        if (isBlank(id) || isBlank(timestamp) || isBlank(signatures)) {
            throw new InvalidWebhookException("missing webhook-id, webhook-timestamp or webhook-signature");
        }
        long seconds;
        try {
            seconds = Long.parseLong(timestamp.trim());
        } catch (NumberFormatException e) {
            throw new InvalidWebhookException("webhook-timestamp is not a number");
        }
        long age = now.getEpochSecond() - seconds;
        if (age > TOLERANCE.toSeconds()) {
            throw new InvalidWebhookException("webhook-timestamp is too old");
        }
        if (-age > TOLERANCE.toSeconds()) {
            throw new InvalidWebhookException("webhook-timestamp is in the future");
        }
        byte[] expected = sign(id, seconds, body);
        for (String entry : signatures.trim().split(" +")) {
            int comma = entry.indexOf(',');
            if (comma < 0 || !entry.substring(0, comma).equals("v1")) {
                continue; // another scheme or version: not ours to check
            }
            byte[] given;
            try {
                given = Base64.getDecoder().decode(entry.substring(comma + 1));
            } catch (IllegalArgumentException e) {
                continue;
            }
            // Constant-time comparison: no timing hint about how much of a guess was right.
            if (MessageDigest.isEqual(expected, given)) {
                return;
            }
        }
        throw new InvalidWebhookException("no matching signature");
    }

    private byte[] sign(String id, long timestamp, byte[] body) {
        try {
            Mac mac = Mac.getInstance("HmacSHA256");
            mac.init(new SecretKeySpec(key, "HmacSHA256"));
            mac.update((id + "." + timestamp + ".").getBytes(StandardCharsets.UTF_8));
            mac.update(body);
            return mac.doFinal();
        } catch (GeneralSecurityException e) {
            throw new IllegalStateException("HmacSHA256 is part of every JDK", e);
        }
    }

    private static boolean isBlank(String s) {
        return s == null || s.isBlank();
    }
}
