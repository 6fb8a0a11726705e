"""Enqueue a postbox webhook event in the transaction that writes the message.

Python with psycopg 3:  pip install -r requirements.txt
Run:  DATABASE_URL=postgres://... python3 enqueue.py
(CALLBACK_URL overrides the receiver's URL.)

The message row and its event commit together or not at all. A field that
postbox.enqueue rejects raises SQLSTATE 22023 (invalid_parameter_value)
with the field's name in the error's COLUMN field.
"""

import os
import sys
from datetime import datetime, timezone

import psycopg
from psycopg.types.json import Jsonb

CALLBACK_URL = os.environ.get("CALLBACK_URL", "https://customer.example.com/webhook")
CONVERSATION_ID = "5e7c0a4e-3c1b-4f0e-9a57-2d1f8c6b9e10"  # an existing conversation


class InvalidEvent(Exception):
    """postbox.enqueue refused a field: `field` names it (e.g. data.status)."""

    def __init__(self, field, problem):
        super().__init__(f"invalid {field}: {problem}")
        self.field, self.problem = field, problem


def save_message(conn, content, status="RECEIVED"):
    """Inserts the message and enqueues its event; returns (message id, event id)."""
    now = datetime.now(timezone.utc).isoformat()
    (message_id,) = conn.execute(
        "INSERT INTO example_app.messages (conversation_id, content, created_at)"
        " VALUES (%s, %s, %s) RETURNING id",
        (CONVERSATION_ID, content, now),
    ).fetchone()
    data = {
        "id": str(message_id),
        "content": content,
        "content_type": "TEXT",
        "type": "USER_INPUT",
        "channel": "API",
        "status": status,
        "created_by": "user123",
        "updated_by": "user123",
        "created_at": now,
        "updated_at": now,
    }
    try:
        (event_id,) = conn.execute(
            "SELECT postbox.enqueue(%s, %s::uuid, %s::jsonb, %s)",
            (CALLBACK_URL, CONVERSATION_ID, Jsonb(data), CONVERSATION_ID),
        ).fetchone()
    except psycopg.errors.InvalidParameterValue as e:  # SQLSTATE 22023
        field = e.diag.column_name
        prefix = f"postbox: invalid {field}: "
        raise InvalidEvent(field, e.diag.message_primary.removeprefix(prefix)) from e
    return message_id, event_id


def main():
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS example_app")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS example_app.messages ("
            " id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
            " conversation_id uuid NOT NULL, content text NOT NULL,"
            " created_at timestamptz NOT NULL)"
        )

        # 1. Commit: the message and its event are both written.
        with conn.transaction():
            message_id, event_id = save_message(conn, "Hello")
        print(f"committed event {event_id} (message {message_id})")

        # 2. Roll back: neither the message nor its event exists.
        try:
            with conn.transaction():
                message_id, event_id = save_message(conn, "Never sent")
                raise RuntimeError("something failed after the enqueue")
        except RuntimeError:
            pass
        (kept,) = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM postbox.outbox WHERE id = %s)", (event_id,)
        ).fetchone()
        print(f"rolled back event {event_id} (message {message_id}); in the outbox: {str(kept).lower()}")

        # 3. An invalid field aborts the transaction; the error names the field.
        try:
            with conn.transaction():
                save_message(conn, "Bad status", status="DONE")
            sys.exit("an invalid status was accepted")
        except InvalidEvent as e:
            print(f"rejected: {e}")


if __name__ == "__main__":
    try:
        main()
    except InvalidEvent as e:
        sys.exit(str(e))
