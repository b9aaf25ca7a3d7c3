"""Consent endpoints: ``{prefix}/consent`` (GET state, POST choice, DELETE withdrawal) and ``/.well-known/gpc.json``.

``GET {prefix}/consent`` returns the state the banner needs (it never reads the HttpOnly cookie itself)::

    {"choice_made": false, "revision": "…", "gpc": false, "consent_id": "",
     "categories": {"analytics": {"granted": false, "label": "…", "description": "…"}}}

``POST {prefix}/consent`` takes either JSON ``{"categories": {"analytics": true}}`` (204 + Set-Cookie; categories not
named are refused) or the no-JS banner's form (``application/x-www-form-urlencoded``): ``action`` =
``accept_all`` | ``reject_all`` | ``save``, ``category`` repeated for each ticked box (used by ``save``), and ``next``,
a same-site path to return to (303). ``DELETE`` withdraws: the cookie becomes an explicit refusal and the
first-party analytics id cookie is expired (GDPR Art 7(3): withdrawing is as easy as giving).

Cross-site request forgery (security.md T9): a cross-site auto-submitted form is a top-level navigation, and
SameSite=Lax does not stop a response from *setting* a cookie, so writes must prove they come from the site:

* ``Sec-Fetch-Site: same-origin`` is accepted; any other value (``same-site``, ``cross-site``, ``none``) is 403
  (https://w3c.github.io/webappsec-fetch-metadata/; OWASP accepts Fetch Metadata as the primary defence);
* without it (old browsers), ``Origin`` must exactly match one of ``site.origins`` (or, when that list is empty,
  the request's own ``scheme://Host``); without ``Origin``, the ``Referer``'s origin must;
* a write with none of the three is refused: every browser that can run the banner sends at least one of them on a
  POST or DELETE, so their absence means a non-browser client or a privacy tool stripping them, and a consent
  nobody can tie to the site's own page is not a "clear affirmative act" (GDPR Art 4(11)).

A refused write gets 403 and no Set-Cookie. Bodies are capped at 4 KiB and read with a 5 s timeout.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

import anyio
from starlette.types import Receive, Scope, Send

from gateway.config import Settings
from gateway.consent import ConsentChoice, ConsentManager, category_texts
from gateway.receipts import Method, Receipt, ReceiptStore

__all__ = ["BODY_TIMEOUT", "GPC_LAST_UPDATE", "MAX_BODY_BYTES", "ConsentAPI", "safe_next_path"]

logger = logging.getLogger("gateway.consent")

MAX_BODY_BYTES: Final = 4096
BODY_TIMEOUT: Final = 5.0
# The date this site's GPC support last changed (https://privacycg.github.io/gpc-spec/#gpc-support-resource).
GPC_LAST_UPDATE: Final = "2025-01-01"
MAX_FORM_FIELDS: Final = 64
MAX_NEXT_LENGTH: Final = 2048
FORM_ACTIONS: Final = ("accept_all", "reject_all", "save")
RECEIPT_FAILED: Final = "consent receipt could not be written (%s); choice %s"

_JSON = b"application/json"
_FORM = b"application/x-www-form-urlencoded"
_CONSENT_ALLOW = b"GET, HEAD, POST, DELETE"
_GPC_ALLOW = b"GET, HEAD"
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class _Reject(Exception):
    """An answer other than success: status and a short reason for the visitor (never echoes input)."""

    def __init__(self, status: int, reason: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


class _Disconnected(Exception):
    """The client went away while we read its body: nothing to answer."""


def normalize_origin(text: str) -> str | None:
    """``scheme://host[:port]`` in canonical form (lower case, default port dropped), or None if it is not one."""
    try:
        parts = urlsplit(text.strip())
        scheme = parts.scheme.lower()
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if scheme not in _DEFAULT_PORTS or not host or parts.username is not None or parts.password is not None:
        return None
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def safe_next_path(value: str | None) -> str:
    """``next`` if it is a same-site absolute path, else ``/`` (no open redirect).

    Rejected: anything not starting with ``/``; ``//host`` and ``/\\host``, which browsers read as another host
    (https://url.spec.whatwg.org/ treats ``\\`` like ``/`` for http(s)); control characters, spaces and
    non-ASCII, because browsers strip tabs and newlines inside URLs (``/\\t/evil.example`` becomes
    ``//evil.example``) and a raw CR/LF would split the Location header.
    """
    if not value or len(value) > MAX_NEXT_LENGTH or value[0] != "/":
        return "/"
    if value.startswith(("//", "/\\")):
        return "/"
    if not all("\x21" <= ch <= "\x7e" for ch in value):
        return "/"
    return value


def _media_type(value: bytes) -> bytes:
    return value.split(b";", 1)[0].strip(b" \t").lower()


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError("duplicate key")
        result[key] = value
    return result


class ConsentAPI:
    """ASGI app for ``{prefix}/consent`` and ``/.well-known/gpc.json`` (the gateway's router sends it those paths)."""

    def __init__(
        self,
        settings: Settings,
        manager: ConsentManager,
        receipts: ReceiptStore | None,
        *,
        body_timeout: float = BODY_TIMEOUT,
    ) -> None:
        self._manager = manager
        self._receipts = receipts
        self._body_timeout = body_timeout
        self._consent_path = settings.prefix.rstrip("/") + "/consent"
        self._categories = manager.categories
        self._category_set = frozenset(manager.categories)
        self._texts = category_texts(settings)
        self._honor_dnt = settings.consent.honor_dnt
        configured = [normalize_origin(origin) for origin in settings.site.origins]
        self._allowed_origins = frozenset(origin for origin in configured if origin is not None)
        # Expiring the analytics id needs the same name, Path, Secure (and no Domain) it was set with (__Host-).
        self._expire_client_id = (
            f"{settings.analytics.client_id_cookie}=; Max-Age=0; Path=/; Secure; HttpOnly; SameSite=Lax"
        )
        # "gpc": true promises that this site honours the signal; say false when consent.honor_gpc is off.
        self._gpc_json = json.dumps(
            {"gpc": settings.consent.honor_gpc, "lastUpdate": GPC_LAST_UPDATE}, separators=(",", ":")
        ).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        head = method == "HEAD"
        try:
            if path == "/.well-known/gpc.json":
                if method not in ("GET", "HEAD"):
                    raise _Reject(405, "Method Not Allowed", ((b"allow", _GPC_ALLOW),))
                await _respond(
                    send, 200, self._gpc_json, b"application/json", cache=b"public, max-age=86400", head=head
                )
            elif path != self._consent_path:
                raise _Reject(404, "Not Found")
            elif method in ("GET", "HEAD"):
                await _respond(send, 200, self._state_json(scope["headers"]), b"application/json", head=head)
            elif method == "POST":
                await self._post(scope, receive, send)
            elif method == "DELETE":
                await self._withdraw(scope, send)
            else:
                raise _Reject(405, "Method Not Allowed", ((b"allow", _CONSENT_ALLOW),))
        except _Reject as reject:
            await _respond(send, reject.status, reject.reason.encode() + b"\n", extra=reject.headers, head=head)
        except _Disconnected:
            return

    # ---------------------------------------------------------------------------------------------- GET

    def _state_json(self, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
        decision = self._manager.decide(headers)
        choice = decision.choice
        state = {
            "choice_made": choice is not None,
            "revision": self._manager.revision,
            "gpc": decision.gpc,
            "consent_id": choice.consent_id if choice is not None else "",
            "categories": {
                name: {"granted": name in decision.granted, "label": label, "description": description}
                for name, (label, description) in self._texts.items()
            },
        }
        return json.dumps(state, separators=(",", ":")).encode()

    # ---------------------------------------------------------------------------------------------- writes

    async def _post(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        self._check_same_origin(scope, headers)
        content_types = [value for name, value in headers if name == b"content-type"]
        media = _media_type(content_types[0]) if len(content_types) == 1 else b""
        if media == _JSON:
            body = await self._read_body(headers, receive)
            choices = self._parse_json(body)
            choice = self._new_choice(headers, choices)
            await self._store(send, choice, "api", status=204)
        elif media == _FORM:
            body = await self._read_body(headers, receive)
            choices, next_path = self._parse_form(body)
            choice = self._new_choice(headers, choices)
            await self._store(send, choice, "banner", status=303, location=next_path)
        else:
            raise _Reject(415, "Unsupported Media Type: send application/json or a form")

    async def _withdraw(self, scope: Scope, send: Send) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        self._check_same_origin(scope, headers)
        choice = self._new_choice(headers, dict.fromkeys(self._categories, False))
        await self._store(send, choice, "withdraw", status=204)

    def _new_choice(self, headers: Sequence[tuple[bytes, bytes]], choices: Mapping[str, bool]) -> ConsentChoice:
        decision = self._manager.decide(headers)
        # Recorded so that a grant given while the visitor's browser sent an opt-out signal keeps holding under it.
        signal = decision.gpc or (self._honor_dnt and decision.dnt)
        return self._manager.make_choice(choices, signal, self._manager.previous_consent_id(headers))

    async def _store(
        self, send: Send, choice: ConsentChoice, method: Method, *, status: int, location: str = ""
    ) -> None:
        grants = any(choice.choices.values())
        if not await self._record(Receipt.from_choice(choice, method)) and grants:
            # Without a receipt the grant could not be proven later (GDPR Art 7(1)): do not store it. A refusal is
            # always stored, since honouring it needs no proof.
            raise _Reject(503, "Service Unavailable: the choice could not be recorded, please try again")
        extra: list[tuple[bytes, bytes]] = [(b"set-cookie", self._manager.set_cookie_header(choice))]
        if not all(choice.choices.values()):
            # Any refused category also ends the first-party analytics id: no id may outlive the consent it needs.
            extra.append((b"set-cookie", self._expire_client_id.encode("latin-1")))
        if location:
            extra.append((b"location", location.encode("ascii")))
        await _respond(send, status, b"", None, extra=tuple(extra))

    async def _record(self, receipt: Receipt) -> bool:
        if self._receipts is None:
            return True
        try:
            # A worker thread: an fsync or WAL checkpoint on a slow disk must not stall the event loop.
            await anyio.to_thread.run_sync(self._receipts.append, receipt)
        except (sqlite3.Error, OSError, ValueError) as exc:
            logger.error(RECEIPT_FAILED, type(exc).__name__, "granted" if any(receipt.choices.values()) else "refused")
            return False
        return True

    def _check_same_origin(self, scope: Scope, headers: Sequence[tuple[bytes, bytes]]) -> None:
        fetch_sites: list[bytes] = []
        origins: list[bytes] = []
        referers: list[bytes] = []
        hosts: list[bytes] = []
        for name, value in headers:
            if name == b"sec-fetch-site":
                fetch_sites.append(value)
            elif name == b"origin":
                origins.append(value)
            elif name == b"referer":
                referers.append(value)
            elif name == b"host":
                hosts.append(value)
        if fetch_sites:
            # Set by the browser itself (a forbidden header name for scripts), so it cannot be forged by a page.
            if all(value.strip(b" \t") == b"same-origin" for value in fetch_sites):
                return
            raise _Reject(403, "Forbidden: cross-site consent change")
        allowed = self._allowed_origins or self._own_origin(scope, hosts)
        if origins:
            if len(origins) == 1 and normalize_origin(origins[0].decode("latin-1")) in allowed:
                return
            raise _Reject(403, "Forbidden: Origin is not this site")
        if referers:
            if len(referers) == 1 and normalize_origin(referers[0].decode("latin-1")) in allowed:
                return
            raise _Reject(403, "Forbidden: Referer is not this site")
        raise _Reject(403, "Forbidden: a consent change needs Sec-Fetch-Site, Origin or Referer")

    @staticmethod
    def _own_origin(scope: Scope, hosts: list[bytes]) -> frozenset[str]:
        if len(hosts) != 1:
            return frozenset()
        scheme = scope.get("scheme", "http")
        origin = normalize_origin(f"{scheme}://{hosts[0].decode('latin-1')}")
        return frozenset((origin,)) if origin is not None else frozenset()

    async def _read_body(self, headers: Sequence[tuple[bytes, bytes]], receive: Receive) -> bytes:
        lengths = [value for name, value in headers if name == b"content-length"]
        if lengths:
            text = lengths[0].strip(b" \t")
            if len(set(lengths)) != 1 or not text.isdigit():
                raise _Reject(400, "Bad Request: invalid Content-Length")
            if int(text) > MAX_BODY_BYTES:
                raise _Reject(413, "Content Too Large")
        chunks: list[bytes] = []
        size = 0
        # Count streamed bytes too: a chunked body has no Content-Length, and one may lie.
        with anyio.move_on_after(self._body_timeout) as timeout:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Disconnected
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise _Reject(413, "Content Too Large")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if timeout.cancelled_caught:
            raise _Reject(408, "Request Timeout")
        return b"".join(chunks)

    def _parse_json(self, body: bytes) -> dict[str, bool]:
        try:
            data = json.loads(body, object_pairs_hook=_no_duplicate_keys)
        except (ValueError, RecursionError):
            raise _Reject(400, "Bad Request: malformed JSON") from None
        if not isinstance(data, dict) or data.keys() != {"categories"} or not isinstance(data["categories"], dict):
            raise _Reject(400, 'Bad Request: expected {"categories": {"<name>": true|false}}')
        choices: dict[str, Any] = data["categories"]
        if not choices.keys() <= self._category_set:
            raise _Reject(400, "Bad Request: unknown consent category")
        if not all(isinstance(value, bool) for value in choices.values()):
            raise _Reject(400, "Bad Request: consent values must be true or false")
        return choices

    def _parse_form(self, body: bytes) -> tuple[dict[str, bool], str]:
        try:
            pairs = parse_qsl(
                body.decode("ascii"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS, errors="strict"
            )
        except (UnicodeDecodeError, ValueError):
            raise _Reject(400, "Bad Request: malformed form") from None
        actions = [value for key, value in pairs if key == "action"]
        ticked = [value for key, value in pairs if key == "category"]
        nexts = [value for key, value in pairs if key == "next"]
        if len(actions) != 1 or actions[0] not in FORM_ACTIONS:
            raise _Reject(400, "Bad Request: action must be one of accept_all, reject_all, save")
        if not set(ticked) <= self._category_set:
            raise _Reject(400, "Bad Request: unknown consent category")
        if len(nexts) > 1:
            raise _Reject(400, "Bad Request: several next fields")
        action = actions[0]
        if action == "accept_all":
            choices = dict.fromkeys(self._categories, True)
        elif action == "reject_all":
            choices = dict.fromkeys(self._categories, False)
        else:
            choices = {name: name in ticked for name in self._categories}
        return choices, safe_next_path(nexts[0] if nexts else None)


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes | None = b"text/plain; charset=utf-8",
    *,
    extra: tuple[tuple[bytes, bytes], ...] = (),
    cache: bytes = b"no-store",
    head: bool = False,
) -> None:
    headers = [(b"cache-control", cache), (b"x-content-type-options", b"nosniff")]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    if status != 204:  # RFC 9110 §8.6: no Content-Length in a 204
        headers.append((b"content-length", str(len(body)).encode()))
    headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})
