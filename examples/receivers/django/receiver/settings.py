"""Settings for the example webhook receiver (a minimal Django project).

Environment: WEBHOOK_SECRET (required), RECEIVER_STATE_DIR (./state),
RECEIVER_OUTPUT (<state>/processed.jsonl), RECEIVER_FAIL_FIRST (0),
RECEIVER_PROCESS_DELAY_MS (0), DJANGO_SECRET_KEY, DJANGO_ALLOWED_HOSTS.
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
STATE_DIR = Path(os.environ.get("RECEIVER_STATE_DIR", BASE_DIR / "state"))
STATE_DIR.mkdir(parents=True, exist_ok=True)

# The endpoint's signing secret, as configured in postbox (whsec_...).
WEBHOOK_SECRET = os.environ["WEBHOOK_SECRET"]
# Where processed events are written (one JSON object per line).
RECEIVER_OUTPUT = os.environ.get("RECEIVER_OUTPUT", str(STATE_DIR / "processed.jsonl"))
# Test aid: answer the first N verified deliveries with 500.
RECEIVER_FAIL_FIRST = int(os.environ.get("RECEIVER_FAIL_FIRST", "0"))
# Simulated processing time per event, to show that the answer does not wait for it.
RECEIVER_PROCESS_DELAY = int(os.environ.get("RECEIVER_PROCESS_DELAY_MS", "0")) / 1000

# Django's own secret (sessions, CSRF); not used by the webhook endpoint.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "dev-only-change-me")
DEBUG = False
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")

INSTALLED_APPS = ["webhooks"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
ROOT_URLCONF = "receiver.urls"
WSGI_APPLICATION = "receiver.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": STATE_DIR / "inbox.sqlite3",
        "OPTIONS": {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL;",
        },
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"webhooks": {"handlers": ["console"], "level": "INFO"}},
}
