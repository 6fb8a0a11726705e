// Enqueue a postbox webhook event in the transaction that writes the message.
//
// Node with pg:  npm install
// Run:  DATABASE_URL=postgres://... node enqueue.js
// (CALLBACK_URL overrides the receiver's URL.)
//
// The message row and its event commit together or not at all. A field that
// postbox.enqueue rejects raises SQLSTATE 22023 (invalid_parameter_value)
// with the field's name in the error's `column`.
'use strict';

const { Client } = require('pg');

const CALLBACK_URL = process.env.CALLBACK_URL || 'https://customer.example.com/webhook';
const CONVERSATION_ID = '5e7c0a4e-3c1b-4f0e-9a57-2d1f8c6b9e10'; // an existing conversation

class InvalidEvent extends Error {
  constructor(field, problem) {
    super(`invalid ${field}: ${problem}`);
    this.field = field;
    this.problem = problem;
  }
}

// Inserts the message and enqueues its event; returns { messageId, eventId }.
async function saveMessage(client, content, status = 'RECEIVED') {
  const now = new Date().toISOString();
  const { rows: [message] } = await client.query(
    `INSERT INTO example_app.messages (conversation_id, content, created_at)
     VALUES ($1, $2, $3) RETURNING id`,
    [CONVERSATION_ID, content, now],
  );
  const data = {
    id: message.id,
    content,
    content_type: 'TEXT',
    type: 'USER_INPUT',
    channel: 'API',
    status,
    created_by: 'user123',
    updated_by: 'user123',
    created_at: now,
    updated_at: now,
  };
  try {
    const { rows: [event] } = await client.query(
      'SELECT postbox.enqueue($1, $2::uuid, $3::jsonb, $4) AS id',
      [CALLBACK_URL, CONVERSATION_ID, JSON.stringify(data), CONVERSATION_ID],
    );
    return { messageId: message.id, eventId: event.id };
  } catch (err) {
    if (err.code === '22023') { // invalid_parameter_value
      const problem = err.message.replace(`postbox: invalid ${err.column}: `, '');
      throw new InvalidEvent(err.column, problem);
    }
    throw err;
  }
}

// Runs `work` in a transaction: COMMIT when it returns, ROLLBACK when it throws.
async function inTransaction(client, work) {
  await client.query('BEGIN');
  try {
    const result = await work();
    await client.query('COMMIT');
    return result;
  } catch (err) {
    await client.query('ROLLBACK');
    throw err;
  }
}

async function main() {
  const client = new Client({ connectionString: process.env.DATABASE_URL });
  await client.connect();
  try {
    await client.query('CREATE SCHEMA IF NOT EXISTS example_app');
    await client.query(`CREATE TABLE IF NOT EXISTS example_app.messages (
      id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
      conversation_id uuid NOT NULL, content text NOT NULL,
      created_at timestamptz NOT NULL)`);

    // 1. Commit: the message and its event are both written.
    const saved = await inTransaction(client, () => saveMessage(client, 'Hello'));
    console.log(`committed event ${saved.eventId} (message ${saved.messageId})`);

    // 2. Roll back: neither the message nor its event exists.
    let undone;
    await inTransaction(client, async () => {
      undone = await saveMessage(client, 'Never sent');
      throw new Error('something failed after the enqueue');
    }).catch((err) => {
      if (!undone) throw err;
    });
    const { rows: [check] } = await client.query(
      'SELECT EXISTS (SELECT 1 FROM postbox.outbox WHERE id = $1) AS kept',
      [undone.eventId],
    );
    console.log(`rolled back event ${undone.eventId} (message ${undone.messageId}); in the outbox: ${check.kept}`);

    // 3. An invalid field aborts the transaction; the error names the field.
    try {
      await inTransaction(client, () => saveMessage(client, 'Bad status', 'DONE'));
      throw new Error('an invalid status was accepted');
    } catch (err) {
      if (!(err instanceof InvalidEvent)) throw err;
      console.log(`rejected: ${err.message}`);
    }
  } finally {
    await client.end();
  }
}

main().catch((err) => {
  console.error(err instanceof InvalidEvent ? err.message : err);
  process.exit(1);
});
