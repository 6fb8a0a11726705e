package com.example.webhooks.plain;

import com.example.webhooks.FailFirst;
import com.example.webhooks.InvalidWebhookException;
import com.example.webhooks.JsonLinesProcessor;
import com.example.webhooks.ReceiverSettings;
import com.example.webhooks.WebhookInbox;
import com.example.webhooks.WebhookVerifier;
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.io.InputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.Executors;
import java.util.logging.Logger;

/**
 * The same receiver as the Spring Boot one, on the JDK's built-in HTTP server: no dependencies.
 *
 * <pre>
 * javac -d out $(find src/main/java -name '*.java' -not -path '*spring*')
 * WEBHOOK_SECRET=whsec_... java -cp out com.example.webhooks.plain.PlainJavaReceiver
 * </pre>
 */
public final class PlainJavaReceiver {
    private static final Logger LOG = Logger.getLogger(PlainJavaReceiver.class.getName());
    private static final int MAX_BODY = 1024 * 1024;

    private final WebhookVerifier verifier;
    private final WebhookInbox inbox;
    private final FailFirst failFirst;

    PlainJavaReceiver(WebhookVerifier verifier, WebhookInbox inbox, FailFirst failFirst) {
        this.verifier = verifier;
        this.inbox = inbox;
        this.failFirst = failFirst;
    }

    public static void main(String[] args) throws IOException {
        ReceiverSettings s = ReceiverSettings.fromEnvironment();
        WebhookInbox inbox =
                new WebhookInbox(s.stateDir(), new JsonLinesProcessor("plain-java", s.output(), s.processDelay()));
        PlainJavaReceiver receiver = new PlainJavaReceiver(new WebhookVerifier(s.secret()), inbox, new FailFirst(s.failFirst()));

        HttpServer server = HttpServer.create(new InetSocketAddress(s.host(), s.port()), 64);
        server.createContext("/webhook", receiver::handle);
        server.setExecutor(Executors.newFixedThreadPool(8));
        server.start();
        LOG.info("listening on http://" + s.host() + ":" + s.port() + "/webhook");
    }

    private void handle(HttpExchange exchange) throws IOException {
        try (exchange) {
            if (!exchange.getRequestMethod().equals("POST")) {
                reply(exchange, 405, "{\"error\":\"POST only\"}");
                return;
            }
            byte[] body;
            try (InputStream in = exchange.getRequestBody()) {
                body = in.readNBytes(MAX_BODY + 1);
            }
            if (body.length > MAX_BODY) {
                reply(exchange, 413, "{\"error\":\"body too large\"}");
                return;
            }
            // Header names are case-insensitive here.
            String id = exchange.getRequestHeaders().getFirst("webhook-id");
            try {
                verifier.verify(
                        id,
                        exchange.getRequestHeaders().getFirst("webhook-timestamp"),
                        exchange.getRequestHeaders().getFirst("webhook-signature"),
                        body);
            } catch (InvalidWebhookException e) {
                LOG.warning("rejected a webhook: " + e.getMessage());
                reply(exchange, 400, "{\"error\":\"invalid signature\"}");
                return;
            }
            if (failFirst.take()) {
                reply(exchange, 500, "{\"error\":\"failing on purpose (RECEIVER_FAIL_FIRST)\"}");
                return;
            }
            if (inbox.add(id, body)) {
                reply(exchange, 200, "{\"status\":\"accepted\"}");
            } else {
                LOG.info("duplicate delivery of " + id + " acknowledged");
                reply(exchange, 200, "{\"status\":\"duplicate\"}");
            }
        }
    }

    private static void reply(HttpExchange exchange, int status, String json) throws IOException {
        byte[] bytes = json.getBytes(StandardCharsets.UTF_8);
        exchange.getResponseHeaders().set("Content-Type", "application/json");
        exchange.sendResponseHeaders(status, bytes.length);
        exchange.getResponseBody().write(bytes);
    }
}
