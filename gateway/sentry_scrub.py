"""What Sentry may receive of an error report: the same policy as every other destination, applied to SDK payloads.

Browser error reports carry far more than the privacy notice allows: the visitor's address (or ``{{auto}}``, which
asks Sentry to take it from the connection), cookies, full URLs with query strings, breadcrumbs of visited URLs,
local variables, user ids and e-mails. :class:`SentryScrubber` keeps the structure Sentry needs to group and show an
error and minimises every value with :class:`gateway.policy.DestinationPolicy`, the code that minimises Plausible's
and GA4's fields:

- ``user`` keeps only ``ip_address``, and only when the destination's ``fields`` list ``ip``: then it is the
  *truncated* address the gateway resolved, never a value from the payload;
- ``request`` keeps the method, the URL (scrubbed, allowlisted query; only its origin without ``url`` in
  ``fields``) and the User-Agent / Referer headers its ``fields`` allow; cookies, ``query_string``, ``data``,
  ``env`` and every other header are removed;
- stack frames lose their local variables (``vars``); URLs anywhere (breadcrumbs, spans, frames, transaction names)
  go through the URL scrubber; every other string through the free-text scrubber (e-mail addresses, tokens, IP
  addresses, long numbers become the placeholder). Ids Sentry needs (event, trace, span, session) are kept only when
  they have an id's exact shape.

:func:`make_before_send` applies the same to the Python SDK's events (``sentry_sdk.init(before_send=...)``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from gateway.config import DestinationSettings, Settings
from gateway.policy import DestinationPolicy, is_sensitive, origin, scrub_text

__all__ = ["SentryScrubber", "make_before_send"]

# Ids Sentry uses to group and link: exact hex/uuid shapes only (anything else is scrubbed as text).
_ID_KEYS: Final = frozenset(
    {"event_id", "trace_id", "span_id", "parent_span_id", "sid", "profile_id", "replay_id", "segment_id", "check_in_id"}
)
_ID: Final = re.compile(
    r"[0-9a-fA-F]{16}|[0-9a-fA-F]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
# Release and environment names ("my-app@1.2.3", "production") are kept as they are when they have that shape and
# nothing in them looks sensitive; otherwise they are free text (a commit-hash release becomes the placeholder).
_RELEASE: Final = re.compile(r"[A-Za-z0-9_.+\-]{1,100}(?:@[0-9][A-Za-z0-9_.+\-]{0,100})?")
# Keys whose values are dropped wherever they appear: cookies, credentials, raw bodies, environments and locals.
_DROPPED_KEYS: Final = frozenset(
    {"cookies", "cookie", "env", "data_raw", "vars", "query_string", "authorization", "did", "user", "ip_address",
     "user_id", "user_segment", "email", "username", "sentry.user.ip", "client.address", "user.ip", "user.email",
     "user.id", "user.username", "http.query", "url.query"}
)  # fmt: skip
# Keys whose string values are URLs or paths of the site.
_URL_KEYS: Final = frozenset(
    {"url", "from", "to", "href", "src", "abs_path", "filename", "transaction", "http.url", "url.full", "referer"}
)
_URL_IN_TEXT: Final = re.compile(r"https?://[^\s\"'<>]+")
_NUMERIC: Final = (int, float)
_MAX_TEXT: Final = 8192
_MAX_DEPTH: Final = 32


class SentryScrubber:
    """Minimise Sentry SDK payloads for one ``kind = "sentry"`` destination."""

    def __init__(self, dest: DestinationSettings, settings: Settings) -> None:
        self.policy = DestinationPolicy(dest, settings)
        self.fields = frozenset(dest.fields)
        self.placeholder = settings.urls.placeholder
        self._site = "http://site.invalid"  # stands in for the host of a relative path while it is scrubbed

    # --- single values --------------------------------------------------------------------------------------

    def text(self, value: str) -> str:
        """Free text: URLs inside it scrubbed as URLs, then e-mails, tokens, addresses and long numbers replaced."""
        value = value[:_MAX_TEXT]
        if "{{auto}}" in value:  # asks Sentry to fill in the sender's address: never passed on, wherever it is
            value = value.replace("{{auto}}", self.placeholder)
        if "://" in value:
            value = _URL_IN_TEXT.sub(lambda m: self.url(m.group()), value)
        return scrub_text(value, self.placeholder)

    def url(self, value: str) -> str:
        """A URL or site path as Sentry may see it: scrubbed, allowlisted query; the origin only without ``url``."""
        stripped = value.strip()[:_MAX_TEXT]
        if stripped.startswith(("http://", "https://")):
            scrubbed = self.policy.page_url(stripped)
            if scrubbed is None:
                return self.placeholder
            return scrubbed if "url" in self.fields else (origin(scrubbed) or self.placeholder)
        if stripped.startswith("/") and not stripped.startswith("//"):
            if "url" not in self.fields:
                return "/"
            scrubbed = self.policy.page_url(self._site + stripped)
            return scrubbed.removeprefix(self._site) if scrubbed else self.placeholder
        return self.text(stripped)  # "GET /x", "<anonymous>", "app.js": text rules

    # --- structures -----------------------------------------------------------------------------------------

    def walk(self, value: Any, key: str = "", depth: int = 0) -> Any:
        """Every string in ``value`` scrubbed by its key's rule; dropped keys removed; structure kept."""
        if depth > _MAX_DEPTH:
            return None
        if isinstance(value, str):
            if key in _ID_KEYS:
                return value if _ID.fullmatch(value) else self.placeholder
            if key in ("release", "dist", "environment"):
                plain = _RELEASE.fullmatch(value) is not None and not is_sensitive(value.replace("@", " "))
                return value if plain else self.text(value)
            if key in _URL_KEYS or key.endswith("_url"):
                return self.url(value)
            return self.text(value)
        if isinstance(value, bool) or value is None or isinstance(value, _NUMERIC):
            return value
        if isinstance(value, Mapping):
            result: dict[str, Any] = {}
            for sub_key, sub_value in value.items():
                name = str(sub_key)
                lowered = name.lower()
                if lowered in _DROPPED_KEYS:
                    continue
                # Keys can carry data too (a dict keyed by e-mail address): scrubbed like text unless plainly a name.
                clean_key = name if _is_plain_key(name) and not is_sensitive(name) else self.text(name)
                result[clean_key] = self.walk(sub_value, lowered, depth + 1)
            return result
        if isinstance(value, list | tuple):
            return [self.walk(item, key, depth + 1) for item in value]
        return None  # not JSON: nothing Sentry needs

    def _request(self, request: Any) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if not isinstance(request, Mapping):
            return result
        url = request.get("url")
        if isinstance(url, str) and url:
            result["url"] = self.url(url)
        method = request.get("method")
        if isinstance(method, str) and method.isalpha() and len(method) <= 16:
            result["method"] = method.upper()
        headers = request.get("headers")
        kept: dict[str, str] = {}
        items: list[tuple[Any, Any]] = []
        if isinstance(headers, Mapping):
            items = list(headers.items())
        elif isinstance(headers, list):  # the Python SDK may send [[name, value], ...]
            items = [(h[0], h[1]) for h in headers if isinstance(h, list | tuple) and len(h) == 2]
        for name, value in items:
            if not isinstance(name, str) or not isinstance(value, str):
                continue
            lowered = name.lower()
            if lowered == "user-agent" and "user_agent" in self.fields:
                kept["User-Agent"] = self.policy.user_agent(value)
            elif lowered == "referer" and "referrer" in self.fields and isinstance(url, str):
                reduced = self.policy.referrer(value, url)
                if reduced:
                    kept["Referer"] = reduced
        if kept:
            result["headers"] = kept
        return result

    def event(self, event: Mapping[str, Any], client_ip: str) -> dict[str, Any]:
        """An ``event`` or ``transaction`` payload, minimised. ``client_ip``: the truncated address, or ""."""
        cleaned: dict[str, Any] = self.walk({k: v for k, v in event.items() if k not in ("user", "request")})
        user = self._user(client_ip)
        if user:
            cleaned["user"] = user
        if "request" in event:
            cleaned["request"] = self._request(event["request"])
        return cleaned

    def session(self, session: Mapping[str, Any], client_ip: str) -> dict[str, Any]:
        """A ``session`` or ``sessions`` payload: no distinct id; the address per ``fields``, truncated."""
        attrs = session.get("attrs")
        cleaned: dict[str, Any] = self.walk({k: v for k, v in session.items() if k != "attrs"})
        if isinstance(attrs, Mapping):
            clean_attrs: dict[str, Any] = self.walk({k: v for k, v in attrs.items() if k != "user_agent"})
            if "ip" in self.fields and client_ip:
                clean_attrs["ip_address"] = client_ip
            user_agent = attrs.get("user_agent")
            if "user_agent" in self.fields and isinstance(user_agent, str):
                clean_attrs["user_agent"] = self.policy.user_agent(user_agent)
            cleaned["attrs"] = clean_attrs
        return cleaned

    def envelope_header(self, header: Mapping[str, Any]) -> dict[str, Any]:
        cleaned: dict[str, Any] = {}
        for key in ("event_id", "sent_at", "sdk"):
            if key in header:
                cleaned[key] = self.walk(header[key], key)
        trace = header.get("trace")
        if isinstance(trace, Mapping):
            allowed = ("trace_id", "public_key", "release", "environment", "transaction", "sample_rate", "sampled")
            cleaned["trace"] = self.walk({k: v for k, v in trace.items() if k in allowed})
        return cleaned

    def _user(self, client_ip: str) -> dict[str, str]:
        if "ip" in self.fields and client_ip:
            return {"ip_address": self.policy.ip(client_ip)}  # truncated again: the invariant holds regardless
        return {}


def _is_plain_key(name: str) -> bool:
    return len(name) <= 64 and name.replace("_", "").replace(".", "").replace("-", "").isalnum()


def make_before_send(
    settings: Settings, destination: str | None = None
) -> Callable[[dict[str, Any], dict[str, Any]], dict[str, Any] | None]:
    """A ``before_send`` for the Python SDK that applies the destination's policy to server-side events::

        sentry_sdk.init(dsn=..., before_send=make_before_send(load_settings("config/gateway.toml")))

    ``destination``: the ``[destinations.NAME]`` of kind sentry (default: the only one). The address is taken from
    ``user.ip_address`` or ``request.env.REMOTE_ADDR`` (behind the gateway already truncated) and truncated again.
    """
    candidates = [d for d in settings.destinations.values() if d.kind == "sentry"]
    if destination is not None:
        candidates = [d for d in candidates if d.name == destination]
    if len(candidates) != 1:
        raise ValueError("make_before_send needs exactly one sentry destination (name it with destination=...)")
    scrubber = SentryScrubber(candidates[0], settings)

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
        address = ""
        user = event.get("user")
        if isinstance(user, Mapping) and isinstance(user.get("ip_address"), str):
            address = user["ip_address"]
        request = event.get("request")
        if not address and isinstance(request, Mapping) and isinstance(request.get("env"), Mapping):
            remote = request["env"].get("REMOTE_ADDR")
            address = remote if isinstance(remote, str) else ""
        return scrubber.event(event, scrubber.policy.ip(address) if address else "")

    return before_send
