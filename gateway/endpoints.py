"""The gateway's own endpoints, all under ``settings.prefix`` (default ``/_privacy``) plus two fixed paths.

| path | what |
|---|---|
| ``{prefix}/consent`` | consent state (GET), choice (POST JSON or form), withdrawal (DELETE) |
| ``/.well-known/gpc.json`` | the GPC support resource (https://privacycg.github.io/gpc-spec/#gpc-support-resource) |
| ``{prefix}/settings`` | a standalone consent settings page (the no-JS "privacy settings" link) |
| ``{prefix}/banner.css``, ``{prefix}/banner.js`` | banner assets |
| ``{prefix}/flows`` / ``flows.json`` | the data-flow table generated from the running config |
| ``{prefix}/healthz`` / ``readyz`` | liveness / readiness (upstream reachable in standalone mode) |
| ``{prefix}/metrics`` | Prometheus counters (allowlisted clients or bearer token) |
| ``{prefix}/intake/fastly`` + ``/.well-known/fastly/logging/challenge`` | Fastly log streaming ("edge") |
| ``{prefix}/p.gif`` | the page-view pixel (``analytics.pageviews = "pixel"``) |
| ``{prefix}/sentry`` | the first-party Sentry tunnel (only with a ``kind = "sentry"`` destination) |
| ``analytics.beacon_path`` | the Plausible-compatible first-party beacon |
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

from starlette.types import Receive, Scope, Send

from gateway.beacon import BeaconEndpoint
from gateway.consent_api import ConsentAPI
from gateway.context import STATE_KEY, PrivacyContext
from gateway.delivery.dispatcher import Dispatcher
from gateway.delivery.handoff import Handoff
from gateway.explain import flows_table, render_flows_html
from gateway.http_io import send_simple
from gateway.intake import CHALLENGE_PATH, EdgeIntake, FastlyChallenge
from gateway.metrics import HandoffCollector, HostBooks, IntakeCollector, MetricsEndpoint
from gateway.pixel import PixelEndpoint
from gateway.receipts import open_receipt_log
from gateway.sentry_tunnel import SentryTunnel
from gateway.sinks.sentry import SentrySink

if TYPE_CHECKING:
    from gateway.middleware import PrivacyGateway

__all__ = ["Endpoints", "send_simple"]


class Endpoints:
    def __init__(self, gateway: PrivacyGateway, *, readiness: Callable[[], Awaitable[bool]] | None) -> None:
        settings = gateway.settings
        self._gateway = gateway
        self._readiness = readiness
        consent = settings.consent
        receipts = open_receipt_log(consent.receipts, consent.receipts_queue, queue_max=consent.receipts_queue_max)
        self.receipts = receipts
        self._consent_api = ConsentAPI(settings, gateway.consent, receipts)
        self._beacon = BeaconEndpoint(settings, gateway.dispatcher.submit)
        backlog = getattr(receipts, "backlog", None)  # receipts waiting for PostgreSQL on this host
        delivery = gateway.dispatcher
        self._metrics: MetricsEndpoint | None = None
        self._handoff = delivery if isinstance(delivery, Handoff) else None
        if settings.metrics.enabled and isinstance(delivery, Handoff):
            # Deliverer mode: the host's books from the spool, whichever worker answers; this worker's own counters.
            books = HostBooks(settings.spool.path, delivery.destinations)
            self._metrics = MetricsEndpoint(settings.metrics, books, receipts_backlog=backlog, blocking=True)
            self._metrics.registry.register(HandoffCollector(delivery))
        elif settings.metrics.enabled and isinstance(delivery, Dispatcher):
            self._metrics = MetricsEndpoint(settings.metrics, delivery, receipts_backlog=backlog)
        sentry_sinks = [s for s in gateway.dispatcher.sinks if isinstance(s, SentrySink)]
        self._sentry = (
            SentryTunnel(lambda dsn: any(s.allows_dsn(dsn) for s in sentry_sinks), gateway.dispatcher.submit)
            if sentry_sinks
            else None
        )
        self._flows_html = render_flows_html(settings)
        self._flows_json = json.dumps(flows_table(settings), indent=2).encode()
        prefix = settings.prefix.rstrip("/")
        self._consent_path = f"{prefix}/consent"
        self._routes: dict[str, str] = {
            f"{prefix}/consent": "consent",
            "/.well-known/gpc.json": "consent",
            f"{prefix}/settings": "settings",
            f"{prefix}/banner.css": "asset",
            f"{prefix}/banner.js": "asset",
            f"{prefix}/flows": "flows",
            f"{prefix}/flows.json": "flows.json",
            f"{prefix}/healthz": "healthz",
            f"{prefix}/readyz": "readyz",
            f"{prefix}/metrics": "metrics",
            settings.analytics.beacon_path: "beacon",
        }
        if self._sentry is not None:
            self._routes[f"{prefix}/sentry"] = "sentry"
        self.intake: EdgeIntake | None = None
        if settings.fastly.secret is not None:
            self.intake = EdgeIntake(
                settings, detector=gateway._pageviews, truncate=gateway._truncate, geo=gateway.geo,
                consent=gateway.consent, client_ids=gateway._client_ids, submit=gateway.dispatcher.submit,
            )  # fmt: skip
            self._routes[f"{prefix}/intake/fastly"] = "intake"
            if self._metrics is not None:
                handoff = self._handoff
                worker = (lambda: handoff.worker) if handoff is not None else None
                self._metrics.registry.register(IntakeCollector(self.intake.counts, worker))
        self._challenge = FastlyChallenge(settings.fastly.service_ids) if settings.fastly.service_ids else None
        if self._challenge is not None:
            self._routes[CHALLENGE_PATH] = "challenge"
        self._pixel: PixelEndpoint | None = None
        if settings.analytics.pageviews == "pixel":
            own_hosts = frozenset((urlsplit(o).hostname or "").lower() for o in settings.site.origins)
            self._pixel = PixelEndpoint(
                gateway._pageviews, own_hosts, gateway.dispatcher.submit, gateway._client_ids,
                gateway._needs_client_id,
            )  # fmt: skip
            self._routes[f"{prefix}/p.gif"] = "pixel"
        self._prefix_slash = prefix + "/"

    async def handle(self, scope: Scope, receive: Receive, send: Send, *, client_allowed: bool) -> bool:
        """Answer a gateway path; return False when the path is not ours (the app gets it).

        ``client_allowed``: the resolved client address (not the proxy's) is in an endpoint allowlist.
        """
        path: str = scope["path"]
        route = self._routes.get(path)
        if route is None:
            if path.startswith(self._prefix_slash):
                await send_simple(send, 404, b"Not Found\n")
                return True
            return False
        method: str = scope["method"]
        if route == "consent":
            await self._consent_api(scope, receive, send)
        elif route == "beacon":
            await self._beacon(scope, receive, send)
        elif route == "intake":
            assert self.intake is not None
            await self.intake(scope, receive, send)
        elif route == "challenge" and method in ("GET", "HEAD"):
            assert self._challenge is not None
            await self._challenge(scope, receive, send)
        elif route == "pixel":
            assert self._pixel is not None
            await self._pixel(scope, receive, send)
        elif route == "sentry":
            assert self._sentry is not None
            await self._sentry(scope, receive, send)
        elif route == "metrics" and self._metrics is not None:
            await self._metrics(scope, receive, send, client_allowed=client_allowed)
        elif method not in ("GET", "HEAD"):
            await send_simple(send, 405, b"Method Not Allowed\n", extra_headers=((b"allow", b"GET, HEAD"),))
        elif route == "healthz":
            await send_simple(send, 200, b"ok\n")
        elif route == "readyz":
            ready = True if self._readiness is None else await self._readiness()
            await send_simple(send, 200 if ready else 503, b"ready\n" if ready else b"upstream unreachable\n")
        elif route == "asset":
            banner = self._gateway._banner
            if banner is None:
                await send_simple(send, 404, b"Not Found\n")
            else:
                await banner.serve_asset(scope, receive, send, path.rsplit("/", 1)[1])
        elif route == "settings":
            await self._settings_page(scope, send)
        elif route == "flows":
            await send_simple(send, 200, self._flows_html, b"text/html; charset=utf-8")
        elif route == "flows.json":
            await send_simple(send, 200, self._flows_json, b"application/json")
        else:
            await send_simple(send, 404, b"Not Found\n")
        return True

    async def _settings_page(self, scope: Scope, send: Send) -> None:
        banner = self._gateway._banner
        if banner is None:
            await send_simple(send, 404, b"Not Found\n")
            return
        context: PrivacyContext = scope["state"][STATE_KEY]
        language = banner.choose_language(_header(scope, b"accept-language"))
        next_path = "/"
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
            if key == "next" and value.startswith("/") and not value.startswith(("//", "/\\")):
                next_path = value.split("?", 1)[0]
        body = banner.settings_page(language, context.granted, next_path)
        # One visitor's choices: never cached (send_simple adds no-store), varies by cookie and language.
        await send_simple(send, 200, body, b"text/html; charset=utf-8", ((b"vary", b"cookie, accept-language"),))


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None
