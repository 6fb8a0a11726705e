from django.urls import path

from webhooks.views import webhook_handler

urlpatterns = [
    path("webhook", webhook_handler),
]
