"""A FastAPI receiver for postbox webhooks.

It verifies the Standard Webhooks signature with the official
`standardwebhooks` library, stores each new event in a small SQLite inbox
keyed by `webhook-id` (a retry or replay of the same event is acknowledged
and ignored), answers 200 at once and processes the inbox in a background
task started with the application.

    WEBHOOK_SECRET=whsec_... uvicorn app:app --port 8000

Environment: WEBHOOK_SECRET (required), RECEIVER_STATE_DIR (./state),
RECEIVER_OUTPUT (<state>/processed.jsonl), RECEIVER_FAIL_FIRST (0),
RECEIVER_PROCESS_DELAY_MS (0). See ../README.md.
"""

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

log = logging.getLogger("uvicorn.error")

SECRET = os.environ["WEBHOOK_SECRET"]
STATE_DIR = os.environ.get("RECEIVER_STATE_DIR", "state")
OUTPUT = os.environ.get("RECEIVER_OUTPUT", os.path.join(STATE_DIR, "processed.jsonl"))
PROCESS_DELAY = int(os.environ.get("RECEIVER_PROCESS_DELAY_MS", "0")) / 1000


class Inbox:
    """Received events, one row per webhook-id, in a SQLite file.

    The primary key is the deduplication: a second delivery of the same
    event finds its row and is not stored again. `processed_at` stays NULL
    until the background task has handled the event, so events that were
    acknowledged but not yet processed survive a restart. SQLite calls are
    short and run on threads (`asyncio.to_thread`) so they never block the
    event loop.
    """

    def __init__(self, path):
        self.path = path
        self.wake = asyncio.Event()
        with contextlib.closing(self._connect()) as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS inbox ("
                " webhook_id TEXT PRIMARY KEY,"
                " body TEXT NOT NULL,"
                " received_at REAL NOT NULL,"
                " processed_at REAL)"
            )

    def _connect(self):
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def _insert(self, webhook_id, body):
        with contextlib.closing(self._connect()) as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO inbox (webhook_id, body, received_at) VALUES (?, ?, ?)",
                (webhook_id, body, time.time()),
            )
            return cur.rowcount == 1

    def _next(self):
        with contextlib.closing(self._connect()) as db:
            return db.execute(
                "SELECT webhook_id, body FROM inbox WHERE processed_at IS NULL ORDER BY rowid LIMIT 1"
            ).fetchone()

    def _done(self, webhook_id):
        with contextlib.closing(self._connect()) as db:
            db.execute("UPDATE inbox SET processed_at = ? WHERE webhook_id = ?", (time.time(), webhook_id))

    async def add(self, webhook_id, body):
        """Stores the event; False if this webhook-id was already received."""
        is_new = await asyncio.to_thread(self._insert, webhook_id, body)
        if is_new:
            self.wake.set()
        return is_new

    async def run(self, handle):
        """Processes unprocessed events oldest first, until cancelled."""
        while True:
            self.wake.clear()
            row = await asyncio.to_thread(self._next)
            if row is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=5)
                continue
            webhook_id, body = row
            try:
                await handle(webhook_id, json.loads(body))
            except Exception:
                log.exception("processing %s failed; trying again shortly", webhook_id)
                await asyncio.sleep(2)
                continue
            await asyncio.to_thread(self._done, webhook_id)


async def process_event(webhook_id, payload):
    """The application's work. Here: append one JSON line per event."""
    if PROCESS_DELAY:
        await asyncio.sleep(PROCESS_DELAY)  # stands in for slow work
    record = {"receiver": "fastapi", "webhook_id": webhook_id, "payload": payload}
    with open(OUTPUT, "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")
    log.info("processed %s (message %s)", webhook_id, payload["data"]["id"])


webhook = Webhook(SECRET)
# Test aid: answer the first N verified deliveries with 500. (One event
# loop, no awaits between reading and updating it: no lock needed.)
fail_first_left = int(os.environ.get("RECEIVER_FAIL_FIRST", "0"))


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    os.makedirs(STATE_DIR, exist_ok=True)
    app.state.inbox = Inbox(os.path.join(STATE_DIR, "inbox.sqlite3"))
    processor = asyncio.create_task(app.state.inbox.run(process_event))
    yield
    processor.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await processor


app = FastAPI(lifespan=lifespan)


@app.post("/webhook")
async def webhook_handler(request: Request):
    global fail_first_left
    body = await request.body()  # the raw bytes: the signature covers them exactly
    try:
        # Checks the signature and that webhook-timestamp is within 5 minutes.
        webhook.verify(body, dict(request.headers))
    except (WebhookVerificationError, ValueError) as e:
        log.warning("rejected a webhook: %s", e)
        return JSONResponse({"error": "invalid signature"}, status_code=400)

    if fail_first_left > 0:
        fail_first_left -= 1
        return JSONResponse({"error": "failing on purpose (RECEIVER_FAIL_FIRST)"}, status_code=500)

    webhook_id = request.headers["webhook-id"]
    if await request.app.state.inbox.add(webhook_id, body.decode("utf-8")):
        return {"status": "accepted"}
    log.info("duplicate delivery of %s acknowledged", webhook_id)
    return {"status": "duplicate"}
