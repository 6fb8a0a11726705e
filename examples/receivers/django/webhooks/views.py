import logging
import threading

from django.conf import settings
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from . import processor
from .models import InboxEvent

log = logging.getLogger("webhooks")
webhook = Webhook(settings.WEBHOOK_SECRET)


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


fail_first = FailFirst(settings.RECEIVER_FAIL_FIRST)


@csrf_exempt  # authenticated by its signature, not by a CSRF token
@require_POST
def webhook_handler(request):
    body = request.body  # the raw bytes: the signature covers them exactly
    try:
        # Checks the signature and that webhook-timestamp is within 5 minutes.
        webhook.verify(body, dict(request.headers))
    except (WebhookVerificationError, ValueError) as e:
        log.warning("rejected a webhook: %s", e)
        return JsonResponse({"error": "invalid signature"}, status=400)

    if fail_first.take():
        return JsonResponse({"error": "failing on purpose (RECEIVER_FAIL_FIRST)"}, status=500)

    webhook_id = request.headers["webhook-id"]
    _, created = InboxEvent.objects.get_or_create(
        webhook_id=webhook_id, defaults={"body": body.decode("utf-8")}
    )
    if created:
        processor.wake()
        return JsonResponse({"status": "accepted"})
    log.info("duplicate delivery of %s acknowledged", webhook_id)
    return JsonResponse({"status": "duplicate"})
