<?php

declare(strict_types=1);

/**
 * Received events, one row per webhook-id, in a SQLite file.
 *
 * The primary key is the deduplication: a retry or replay of the same event
 * (postbox sends the same webhook-id every time) finds its row and is not
 * stored again. `processed_at` stays NULL until worker.php has handled the
 * event, so acknowledged events survive a restart of either process.
 */
final class Inbox
{
    private PDO $db;

    public function __construct(string $path)
    {
        $this->db = new PDO('sqlite:' . $path, null, null, [
            PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION,
            PDO::ATTR_TIMEOUT => 30,
        ]);
        $this->db->exec('PRAGMA journal_mode=WAL');
        $this->db->exec('CREATE TABLE IF NOT EXISTS inbox (
            webhook_id TEXT PRIMARY KEY,
            body TEXT NOT NULL,
            received_at REAL NOT NULL,
            processed_at REAL)');
        $this->db->exec('CREATE TABLE IF NOT EXISTS failures_given (at REAL NOT NULL)');
    }

    /** Stores the event; false if this webhook-id was already received. */
    public function add(string $webhookId, string $body): bool
    {
        $insert = $this->db->prepare(
            'INSERT OR IGNORE INTO inbox (webhook_id, body, received_at) VALUES (?, ?, ?)'
        );
        $insert->execute([$webhookId, $body, microtime(true)]);
        return $insert->rowCount() === 1;
    }

    /** The oldest unprocessed event, or null. @return array{webhook_id: string, body: string}|null */
    public function next(): ?array
    {
        $row = $this->db->query(
            'SELECT webhook_id, body FROM inbox WHERE processed_at IS NULL ORDER BY rowid LIMIT 1'
        )->fetch(PDO::FETCH_ASSOC);
        return $row === false ? null : $row;
    }

    public function markProcessed(string $webhookId): void
    {
        $this->db->prepare('UPDATE inbox SET processed_at = ? WHERE webhook_id = ?')
            ->execute([microtime(true), $webhookId]);
    }

    /**
     * Test aid: true for the first $limit calls. PHP keeps nothing between
     * requests, so the count is kept in the SQLite file as well.
     */
    public function takeFailure(int $limit): bool
    {
        if ($limit <= 0) {
            return false;
        }
        $this->db->exec('BEGIN IMMEDIATE');
        try {
            $given = (int) $this->db->query('SELECT count(*) FROM failures_given')->fetchColumn();
            if ($given < $limit) {
                $this->db->prepare('INSERT INTO failures_given (at) VALUES (?)')->execute([microtime(true)]);
            }
            $this->db->exec('COMMIT');
        } catch (Throwable $e) {
            $this->db->exec('ROLLBACK');
            throw $e;
        }
        return $given < $limit;
    }
}
