"""The gateway's cookies on the request path: reading one cookie's values, and owning the names it sets.

:func:`cookie_values` is shared by the consent cookie and the analytics id cookie: both run on the request path,
where a full cookie parser (http.cookies) would cost far more than the single ``bytes.find`` most requests stop at.
:class:`OwnedCookies` keeps an app or upstream from setting those names (see its docstring).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from starlette.types import Message, Send

from gateway.logs import get_logger, log_event

__all__ = ["CookieGuard", "OwnedCookies", "cookie_values"]

_logger = get_logger("cookies")

_OWS: Final = b" \t"


def cookie_values(header: bytes, name_eq: bytes, start: int | None = None) -> Iterator[bytes]:
    """Every value of the cookie ``name_eq`` (``b"name="``) in one Cookie header, in order.

    RFC 6265 §5.4: ``name=value`` pairs joined by ``"; "``; a match counts only at the start of the header or after
    a ``;`` (so ``xname=`` is not ``name=``), and a DQUOTE-wrapped value is unwrapped. ``start``: where
    ``header.find(name_eq)`` is, if the caller has looked already.
    """
    if start is None:
        start = header.find(name_eq)
    while start != -1:
        before = start - 1
        while before >= 0 and header[before] in _OWS:
            before -= 1
        end = header.find(b";", start)
        if before < 0 or header[before] == 0x3B:  # ";"
            value = header[start + len(name_eq) : end if end != -1 else len(header)].strip(_OWS)
            if len(value) >= 2 and value[0] == 0x22 and value[-1] == 0x22:  # DQUOTE-wrapped cookie-value
                value = value[1:-1]
            yield value
        if end == -1:
            return
        start = header.find(name_eq, end)


class OwnedCookies:
    """The gateway's own cookie names (consent, analytics id): only the gateway may set them.

    An app or upstream that sends ``Set-Cookie`` for one of them (a buggy page, user content on the site, a copied
    snippet) could clear or overwrite a visitor's recorded choice. Such headers are removed from the response
    before it leaves, with one warning per name per :attr:`warn_interval` seconds (the cookie's value is never
    logged: it may be somebody's consent id).
    """

    __slots__ = ("_clock", "_last_warned", "_names", "_suppressed", "warn_interval")

    def __init__(
        self, names: Iterable[str], *, warn_interval: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._names: frozenset[bytes] = frozenset(name.encode("ascii") for name in names)
        self.warn_interval = warn_interval
        self._clock = clock
        self._last_warned: dict[bytes, float] = {}
        self._suppressed: dict[bytes, int] = {}

    @property
    def names(self) -> frozenset[str]:
        return frozenset(name.decode("ascii") for name in self._names)

    def owns(self, set_cookie_value: bytes) -> bytes | None:
        """The cookie name if this ``Set-Cookie`` value sets one of ours, else None.

        RFC 6265 §5.2: the name is everything before the first ``=`` of the first ``;``-separated part, with
        surrounding whitespace removed; a part without ``=`` sets a nameless cookie, which is not ours.
        """
        pair_end = set_cookie_value.find(b";")
        pair = set_cookie_value if pair_end < 0 else set_cookie_value[:pair_end]
        equals = pair.find(b"=")
        if equals < 0:
            return None
        name = pair[:equals].strip(b" \t")
        return name if name in self._names else None

    def strip_start(self, message: Message) -> Message:
        """``message`` unchanged, or (for a response start with a Set-Cookie of ours) a copy without those headers.

        Never raises: headers it cannot read are left for the server to judge, as everywhere else in the gateway.
        """
        try:
            kind = message.get("type")
            if kind != "http.response.start" and kind != "websocket.accept":
                return message
            headers = message.get("headers")
            if not headers:
                return message
            if not isinstance(headers, list | tuple):
                headers = list(headers)  # an iterable can be walked once only: keep what was read
                message = {**message, "headers": headers}
            kept: list[Any] | None = None
            for index, header in enumerate(headers):
                name = header[0]
                # ASGI names are lower case: lower (a copy) only a name that is not.
                if name != b"set-cookie" and (
                    type(name) is not bytes or name.islower() or name.lower() != b"set-cookie"
                ):
                    if kept is not None:
                        kept.append(header)
                    continue
                owned = self.owns(bytes(header[1]))
                if owned is None:
                    if kept is not None:
                        kept.append(header)
                    continue
                if kept is None:
                    kept = list(headers[:index])
                self._warn(owned)
            if kept is None:
                return message
            return {**message, "headers": kept}
        except Exception:
            return message

    def _warn(self, name: bytes) -> None:
        now = self._clock()
        last = self._last_warned.get(name)
        if last is not None and now - last < self.warn_interval:
            self._suppressed[name] = self._suppressed.get(name, 0) + 1
            return
        self._last_warned[name] = now
        suppressed = self._suppressed.pop(name, 0)
        log_event(
            _logger,
            logging.WARNING,
            "response.owned_cookie_removed",
            cookie=name.decode("ascii"),
            reason="the app or upstream tried to set a cookie the gateway owns",
            suppressed_since_last_warning=suppressed,
        )


class CookieGuard:
    """A ``send`` that removes Set-Cookie headers for the gateway's own cookie names from the response start
    (or a websocket's accept message).

    Used where no other wrapper watches the response; the banner injector and the page-view watcher do the same
    themselves, so a response never passes through two wrappers.
    """

    __slots__ = ("_owned", "_send", "_started")

    def __init__(self, send: Send, owned: OwnedCookies) -> None:
        self._send = send
        self._owned = owned
        self._started = False

    async def __call__(self, message: Message) -> None:
        if not self._started:
            self._started = True
            message = self._owned.strip_start(message)
        await self._send(message)
