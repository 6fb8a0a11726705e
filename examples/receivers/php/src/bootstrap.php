<?php

declare(strict_types=1);

require_once __DIR__ . '/StandardWebhook.php';
require_once __DIR__ . '/Inbox.php';

/**
 * Settings from the environment (the same names as every example):
 * WEBHOOK_SECRET (required), RECEIVER_STATE_DIR (./state),
 * RECEIVER_OUTPUT (<state>/processed.jsonl), RECEIVER_FAIL_FIRST (0),
 * RECEIVER_PROCESS_DELAY_MS (0).
 *
 * @return array{secret: string, state_dir: string, output: string, fail_first: int, process_delay_ms: int}
 */
function receiver_settings(): array
{
    $secret = getenv('WEBHOOK_SECRET');
    if ($secret === false || $secret === '') {
        throw new RuntimeException("WEBHOOK_SECRET is required (the endpoint's whsec_... secret)");
    }
    $stateDir = getenv('RECEIVER_STATE_DIR') ?: dirname(__DIR__) . '/state';
    if (!is_dir($stateDir)) {
        mkdir($stateDir, 0777, true);
    }
    return [
        'secret' => $secret,
        'state_dir' => $stateDir,
        'output' => getenv('RECEIVER_OUTPUT') ?: $stateDir . '/processed.jsonl',
        'fail_first' => (int) (getenv('RECEIVER_FAIL_FIRST') ?: 0),
        'process_delay_ms' => (int) (getenv('RECEIVER_PROCESS_DELAY_MS') ?: 0),
    ];
}

function open_inbox(array $settings): Inbox
{
    return new Inbox($settings['state_dir'] . '/inbox.sqlite3');
}
