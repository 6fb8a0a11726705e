package com.example.webhooks.spring;

import com.example.webhooks.FailFirst;
import com.example.webhooks.InvalidWebhookException;
import com.example.webhooks.WebhookInbox;
import com.example.webhooks.WebhookVerifier;
import java.io.IOException;
import java.util.Map;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.http.HttpHeaders;
import org.springframework.http.HttpStatus;
import org.springframework.http.ResponseEntity;
import org.springframework.web.bind.annotation.PostMapping;
import org.springframework.web.bind.annotation.RequestBody;
import org.springframework.web.bind.annotation.RequestHeader;
import org.springframework.web.bind.annotation.RestController;

@RestController
public class WebhookController {
    private static final Logger LOG = LoggerFactory.getLogger(WebhookController.class);

    private final WebhookVerifier verifier;
    private final WebhookInbox inbox;
    private final FailFirst failFirst;

    public WebhookController(WebhookVerifier verifier, WebhookInbox inbox, FailFirst failFirst) {
        this.verifier = verifier;
        this.inbox = inbox;
        this.failFirst = failFirst;
    }

    /**
     * The body is taken as raw bytes: the signature covers them exactly, and a parsed and
     * re-serialised object would not match it.
     */
    @PostMapping("/webhook")
    public ResponseEntity<Map<String, String>> receive(
            @RequestHeader HttpHeaders headers, @RequestBody(required = false) byte[] body) throws IOException {
        byte[] raw = body != null ? body : new byte[0];
        String id = headers.getFirst("webhook-id");
        try {
            // Checks the signature and that webhook-timestamp is within 5 minutes.
            verifier.verify(id, headers.getFirst("webhook-timestamp"), headers.getFirst("webhook-signature"), raw);
        } catch (InvalidWebhookException e) {
            LOG.warn("rejected a webhook: {}", e.getMessage());
            return ResponseEntity.badRequest().body(Map.of("error", "invalid signature"));
        }
        if (failFirst.take()) {
            return ResponseEntity.status(HttpStatus.INTERNAL_SERVER_ERROR)
                    .body(Map.of("error", "failing on purpose (RECEIVER_FAIL_FIRST)"));
        }
        // Stored before answering, processed by the inbox's thread afterwards.
        if (inbox.add(id, raw)) {
            return ResponseEntity.ok(Map.of("status", "accepted"));
        }
        LOG.info("duplicate delivery of {} acknowledged", id);
        return ResponseEntity.ok(Map.of("status", "duplicate"));
    }
}
