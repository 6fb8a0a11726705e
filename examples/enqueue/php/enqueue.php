<?php
// Enqueue a postbox webhook event in the transaction that writes the message.
//
// PHP 8 with PDO and the pdo_pgsql driver (on Debian: apt install php-cli php-pgsql).
// Run:  DATABASE_URL=postgres://... php enqueue.php
// (CALLBACK_URL overrides the receiver's URL.)
//
// The message row and its event commit together or not at all. A field that
// postbox.enqueue rejects raises SQLSTATE 22023 (invalid_parameter_value).
// PDO does not expose the error's COLUMN field, so the field is read from
// the message, which always reads "postbox: invalid <field>: <problem>".

declare(strict_types=1);

const CONVERSATION_ID = '5e7c0a4e-3c1b-4f0e-9a57-2d1f8c6b9e10'; // an existing conversation

/** postbox.enqueue refused a field: $field names it (e.g. data.status). */
final class InvalidEvent extends Exception
{
    public function __construct(public readonly string $field, public readonly string $problem, ?Throwable $previous = null)
    {
        parent::__construct("invalid $field: $problem", 0, $previous);
    }
}

/** Opens PDO from a postgres://user:password@host:port/db URL. */
function connect(string $databaseUrl): PDO
{
    $url = parse_url($databaseUrl);
    $dsn = sprintf('pgsql:host=%s;port=%d;dbname=%s', $url['host'], $url['port'] ?? 5432, ltrim($url['path'], '/'));
    return new PDO($dsn, urldecode($url['user'] ?? ''), urldecode($url['pass'] ?? ''), [
        PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION,
    ]);
}

/** Inserts the message and enqueues its event; returns [message id, event id]. */
function saveMessage(PDO $db, string $callbackUrl, string $content, string $status = 'RECEIVED'): array
{
    $now = gmdate('Y-m-d\TH:i:s\Z');
    $insert = $db->prepare('INSERT INTO example_app.messages (conversation_id, content, created_at)
                            VALUES (?, ?, ?) RETURNING id');
    $insert->execute([CONVERSATION_ID, $content, $now]);
    $messageId = $insert->fetchColumn();
    $data = [
        'id' => $messageId,
        'content' => $content,
        'content_type' => 'TEXT',
        'type' => 'USER_INPUT',
        'channel' => 'API',
        'status' => $status,
        'created_by' => 'user123',
        'updated_by' => 'user123',
        'created_at' => $now,
        'updated_at' => $now,
    ];
    try {
        $enqueue = $db->prepare('SELECT postbox.enqueue(?, ?::uuid, ?::jsonb, ?)');
        $enqueue->execute([$callbackUrl, CONVERSATION_ID, json_encode($data, JSON_THROW_ON_ERROR), CONVERSATION_ID]);
        return [$messageId, $enqueue->fetchColumn()];
    } catch (PDOException $e) {
        // errorInfo[2] starts "ERROR:  postbox: invalid data.status: must be …" and may go on with CONTEXT lines.
        if ($e->getCode() === '22023'
            && preg_match('/postbox: invalid (.+?): (.*)/', $e->errorInfo[2] ?? '', $m)) {
            throw new InvalidEvent($m[1], $m[2], $e);
        }
        throw $e;
    }
}

$callbackUrl = getenv('CALLBACK_URL') ?: 'https://customer.example.com/webhook';
try {
    $db = connect(getenv('DATABASE_URL'));
    $db->exec('CREATE SCHEMA IF NOT EXISTS example_app');
    $db->exec('CREATE TABLE IF NOT EXISTS example_app.messages (
                   id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                   conversation_id uuid NOT NULL, content text NOT NULL,
                   created_at timestamptz NOT NULL)');

    // 1. Commit: the message and its event are both written.
    $db->beginTransaction();
    [$messageId, $eventId] = saveMessage($db, $callbackUrl, 'Hello');
    $db->commit();
    echo "committed event $eventId (message $messageId)\n";

    // 2. Roll back: neither the message nor its event exists.
    $db->beginTransaction();
    [$messageId, $eventId] = saveMessage($db, $callbackUrl, 'Never sent');
    $db->rollBack();
    $check = $db->prepare('SELECT EXISTS (SELECT 1 FROM postbox.outbox WHERE id = ?)');
    $check->execute([$eventId]);
    $kept = $check->fetchColumn() ? 'true' : 'false';
    echo "rolled back event $eventId (message $messageId); in the outbox: $kept\n";

    // 3. An invalid field aborts the transaction; the error names the field.
    $db->beginTransaction();
    try {
        saveMessage($db, $callbackUrl, 'Bad status', 'DONE');
        throw new LogicException('an invalid status was accepted');
    } catch (InvalidEvent $e) {
        $db->rollBack();
        echo "rejected: {$e->getMessage()}\n";
    }
} catch (InvalidEvent $e) {
    fwrite(STDERR, $e->getMessage() . "\n");
    exit(1);
}
