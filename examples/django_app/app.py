"""A minimal Django project in one module, served by cluster-server.

From the repository root:

    cluster-server examples.django_app.app:application --workers 2       # WSGI
    cluster-server examples.django_app.app:asgi_application --workers 2  # ASGI

cluster-server tells the two apart by their signatures: ``application`` takes
``(environ, start_response)`` and runs on a2wsgi's thread pool
(``--wsgi-threads``); ``asgi_application`` is a coroutine function of
``(scope, receive, send)`` and runs on the event loop. A real project keeps its
settings in a settings module; one file keeps the example small.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator

from django.conf import settings

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["127.0.0.1", "localhost", "[::1]"],
    ROOT_URLCONF=__name__,
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret"),
    MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
    INSTALLED_APPS=[],
    DATABASES={},
    USE_TZ=True,
)

from django.core.asgi import get_asgi_application  # noqa: E402  (after settings)
from django.core.handlers.asgi import ASGIRequest  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.http import require_POST  # noqa: E402


def index(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"message": "Hello from Django on cluster-server", "pid": os.getpid()})


@require_POST
def form(request: HttpRequest) -> HttpResponse:
    # No CSRF middleware in this example: it has no session or cookies to protect.
    name = request.POST.get("name", "").strip()
    if not name:
        return JsonResponse({"error": "name is required"}, status=400)
    return JsonResponse({"greeting": f"Hello, {name}!", "pid": os.getpid()})


def stream(request: HttpRequest) -> StreamingHttpResponse:
    """Lines 0.1 s apart, each sent as it is made.

    Django streams a sync iterator only under WSGI and an async one only under
    ASGI (the other kind it reads whole first, with a warning): pick by handler.
    """
    count = min(int(request.GET.get("count", "5")), 100)

    def lines() -> Iterator[str]:
        for i in range(count):
            if i:
                time.sleep(0.1)
            yield f"line {i} from {os.getpid()}\n"

    async def async_lines() -> AsyncIterator[str]:
        for i in range(count):
            if i:
                await asyncio.sleep(0.1)
            yield f"line {i} from {os.getpid()}\n"

    content = async_lines() if isinstance(request, ASGIRequest) else lines()
    return StreamingHttpResponse(content, content_type="text/plain")


urlpatterns = [path("", index), path("form", form), path("stream", stream)]

application = get_wsgi_application()
asgi_application = get_asgi_application()
