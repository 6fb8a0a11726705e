<?php

/*
 * The background processor of the plain-PHP receiver: handles the events
 * that public/index.php stored and acknowledged, oldest first. Run one, next
 * to the web server (systemd, supervisord...):
 *
 *   WEBHOOK_SECRET=whsec_... php worker.php
 */

declare(strict_types=1);

require_once __DIR__ . '/src/bootstrap.php';

/** The application's work. Here: append one JSON line per event. */
function process_event(array $settings, string $webhookId, object $payload): void
{
    if ($settings['process_delay_ms'] > 0) {
        usleep($settings['process_delay_ms'] * 1000); // stands in for slow work
    }
    $record = ['receiver' => 'php', 'webhook_id' => $webhookId, 'payload' => $payload];
    $line = json_encode($record, JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE) . "\n";
    file_put_contents($settings['output'], $line, FILE_APPEND | LOCK_EX);
    fwrite(STDERR, "processed {$webhookId} (message {$payload->data->id})\n");
}

$settings = receiver_settings();
$inbox = open_inbox($settings);
fwrite(STDERR, "processing webhooks stored in {$settings['state_dir']}\n");

while (true) {
    $event = $inbox->next();
    if ($event === null) {
        usleep(200_000);
        continue;
    }
    try {
        // Objects, not arrays, so that an empty {} stays an object.
        $payload = json_decode($event['body'], false, 512, JSON_THROW_ON_ERROR);
        process_event($settings, $event['webhook_id'], $payload);
    } catch (Throwable $e) {
        fwrite(STDERR, "processing {$event['webhook_id']} failed; trying again shortly: {$e->getMessage()}\n");
        sleep(2);
        continue;
    }
    $inbox->markProcessed($event['webhook_id']);
}
