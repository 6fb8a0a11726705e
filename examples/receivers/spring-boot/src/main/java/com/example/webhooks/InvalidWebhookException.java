package com.example.webhooks;

/** A webhook whose signature or timestamp does not check out: answer 4xx. */
public class InvalidWebhookException extends Exception {
    private static final long serialVersionUID = 1L;

    public InvalidWebhookException(String message) {
        super(message);
    }
}
