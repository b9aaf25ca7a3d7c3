"""The internal analytics event: what a page view or a beacon becomes before any destination sees it.

An event holds only data some destination may need, and never a full client IP: ``ip`` is the truncated address.
URL, referrer and props are kept as seen; each destination's policy (gateway.policy) scrubs and caps them in the
dispatcher, off the request path, before anything is sent or spooled.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Literal

__all__ = ["ERROR_REPORT", "PAGEVIEW", "Event", "PageRequest"]

PAGEVIEW = "pageview"
# A browser's Sentry envelope from the tunnel, raw in props["envelope"]: only sentry destinations take it.
ERROR_REPORT = "sentry_envelope"


# What a server page view's URL is made of, as the middleware read it: scheme, the first Host header (None when
# absent), raw path, path (None when the raw path is usable), query string and server address, all from the ASGI
# scope. Kept on the event until gateway.pageview.complete_pageview works out the URL, off the request path. As few
# objects as possible: a hung destination's backlog holds one per queued event until it is spooled.
PageRequest = tuple[object, bytes | None, object, object, object, object]


@dataclasses.dataclass(slots=True)
class Event:
    name: str  # "pageview" or an allowlisted custom event name
    url: str  # absolute URL of the page, unscrubbed
    referrer: str = ""
    title: str = ""
    language: str = ""  # primary Accept-Language tag, lower case ("en-us")
    user_agent: str = ""
    country: str = ""  # ISO 3166-1 alpha-2 from the geo lookup on the full address, "" when unknown
    ip: str = ""  # the TRUNCATED client address; the full one never reaches an event
    granted: frozenset[str] = frozenset()  # consent categories in effect (after GPC/DNT precedence)
    gpc: bool = False  # Sec-GPC: 1 was sent
    client_id: str = ""  # first-party analytics id from the signed id cookie, "" when none
    props: Mapping[str, str] = dataclasses.field(default_factory=dict)
    source: Literal["server", "beacon"] = "server"
    timestamp: float = dataclasses.field(default_factory=time.time)
    event_id: str = ""  # assigned by the dispatcher
    # Set by the middleware instead of url ("" until then): gateway.pageview.complete_pageview fills it in when a
    # destination's policy first reads the event (gateway.policy.Policy.apply).
    request: PageRequest | None = None

    @classmethod
    def server_pageview(
        cls,
        url: str,
        referrer: str,
        language: str,
        user_agent: str,
        country: str,
        ip: str,
        granted: frozenset[str],
        gpc: bool,
        client_id: str,
        timestamp: float,
        request: PageRequest | None = None,
    ) -> Event:
        """A server-side page view (title filled in later), built for the middleware's hot path.

        Same as ``Event(name=PAGEVIEW, url=url, ...)`` with the other fields at their defaults, but every field is
        passed by position: keyword binding plus the two default factories make the generated ``__init__`` about
        three times slower, and this runs on every page view. Keep the order in step with the fields above.

        ``request`` (the middleware, with ``url=""``): what the URL is made of, worked out only when a destination
        needs it (the URL costs about as much as the rest of the event; with no destination it is never built).
        """
        return cls(
            PAGEVIEW, url, referrer, "", language, user_agent, country, ip, granted, gpc, client_id, {}, "server",
            timestamp, "", request,
        )  # fmt: skip


# Event.server_pageview passes every field by position; fail at import, not with silently shifted values.
_POSITIONAL_ORDER = (
    "name", "url", "referrer", "title", "language", "user_agent", "country", "ip", "granted", "gpc", "client_id",
    "props", "source", "timestamp", "event_id", "request",
)  # fmt: skip
if tuple(field.name for field in dataclasses.fields(Event)) != _POSITIONAL_ORDER:  # pragma: no cover
    raise RuntimeError("gateway.events: Event's fields changed; update Event.server_pageview to match")
