from django.db import models


class InboxEvent(models.Model):
    """One received webhook, stored before it is acknowledged.

    `webhook_id` is the primary key: a retry or replay of the same event
    (postbox sends the same webhook-id every time) finds the existing row
    and is not stored or processed again. `processed_at` stays NULL until
    the processor thread has handled the event, so an acknowledged event
    is processed even if the server restarts in between.
    """

    webhook_id = models.CharField(primary_key=True, max_length=200)
    body = models.TextField()
    received_at = models.DateTimeField(auto_now_add=True, db_index=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return self.webhook_id
