<?php

declare(strict_types=1);

/** A webhook whose signature or timestamp does not check out: answer 4xx. */
final class InvalidWebhook extends RuntimeException
{
}

/**
 * Verifies Standard Webhooks signatures with PHP's own hash functions.
 *
 * The signed content is "{webhook-id}.{webhook-timestamp}.{body}", signed with
 * HMAC-SHA256 under the key that follows "whsec_" in the secret (base64). The
 * webhook-signature header holds one or more space-separated "v1,<base64>"
 * entries (several while the sender rotates its secret); one match is enough.
 * The timestamp must be within five minutes of this machine's clock, so a
 * captured request cannot be replayed later.
 */
final class StandardWebhook
{
    public const TOLERANCE_SECONDS = 300;

    private string $key;

    public function __construct(string $secret)
    {
        if (str_starts_with($secret, 'whsec_')) {
            $secret = substr($secret, strlen('whsec_'));
        }
        $key = base64_decode($secret, true);
        if ($key === false || $key === '') {
            throw new InvalidArgumentException('the webhook secret is not whsec_<base64 key>');
        }
        $this->key = $key;
    }

    /** @throws InvalidWebhook */
    public function verify(string $id, string $timestamp, string $signatures, string $body, ?int $now = null): void
    {
        if ($id === '' || $timestamp === '' || $signatures === '') {
            throw new InvalidWebhook('missing webhook-id, webhook-timestamp or webhook-signature');
        }
        if (preg_match('/^\d{1,15}$/', trim($timestamp)) !== 1) {
            throw new InvalidWebhook('webhook-timestamp is not a number');
        }
        $seconds = (int) trim($timestamp);
        $now ??= time();
        if ($now - $seconds > self::TOLERANCE_SECONDS) {
            throw new InvalidWebhook('webhook-timestamp is too old');
        }
        if ($seconds - $now > self::TOLERANCE_SECONDS) {
            throw new InvalidWebhook('webhook-timestamp is in the future');
        }
        $expected = hash_hmac('sha256', "{$id}.{$seconds}.{$body}", $this->key, true);
        foreach (preg_split('/ +/', trim($signatures)) as $entry) {
            $parts = explode(',', $entry, 2);
            if (count($parts) !== 2 || $parts[0] !== 'v1') {
                continue; // another scheme or version: not ours to check
            }
            $given = base64_decode($parts[1], true);
            // hash_equals compares in constant time.
            if ($given !== false && hash_equals($expected, $given)) {
                return;
            }
        }
        throw new InvalidWebhook('no matching signature');
    }
}
