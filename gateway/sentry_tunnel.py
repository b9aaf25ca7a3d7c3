"""The first-party Sentry tunnel (``POST {prefix}/sentry``): the browser SDK's ``tunnel`` option points here.

``Sentry.init({dsn, tunnel: "/_privacy/sentry"})`` makes the SDK post its envelopes to the site itself instead of
to Sentry. The tunnel checks what it can cheaply and at once, then hands the envelope to the dispatcher; items are
scrubbed there, off the request path (gateway.sinks.sentry):

- only POST (405); at most :data:`~gateway.sentry_envelope.MAX_ENVELOPE_BYTES` (413, ``Content-Length`` first,
  then counted while reading) within 5 s (408); no ``Content-Encoding`` (415: no decompression bombs);
- the framing must parse (400) with at most :data:`~gateway.sentry_envelope.MAX_ITEMS` items (413);
- the envelope header's ``dsn`` must be one a sentry destination lists (403): otherwise anyone could make the
  gateway post to any host (the SSRF the Sentry docs warn tunnels about);
- the answer is ``200 {}`` as soon as the envelope is handed over; no request input can make it 500.

The event handed over carries the *truncated* address, user agent, consent and GPC of this request, like a page
view's, so the destination's ``fields`` and ``requires`` decide what of them Sentry receives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from starlette.types import Receive, Scope, Send

from gateway.context import STATE_KEY, PrivacyContext
from gateway.events import ERROR_REPORT, Event
from gateway.http_io import BodyTooLarge, BodyTooSlow, ClientGone, read_body, send_simple
from gateway.sentry_envelope import MAX_ENVELOPE_BYTES, EnvelopeError, parse_envelope

__all__ = ["SentryTunnel"]

logger = logging.getLogger("gateway.sentry")

BODY_TIMEOUT_SECONDS: Final = 5.0


class _Disconnected(Exception):
    pass


class SentryTunnel:
    """ASGI endpoint; ``allows_dsn`` says whether any sentry destination lists a DSN."""

    def __init__(self, allows_dsn: Callable[[object], bool], submit: Callable[[Event], None]) -> None:
        self._allows_dsn = allows_dsn
        self._submit = submit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") != "POST":
            await send_simple(send, 405, b"method not allowed", extra_headers=((b"allow", b"POST"),))
            return
        try:
            body = await self._read(scope, receive)
            envelope = parse_envelope(body)
            if not self._allows_dsn(envelope.header.get("dsn")):
                raise EnvelopeError(403, "DSN not allowed")
        except _Disconnected:
            return
        except EnvelopeError as error:
            logger.debug("sentry envelope refused: %d %s", error.status, error.reason)
            close = ((b"connection", b"close"),) if error.status in (408, 413) else ()
            await send_simple(send, error.status, error.reason.encode("ascii", "replace"), extra_headers=close)
            return
        except Exception:  # a bug must not become a 500 for a browser's error report; the line names no input
            logger.exception("sentry tunnel failed")
            await send_simple(send, 400, b"bad request")
            return
        context: PrivacyContext | None = scope.get("state", {}).get(STATE_KEY)
        user_agent = ""
        for name, value in scope.get("headers", ()):
            if name == b"user-agent":
                user_agent = value.decode("latin-1")
        self._submit(
            Event(
                name=ERROR_REPORT,
                url="",
                user_agent=user_agent,
                country=context.country if context else "",
                ip=context.ip if context else "",  # already truncated by the middleware
                granted=context.granted if context else frozenset(),
                gpc=context.gpc if context else False,
                props={"envelope": body.decode("latin-1")},  # bytes as they came; parsed again when scrubbed
                source="server",
            )
        )
        await send_simple(send, 200, b"{}", b"application/json")

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        for name, value in scope.get("headers", ()):
            if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                raise EnvelopeError(415, "compressed envelopes are not accepted")
            if name == b"content-length":
                text = value.strip()
                if not text.isdigit():
                    raise EnvelopeError(400, "bad content-length")
                if int(text) > MAX_ENVELOPE_BYTES:
                    raise EnvelopeError(413, "envelope too large")
        try:
            return await read_body(receive, MAX_ENVELOPE_BYTES, BODY_TIMEOUT_SECONDS)
        except BodyTooLarge:
            raise EnvelopeError(413, "envelope too large") from None
        except BodyTooSlow:
            raise EnvelopeError(408, "envelope not received in time") from None
        except ClientGone:
            raise _Disconnected from None
