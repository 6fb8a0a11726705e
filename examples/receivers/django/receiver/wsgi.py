"""WSGI entry point (used by `manage.py runserver` and by gunicorn/uwsgi).

The inbox processor thread starts with the web server process, not with
management commands such as `migrate`.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "receiver.settings")

application = get_wsgi_application()

from webhooks import processor  # noqa: E402  (needs the apps loaded above)

processor.start()
