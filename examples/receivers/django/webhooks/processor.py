"""The background processor: handles stored events after they were acknowledged.

One thread per server process works through the unprocessed rows of
`InboxEvent`, oldest first. With several server processes, or for heavier
work, hand the stored event to a task queue (Celery, RQ, Django-Q) instead:
the view stays the same.
"""

import json
import logging
import threading
import time

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from .models import InboxEvent

log = logging.getLogger("webhooks")
_wake = threading.Event()
_started = False
_lock = threading.Lock()


def process_event(webhook_id, payload):
    """The application's work. Here: append one JSON line per event."""
    if settings.RECEIVER_PROCESS_DELAY:
        time.sleep(settings.RECEIVER_PROCESS_DELAY)  # stands in for slow work
    record = {"receiver": "django", "webhook_id": webhook_id, "payload": payload}
    with open(settings.RECEIVER_OUTPUT, "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")
    log.info("processed %s (message %s)", webhook_id, payload["data"]["id"])


def wake():
    _wake.set()


def start():
    """Starts the processor thread once per process."""
    global _started
    with _lock:
        if _started:
            return
        _started = True
    threading.Thread(target=_run, name="webhook-inbox", daemon=True).start()


def _run():
    while True:
        _wake.clear()
        close_old_connections()
        event = InboxEvent.objects.filter(processed_at__isnull=True).order_by("received_at").first()
        if event is None:
            _wake.wait(timeout=5)
            continue
        try:
            process_event(event.webhook_id, json.loads(event.body))
        except Exception:
            log.exception("processing %s failed; trying again shortly", event.webhook_id)
            time.sleep(2)
            continue
        InboxEvent.objects.filter(pk=event.pk).update(processed_at=timezone.now())
