"""A Flask receiver for postbox webhooks.

It verifies the Standard Webhooks signature with the official
`standardwebhooks` library, stores each new event in a small SQLite inbox
keyed by `webhook-id` (a retry or replay of the same event is acknowledged
and ignored), answers 200 at once and processes the inbox on a background
thread.

    WEBHOOK_SECRET=whsec_... python app.py

Environment: WEBHOOK_SECRET (required), HOST (127.0.0.1), PORT (8000),
RECEIVER_STATE_DIR (./state), RECEIVER_OUTPUT (<state>/processed.jsonl),
RECEIVER_FAIL_FIRST (0), RECEIVER_PROCESS_DELAY_MS (0). See ../README.md.
"""

import json
import logging
import os
import sqlite3
import threading
import time

from flask import Flask, jsonify, request
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

log = logging.getLogger("receiver")

SECRET = os.environ["WEBHOOK_SECRET"]
STATE_DIR = os.environ.get("RECEIVER_STATE_DIR", "state")
OUTPUT = os.environ.get("RECEIVER_OUTPUT", os.path.join(STATE_DIR, "processed.jsonl"))
PROCESS_DELAY = int(os.environ.get("RECEIVER_PROCESS_DELAY_MS", "0")) / 1000


class Inbox:
    """Received events, one row per webhook-id, in a SQLite file.

    The primary key is the deduplication: a second delivery of the same
    event finds its row and is not stored again. `processed_at` stays NULL
    until the background thread has handled the event, so events that were
    acknowledged but not yet processed survive a restart.
    """

    def __init__(self, path):
        self.path = path
        self.wake = threading.Event()
        with self.connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS inbox ("
                " webhook_id TEXT PRIMARY KEY,"
                " body TEXT NOT NULL,"
                " received_at REAL NOT NULL,"
                " processed_at REAL)"
            )

    def connect(self):
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def add(self, webhook_id, body):
        """Stores the event; False if this webhook-id was already received."""
        db = self.connect()
        try:
            cur = db.execute(
                "INSERT OR IGNORE INTO inbox (webhook_id, body, received_at) VALUES (?, ?, ?)",
                (webhook_id, body, time.time()),
            )
            is_new = cur.rowcount == 1
        finally:
            db.close()
        if is_new:
            self.wake.set()
        return is_new

    def run(self, handle):
        """Processes unprocessed events oldest first, forever."""
        db = self.connect()
        while True:
            self.wake.clear()
            row = db.execute(
                "SELECT webhook_id, body FROM inbox WHERE processed_at IS NULL ORDER BY rowid LIMIT 1"
            ).fetchone()
            if row is None:
                self.wake.wait(timeout=5)
                continue
            webhook_id, body = row
            try:
                handle(webhook_id, json.loads(body))
            except Exception:
                log.exception("processing %s failed; trying again shortly", webhook_id)
                time.sleep(2)
                continue
            db.execute("UPDATE inbox SET processed_at = ? WHERE webhook_id = ?", (time.time(), webhook_id))


def process_event(webhook_id, payload):
    """The application's work. Here: append one JSON line per event."""
    if PROCESS_DELAY:
        time.sleep(PROCESS_DELAY)  # stands in for slow work
    record = {"receiver": "flask", "webhook_id": webhook_id, "payload": payload}
    with open(OUTPUT, "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")
    log.info("processed %s (message %s)", webhook_id, payload["data"]["id"])


class FailFirst:
    """Test aid: answer the first N verified deliveries with 500."""

    def __init__(self, n):
        self.left = n
        self.lock = threading.Lock()

    def take(self):
        with self.lock:
            if self.left > 0:
                self.left -= 1
                return True
            return False


os.makedirs(STATE_DIR, exist_ok=True)
webhook = Webhook(SECRET)
inbox = Inbox(os.path.join(STATE_DIR, "inbox.sqlite3"))
fail_first = FailFirst(int(os.environ.get("RECEIVER_FAIL_FIRST", "0")))
threading.Thread(target=inbox.run, args=(process_event,), name="inbox", daemon=True).start()

app = Flask(__name__)


@app.post("/webhook")
def webhook_handler():
    body = request.get_data()  # the raw bytes: the signature covers them exactly
    try:
        # Checks the signature and that webhook-timestamp is within 5 minutes.
        webhook.verify(body, dict(request.headers))
    except (WebhookVerificationError, ValueError) as e:
        log.warning("rejected a webhook: %s", e)
        return jsonify(error="invalid signature"), 400

    if fail_first.take():
        return jsonify(error="failing on purpose (RECEIVER_FAIL_FIRST)"), 500

    webhook_id = request.headers["webhook-id"]
    if inbox.add(webhook_id, body.decode("utf-8")):
        return jsonify(status="accepted"), 200
    log.info("duplicate delivery of %s acknowledged", webhook_id)
    return jsonify(status="duplicate"), 200


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app.run(
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8000")),
        threaded=True,
    )
