"""Peers for the delivery tests, as ``uvicorn --factory`` targets, so each runs (and dies) as its own process.

- ``tests.apps.collector:upstream_app``: the load test's small site (:class:`tests.load.collectors.UpstreamApp`;
  ``/p/...`` are HTML pages).
- ``tests.apps.collector:collector_app``: the load test's recording Plausible/GA4 collector
  (:class:`tests.load.collectors.CollectorApp`, ``GET /_records`` lists what arrived), optionally slow: with
  ``COLLECTOR_DELAY_SECONDS`` set, it reads each request body completely, *then* waits that long before it
  answers. A request the gateway cuts off while waiting is therefore still recorded, so a test can account for
  every event: whatever reached the destination is in the records, whatever did not is still in the gateway.

Settings come from the environment: ``COLLECTOR_DOMAIN`` (the Plausible site domain), ``COLLECTOR_MEASUREMENT_ID``
and ``COLLECTOR_API_SECRET`` (GA4; defaults suit a Plausible-only test) and ``COLLECTOR_DELAY_SECONDS``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Final

from tests.load.collectors import RECORDS_PATH, CollectorApp, UpstreamApp

__all__ = ["DELAY_ENV", "DOMAIN_ENV", "SlowCollector", "collector_app", "upstream_app"]

DOMAIN_ENV: Final = "COLLECTOR_DOMAIN"
DELAY_ENV: Final = "COLLECTOR_DELAY_SECONDS"
MEASUREMENT_ID_ENV: Final = "COLLECTOR_MEASUREMENT_ID"
API_SECRET_ENV: Final = "COLLECTOR_API_SECRET"


class SlowCollector:
    """Wraps a :class:`CollectorApp`: buffer the whole request, wait ``delay`` seconds, then let it answer."""

    def __init__(self, inner: CollectorApp, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == RECORDS_PATH or self.delay <= 0:
            await self.inner(scope, receive, send)
            return
        messages: list[dict[str, Any]] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        await asyncio.sleep(self.delay)
        replay = iter(messages)

        async def replay_receive() -> dict[str, Any]:
            # After the buffered body, report a disconnect (what the server would say once the body is read).
            return next(replay, {"type": "http.disconnect"})

        await self.inner(scope, replay_receive, send)


def collector_app() -> SlowCollector:
    inner = CollectorApp(
        domain=os.environ.get(DOMAIN_ENV, "delivery.example"),
        measurement_id=os.environ.get(MEASUREMENT_ID_ENV, "G-DELIVERY1"),
        api_secret=os.environ.get(API_SECRET_ENV, "delivery-test-secret-not-real"),
    )
    return SlowCollector(inner, float(os.environ.get(DELAY_ENV, "0") or 0))


def upstream_app() -> UpstreamApp:
    return UpstreamApp()
