"""GA4 Measurement Protocol sink: ``POST {endpoint}?measurement_id=…&api_secret=…``, up to 25 events per request.

Body (protocols.md §2.2, §2.5)::

    {"client_id": "1234567890.1700000000",
     "consent": {"ad_user_data": "DENIED", "ad_personalization": "DENIED"},
     "user_location": {"country_id": "GB"},      # only if "country" is allowed; never derived from the IP here
     "ip_override": "203.0.113.0",               # only if "ip" is allowed: the truncated address
     "user_agent": "Mozilla/5.0 …",              # only if "user_agent" is allowed
     "events": [{"name": "page_view", "timestamp_micros": …, "params": {"page_location", "page_referrer",
                 "page_title", "language", "session_id", "engagement_time_msec": 1}}]}

``ad_user_data`` is GRANTED only when the destination requires consent, all of it is granted and no GPC signal was
sent; ``ad_personalization`` is always DENIED (the gateway never allows ad personalisation).
``timestamp_micros`` keeps the visit time when delivery is retried or spooled (GA4 honours it for 72 hours).

GA4 answers 2xx to anything, malformed or not (G-REF), so every documented limit is enforced here (G-SEND
#limitations, G-LIM, G-REF #reserved_names): event names <= 40 characters of ``[A-Za-z][A-Za-z0-9_]*``, not
reserved; parameter names likewise and without reserved prefixes; <= 25 parameters per event; values <= 100
characters except page_location <= 1000, page_referrer <= 420 (URL-encoded length) and page_title <= 300;
no user properties; <= 25 events and < 130 kB per request; client_id always present. Each event is kept under
:data:`MAX_EVENT_BYTES`, so 25 of them plus the request-level fields always fit under :data:`MAX_BODY_BYTES`.

Client id: the first-party cookie id (set only with consent). Without one, ``client_id = "pseudonym"`` uses a
daily-rotating pseudonym: HMAC-SHA256 over truncated IP, user agent and site with a random key held in memory for
the current UTC day only, never stored. Otherwise the event is dropped (``no_client_id``).

The ``api_secret`` is added only in :meth:`GA4Sink.request`; it is never in a payload (so never spooled), and the
request's ``repr`` masks it. httpx itself logs request URLs at INFO level on the ``httpx`` logger, so that logger
must stay at WARNING or above.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import httpx

from gateway.config import DestinationSettings, Settings
from gateway.events import PAGEVIEW, Event
from gateway.policy import (
    DestinationPolicy,
    encode_json,
    parse_retry_after,
    truncate_chars,
    truncate_url,
)
from gateway.sinks import Outcome, Payload, PolicyDrop, Verdict

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_EVENTS",
    "MAX_EVENT_BYTES",
    "MAX_EVENT_NAME_CHARS",
    "MAX_PAGE_LOCATION",
    "MAX_PAGE_REFERRER",
    "MAX_PAGE_TITLE",
    "MAX_PARAMS",
    "MAX_PARAM_VALUE_CHARS",
    "RESERVED_EVENT_NAMES",
    "RESERVED_PARAM_NAMES",
    "RESERVED_PREFIXES",
    "DailyKey",
    "GA4Sink",
    "check_event_name",
    "is_valid_param_name",
]

MAX_EVENTS: Final = 25
MAX_PARAMS: Final = 25
MAX_USER_PROPERTIES: Final = 25  # we send none
MAX_EVENT_NAME_CHARS: Final = 40
MAX_PARAM_NAME_CHARS: Final = 40
MAX_PARAM_VALUE_CHARS: Final = 100
MAX_PAGE_LOCATION: Final = 1000
MAX_PAGE_REFERRER: Final = 420
MAX_PAGE_TITLE: Final = 300
MAX_BODY_BYTES: Final = 130_000  # "Post body < 130 kB"; decimal kB, the stricter reading
# 25 events of at most this size plus the request-level fields (client id, consent, location, IP, a user agent of
# at most 512 ASCII characters: well under 2 kB) stay below MAX_BODY_BYTES.
MAX_EVENT_BYTES: Final = 5000

RESERVED_EVENT_NAMES: Final = frozenset(
    {
        "ad_activeview", "ad_click", "ad_exposure", "ad_query", "ad_reward", "adunit_exposure", "app_clear_data",
        "app_exception", "app_install", "app_remove", "app_store_refund", "app_update", "app_upgrade",
        "dynamic_link_app_open", "dynamic_link_app_update", "dynamic_link_first_open", "error", "firebase_campaign",
        "firebase_in_app_message_action", "firebase_in_app_message_dismiss", "firebase_in_app_message_impression",
        "first_open", "first_visit", "notification_dismiss", "notification_foreground", "notification_open",
        "notification_receive", "notification_send", "os_update", "session_start", "user_engagement",
        # Allowed for app streams only; this sink feeds a web stream.
        "ad_impression", "in_app_purchase", "screen_view",
    }
)  # fmt: skip
RESERVED_PARAM_NAMES: Final = frozenset({"firebase_conversion"})
RESERVED_PREFIXES: Final = ("_", "firebase_", "ga_", "google_", "gtag.")
_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_GA_CLIENT_ID: Final = re.compile(r"[0-9]{1,20}\.[0-9]{1,20}")
# Params this sink sets itself; a prop with one of these names would overwrite them.
STANDARD_PARAMS: Final = frozenset(
    {"page_location", "page_referrer", "page_title", "language", "session_id", "engagement_time_msec"}
)


def check_event_name(name: str) -> str | None:
    """None if GA4 accepts ``name`` as an event name, else the PolicyDrop reason."""
    if len(name) > MAX_EVENT_NAME_CHARS:
        return "event_name_too_long"
    if not _NAME.fullmatch(name):
        return "event_name_invalid"
    if name in RESERVED_EVENT_NAMES or name.startswith(RESERVED_PREFIXES):
        return "event_name_reserved"
    return None


def is_valid_param_name(name: str) -> bool:
    return (
        len(name) <= MAX_PARAM_NAME_CHARS
        and bool(_NAME.fullmatch(name))
        and name not in RESERVED_PARAM_NAMES
        and not name.startswith(RESERVED_PREFIXES)
    )


class DailyKey:
    """A random HMAC key for the current UTC day, held in memory only; yesterday's key is forgotten."""

    __slots__ = ("_clock", "_day", "_key", "_random")

    def __init__(
        self, *, clock: Callable[[], float] = time.time, random: Callable[[int], bytes] = secrets.token_bytes
    ) -> None:
        self._clock = clock
        self._random = random
        self._day = -1
        self._key = b""

    def __repr__(self) -> str:
        return "DailyKey(<in memory>)"

    def current(self) -> bytes:
        day = int(self._clock() // 86_400)
        if day != self._day:
            self._day, self._key = day, self._random(32)
        return self._key


def _digits(digest: bytes, count: int) -> str:
    """``count`` decimal digits from ``digest``, the first one non-zero (GA client ids are two positive numbers)."""
    span = 9 * 10 ** (count - 1)
    return str(10 ** (count - 1) + int.from_bytes(digest, "big") % span)


def _ga_client_id(digest: bytes) -> str:
    return f"{_digits(digest[:8], 10)}.{_digits(digest[8:16], 10)}"


class _MaskedRequest(httpx.Request):
    """An httpx.Request whose repr never shows the query string (it carries the api_secret)."""

    def __repr__(self) -> str:
        return f"<Request({self.method!r}, '{self.url.copy_with(query=None)}?…')>"


class GA4Sink:
    """One ``[destinations.NAME]`` with ``kind = "ga4"``."""

    kind = "ga4"
    max_batch = MAX_EVENTS

    def __init__(self, dest: DestinationSettings, settings: Settings, *, pseudonym_key: DailyKey | None = None) -> None:
        self.name = dest.name
        self.requires: frozenset[str] = frozenset(dest.requires)
        self.dry_run = dest.dry_run
        self.ttl_seconds = dest.ttl_seconds  # read by the dispatcher: how long a payload may wait in the spool
        self.endpoint = dest.endpoint
        self.measurement_id = dest.measurement_id
        self._api_secret = dest.api_secret
        self.client_id_mode = dest.client_id
        self.policy = DestinationPolicy(dest, settings)
        self._pseudonym_key = pseudonym_key or DailyKey()
        # The collect URL with its query, parsed once on first use: httpx's URL parsing cost ~60 µs per request.
        self._collect_url: httpx.URL | None = None

    def __repr__(self) -> str:
        return f"GA4Sink(name={self.name!r}, endpoint={self.endpoint!r}, measurement_id={self.measurement_id!r})"

    # ------------------------------------------------------------------------------------------------------------

    def client_id(self, event: Event, site: str) -> str:
        """The client id to send, or PolicyDrop("no_client_id")."""
        cookie_id = event.client_id.strip()
        if cookie_id:
            if _GA_CLIENT_ID.fullmatch(cookie_id):
                return cookie_id
            # Any other first-party id maps to a stable id in GA's "<digits>.<digits>" form.
            return _ga_client_id(hashlib.sha256(b"ga4-client-id\0" + cookie_id.encode("utf-8")).digest())
        if self.client_id_mode != "pseudonym":
            raise PolicyDrop("no_client_id")
        message = "\0".join((self.policy.ip(event.ip), event.user_agent, site)).encode("utf-8", errors="replace")
        return _ga_client_id(hmac.new(self._pseudonym_key.current(), message, hashlib.sha256).digest())

    @staticmethod
    def session_id(client_id: str, timestamp: float) -> str:
        """A stable numeric session id per client and UTC day."""
        day = datetime.datetime.fromtimestamp(timestamp, datetime.UTC).date().isoformat()
        return _digits(hashlib.sha256(f"ga4-session\0{client_id}\0{day}".encode()).digest()[:8], 10)

    def consent(self, event: Event) -> dict[str, str]:
        granted = bool(self.requires) and self.requires <= event.granted and not event.gpc
        return {"ad_user_data": "GRANTED" if granted else "DENIED", "ad_personalization": "DENIED"}

    def build(self, event: Event) -> Payload:
        policy = self.policy
        fields = policy.apply(event)  # checks consent first
        if event.name == PAGEVIEW:
            name = "page_view"
        elif not policy.allows("name"):
            raise PolicyDrop("custom_event_not_allowed")
        else:
            name = event.name
            problem = check_event_name(name)
            if problem:
                raise PolicyDrop(problem)
        client_id = self.client_id(event, fields.page_host)

        params: dict[str, Any] = {}
        if policy.allows("url"):
            params["page_location"] = truncate_url(fields.url, MAX_PAGE_LOCATION, measure_encoded=True)
        if fields.referrer:
            params["page_referrer"] = truncate_url(fields.referrer, MAX_PAGE_REFERRER, measure_encoded=True)
        if fields.title:
            params["page_title"] = truncate_chars(fields.title, MAX_PAGE_TITLE)
        if fields.language:
            params["language"] = truncate_chars(fields.language, MAX_PARAM_VALUE_CHARS)
        params["session_id"] = self.session_id(client_id, event.timestamp)
        params["engagement_time_msec"] = 1
        custom: list[str] = []
        for key, value in fields.props.items():
            if len(params) >= MAX_PARAMS:
                break
            if key in STANDARD_PARAMS or not is_valid_param_name(key):
                continue
            params[key] = truncate_chars(value, MAX_PARAM_VALUE_CHARS)
            custom.append(key)

        ga_event: dict[str, Any] = {
            "name": name,
            "timestamp_micros": int(event.timestamp * 1_000_000),
            "params": params,
        }
        # Multi-byte titles and props can make an event large; shed custom params until it fits the budget.
        size = len(encode_json(ga_event))
        while size > MAX_EVENT_BYTES and custom:
            del params[custom.pop()]
            size = len(encode_json(ga_event))
        if size > MAX_EVENT_BYTES:  # pragma: no cover - standard params alone stay < 3 kB
            raise PolicyDrop("event_too_large")

        request_fields: dict[str, Any] = {"client_id": client_id, "consent": self.consent(event)}
        if fields.country:
            request_fields["user_location"] = {"country_id": fields.country}
        if fields.ip:
            request_fields["ip_override"] = fields.ip
        if fields.user_agent:
            request_fields["user_agent"] = fields.user_agent
        # Events share a request only if everything outside "events" is identical.
        digest = hashlib.sha256(json.dumps(request_fields, sort_keys=True).encode()).hexdigest()[:16]
        return Payload(
            destination=self.name,
            event_id=event.event_id,
            body={**request_fields, "events": [ga_event]},
            headers=(),
            batch_key=f"{client_id}:{digest}",
            created_at=event.timestamp,
        )

    def request(self, payloads: Sequence[Payload]) -> httpx.Request:
        """One request for up to 25 payloads with the same batch key; raises ValueError otherwise."""
        if not 1 <= len(payloads) <= MAX_EVENTS:
            raise ValueError(f"a GA4 request carries 1..{MAX_EVENTS} events, got {len(payloads)}")
        key = payloads[0].batch_key
        if any(p.batch_key != key for p in payloads):
            raise ValueError("GA4 payloads in one request must share a batch key")
        body = {k: v for k, v in payloads[0].body.items() if k != "events"}
        body["events"] = [event for p in payloads for event in p.body["events"]]
        content = encode_json(body)
        if len(content) >= MAX_BODY_BYTES:  # pragma: no cover - MAX_EVENT_BYTES makes this impossible
            raise ValueError(f"GA4 request body of {len(content)} bytes exceeds {MAX_BODY_BYTES}")
        url = self._collect_url
        if url is None:
            secret = str(self._api_secret) if self._api_secret is not None else ""
            params = {"measurement_id": self.measurement_id, "api_secret": secret}
            url = self._collect_url = httpx.URL(self.endpoint).copy_merge_params(params)
        return _MaskedRequest("POST", url, headers=[("content-type", "application/json")], content=content)

    def classify(self, response: httpx.Response) -> Verdict:
        # GA4 answers 2xx even to malformed payloads, so 2xx is all delivery can know (G-REF).
        status = response.status_code
        if 200 <= status < 300:
            return Verdict(Outcome.DELIVERED)
        if status == 429 or status >= 500:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            return Verdict(Outcome.RETRY, reason=f"http {status}", retry_after=retry_after)
        return Verdict(Outcome.REJECTED, reason=f"http {status}")
