<?php

/*
 * A plain-PHP receiver for postbox webhooks: the web entry point.
 *
 * It verifies the Standard Webhooks signature (src/StandardWebhook.php),
 * stores each new event in a SQLite inbox keyed by webhook-id (a retry or
 * replay of the same event is acknowledged and ignored) and answers 200 at
 * once. worker.php processes the inbox afterwards, in its own process.
 *
 *   WEBHOOK_SECRET=whsec_... php -S 127.0.0.1:8000 public/index.php
 *   WEBHOOK_SECRET=whsec_... php worker.php
 *
 * Behind nginx or Apache with PHP-FPM, make public/ the document root and
 * route POST /webhook to this file.
 */

declare(strict_types=1);

require_once dirname(__DIR__) . '/src/bootstrap.php';

function respond(int $status, array $json): void
{
    http_response_code($status);
    header('Content-Type: application/json');
    echo json_encode($json), "\n";
}

if (parse_url($_SERVER['REQUEST_URI'] ?? '/', PHP_URL_PATH) !== '/webhook') {
    respond(404, ['error' => 'not found']);
    return;
}
if (($_SERVER['REQUEST_METHOD'] ?? '') !== 'POST') {
    header('Allow: POST');
    respond(405, ['error' => 'POST only']);
    return;
}

$settings = receiver_settings();
$body = file_get_contents('php://input'); // the raw bytes: the signature covers them exactly
$id = $_SERVER['HTTP_WEBHOOK_ID'] ?? '';

try {
    // Checks the signature and that webhook-timestamp is within 5 minutes.
    (new StandardWebhook($settings['secret']))->verify(
        $id,
        $_SERVER['HTTP_WEBHOOK_TIMESTAMP'] ?? '',
        $_SERVER['HTTP_WEBHOOK_SIGNATURE'] ?? '',
        $body
    );
} catch (InvalidWebhook $e) {
    error_log('rejected a webhook: ' . $e->getMessage());
    respond(400, ['error' => 'invalid signature']);
    return;
}

$inbox = open_inbox($settings);
if ($inbox->takeFailure($settings['fail_first'])) {
    respond(500, ['error' => 'failing on purpose (RECEIVER_FAIL_FIRST)']);
    return;
}

if ($inbox->add($id, $body)) {
    respond(200, ['status' => 'accepted']);
} else {
    error_log("duplicate delivery of {$id} acknowledged");
    respond(200, ['status' => 'duplicate']);
}
