"""Edge log intake (``analytics.pageviews = "edge"``): Fastly's own request log counts the page views.

A page served from the CDN's cache never reaches the origin, but Fastly logs every request and can stream the log
to an HTTPS endpoint (https://www.fastly.com/documentation/guides/integrations/logging-endpoints/log-streaming-https/).
The gateway is that endpoint: ``POST {prefix}/intake/fastly`` takes batches of JSON log lines in the format shipped
in README ("Behind a CDN") and config/python.org.toml, one object per request.

Each record goes through the same rules as a request the middleware sees: bots and prefetches are skipped, only a
``GET`` answered ``200 text/html`` outside the excluded paths is a page view, the country is looked up on the full
address, which is then truncated and forgotten (it exists only in a local variable while one record is handled),
consent comes from the logged consent cookie verified with the same keys (a tampered or missing cookie is no
consent, GPC takes precedence as everywhere), and the event goes to the destinations' policies like any other.

Every record is accounted for: an event, or a skip with its reason (``bot``, ``prefetch``, ``not_a_page``,
``invalid_record``, ``too_old``) in ``gateway_intake_records_total``. A malformed line never fails the batch.

Requests (security.md T10 applies): the configured header must carry the secret (constant-time compare, 401 before
the body is read); at most ``fastly.max_body_bytes`` (413); ``Content-Encoding: gzip`` is inflated up to
``fastly.max_decompressed_bytes`` (413 beyond: a gzip bomb costs bounded memory); NDJSON or a JSON array. The answer
is ``200`` with the batch's accounting once it is accepted, so Fastly does not send it again.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any, Final

import anyio
from starlette.types import Receive, Scope, Send

from gateway.anonymize import Truncator
from gateway.clientid import ClientIdCookie
from gateway.clientip import normalize_ip
from gateway.config import Settings
from gateway.consent import ConsentManager, sec_gpc_is_on
from gateway.events import Event
from gateway.geo import Geo
from gateway.http_io import BodyTooLarge, BodyTooSlow, ClientGone, read_body, send_simple
from gateway.pageview import PageviewDetector, is_bot, is_html_type, is_prefetch, primary_language

__all__ = ["CHALLENGE_PATH", "OUTCOMES", "EdgeIntake", "FastlyChallenge"]

CHALLENGE_PATH: Final = "/.well-known/fastly/logging/challenge"
EVENT: Final = "event"
OUTCOMES: Final = (EVENT, "bot", "prefetch", "not_a_page", "invalid_record", "too_old")
_CHUNK: Final = 500  # records handled between two yields to the event loop: a big batch never stalls other requests
_FUTURE_SKEW: Final = 300.0
_BODY_TIMEOUT: Final = (
    30.0  # seconds for one batch to arrive  # a record from further in the future than this is invalid
)


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class FastlyChallenge:
    """``GET /.well-known/fastly/logging/challenge``: the hex SHA-256 of each service id, one per line."""

    def __init__(self, service_ids: tuple[str, ...]) -> None:
        self.body = "".join(hashlib.sha256(s.encode()).hexdigest() + "\n" for s in service_ids).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_simple(send, 200, self.body)


def _records(text: bytes) -> Iterator[Any]:
    """The batch's records: a JSON array, or one JSON value per line (None for a line that is not JSON)."""
    stripped = text.lstrip()
    if stripped.startswith(b"["):
        try:
            values = json.loads(stripped)
        except ValueError:
            values = None
        if isinstance(values, list):
            yield from values
            return
    for line in text.splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError:
                yield None


def _timestamp(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return when.timestamp()
    return None


def _text(record: dict[str, Any], key: str) -> str:
    value = record.get(key, "")
    return value if isinstance(value, str) else ""


class EdgeIntake:
    """``POST {prefix}/intake/fastly``; the per-outcome counters are :attr:`counts` (read by the metrics)."""

    def __init__(
        self,
        settings: Settings,
        *,
        detector: PageviewDetector,
        truncate: Truncator,
        geo: Geo,
        consent: ConsentManager,
        client_ids: ClientIdCookie,
        submit: Callable[[Event], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        fastly = settings.fastly
        self._secret = str(fastly.secret).encode() if fastly.secret is not None else b""
        self._header = fastly.auth_header.lower().encode("latin-1")
        self._max_body = fastly.max_body_bytes
        self._max_inflated = fastly.max_decompressed_bytes
        self._max_age = fastly.max_record_age_seconds
        self._detector = detector
        self._truncate = truncate
        self._geo = geo
        self._consent = consent
        self._client_ids = client_ids
        self._consent_cookie = settings.consent.cookie.encode()
        self._client_id_cookie = settings.analytics.client_id_cookie.encode()
        self._submit = submit
        self._clock = clock
        self.counts: dict[str, int] = dict.fromkeys(OUTCOMES, 0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") != "POST":
            await send_simple(send, 405, b"method not allowed", extra_headers=((b"allow", b"POST"),))
            return
        try:
            gzipped = self._check_headers(scope)
            body = await self._read(receive)
            if gzipped:
                body = self._inflate(body)
        except _Refused as refused:
            # After a 401 or 413 the unread body is still on the wire: do not keep the connection.
            close = ((b"connection", b"close"),) if refused.status in (401, 413) else ()
            await send_simple(send, refused.status, refused.reason.encode(), extra_headers=close)
            return
        batch = dict.fromkeys(OUTCOMES, 0)
        now = self._clock()
        for index, record in enumerate(_records(body)):
            outcome = self.handle(record, now)
            batch[outcome] += 1
            self.counts[outcome] += 1
            if index % _CHUNK == _CHUNK - 1:
                await anyio.sleep(0)  # let other requests run between chunks of a large batch
        await send_simple(send, 200, json.dumps(batch, separators=(",", ":")).encode(), b"application/json")

    def _check_headers(self, scope: Scope) -> bool:
        given = b""
        gzipped = False
        for name, value in scope.get("headers", ()):
            if name == self._header:
                given = value.strip()
            elif name == b"content-encoding":
                encoding = value.strip().lower()
                if encoding == b"gzip":
                    gzipped = True
                elif encoding not in (b"", b"identity"):
                    raise _Refused(415, "only gzip or identity encoding")
            elif name == b"content-length" and value.strip().isdigit() and int(value) > self._max_body:
                raise _Refused(413, "batch too large")
        # Constant time, so the answer's timing does not tell how much of a guess was right.
        if not self._secret or not hmac.compare_digest(given, self._secret):
            raise _Refused(401, "unauthorized")
        return gzipped

    async def _read(self, receive: Receive) -> bytes:
        try:
            return await read_body(receive, self._max_body, _BODY_TIMEOUT)
        except BodyTooLarge:
            raise _Refused(413, "batch too large") from None
        except BodyTooSlow:
            raise _Refused(408, "batch not received in time") from None
        except ClientGone:
            raise _Refused(400, "disconnected") from None

    def _inflate(self, body: bytes) -> bytes:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
        try:
            inflated = inflater.decompress(body, self._max_inflated + 1)
        except zlib.error:
            raise _Refused(400, "not gzip") from None
        if len(inflated) > self._max_inflated or inflater.unconsumed_tail:
            raise _Refused(413, "batch too large when inflated")
        return inflated

    # ---------------------------------------------------------------------------------------------------------

    def handle(self, record: object, now: float) -> str:
        """One log record: submit its page view and return ``"event"``, or return why it is skipped."""
        if not isinstance(record, dict):
            return "invalid_record"
        timestamp = _timestamp(record.get("time"))
        host = _text(record, "host").strip().lower()
        path = _text(record, "url")
        status = record.get("status")
        if timestamp is None or not host or not path.startswith("/") or not isinstance(status, int):
            return "invalid_record"
        if timestamp > now + _FUTURE_SKEW:
            return "invalid_record"
        if now - timestamp > self._max_age:
            return "too_old"
        user_agent = _text(record, "user_agent")
        if is_bot(user_agent):
            return "bot"
        if is_prefetch(_text(record, "sec_purpose").encode("latin-1", "replace")) or is_prefetch(
            _text(record, "purpose").encode("latin-1", "replace")
        ):
            return "prefetch"
        if (
            _text(record, "method") != "GET"
            or status != 200
            or not is_html_type(_text(record, "content_type").encode("latin-1", "replace"))
            or not self._detector.path_counts(path.split("?", 1)[0], user_agent, prefetch=False)
        ):
            return "not_a_page"
        full_ip = normalize_ip(_text(record, "client_ip"))
        if full_ip is None:
            return "invalid_record"
        ip = self._truncate(full_ip)
        country = self._geo.country(full_ip, ip)
        del full_ip  # from here on only the truncated address exists
        gpc = sec_gpc_is_on(_text(record, "sec_gpc").encode("latin-1", "replace"))
        consent_value = _text(record, "consent").encode("latin-1", "replace")
        cookies = (self._consent_cookie + b"=" + consent_value,) if consent_value else ()
        decision = self._consent.decide_cookies(cookies, gpc, False, now)
        client_id = ""
        id_value = _text(record, "client_id").encode("latin-1", "replace")
        if decision.granted and id_value:
            client_id = self._client_ids.read_cookies((self._client_id_cookie + b"=" + id_value,), now)
        scheme = _text(record, "scheme") or "https"
        self._submit(
            Event.server_pageview(
                f"{'http' if scheme == 'http' else 'https'}://{host}{path}",
                _text(record, "referer"),
                primary_language(_text(record, "accept_language")),
                user_agent,
                country,
                ip,
                decision.granted,
                decision.gpc,
                client_id,
                timestamp,
            )
        )
        return EVENT
