package com.example.webhooks.spring;

import com.example.webhooks.FailFirst;
import com.example.webhooks.JsonLinesProcessor;
import com.example.webhooks.ReceiverSettings;
import com.example.webhooks.WebhookInbox;
import com.example.webhooks.WebhookVerifier;
import java.io.IOException;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.context.annotation.Bean;

/**
 * The Spring Boot receiver. The verifier, inbox and processor are the plain classes of
 * {@code com.example.webhooks}, shared with {@code PlainJavaReceiver}; the host and port come
 * from {@code application.properties} (HOST, PORT).
 */
@SpringBootApplication
public class ReceiverApplication {
    public static void main(String[] args) {
        SpringApplication.run(ReceiverApplication.class, args);
    }

    @Bean
    ReceiverSettings receiverSettings() {
        return ReceiverSettings.fromEnvironment();
    }

    @Bean
    WebhookVerifier webhookVerifier(ReceiverSettings settings) {
        return new WebhookVerifier(settings.secret());
    }

    @Bean(destroyMethod = "close")
    WebhookInbox webhookInbox(ReceiverSettings settings) throws IOException {
        return new WebhookInbox(
                settings.stateDir(), new JsonLinesProcessor("spring-boot", settings.output(), settings.processDelay()));
    }

    @Bean
    FailFirst failFirst(ReceiverSettings settings) {
        return new FailFirst(settings.failFirst());
    }
}
