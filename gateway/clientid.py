"""The first-party analytics id cookie, for destinations that identify a browser by a client id (GA4).

The id is a GA-style client id, ``"<10 random digits>.<unix seconds>"``, made on our side: no third-party script
and no third-party cookie. The cookie (``analytics.client_id_cookie``, default ``__Host-gw_cid``) holds the id
signed with itsdangerous' ``TimestampSigner`` under its own salt and the consent keys (``consent.secret_keys``;
oldest first, the newest signs, all verify), so a visitor cannot pick someone else's id or make one up, and a
token signed for anything else (the consent cookie, sessions) is never accepted as an id.

The middleware sets the cookie only when the consent some id-using destination needs is granted, and the server
refuses tokens older than ``consent.max_age_days`` whatever the browser does with ``Max-Age``. ``__Host-`` pins the
cookie to this host (Secure, ``Path=/``, no Domain; RFC 6265bis §4.1.3.2), so a sibling subdomain cannot plant one.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Iterable
from typing import Final

from itsdangerous import BadData, TimestampSigner

from gateway.caches import remember
from gateway.config import Settings
from gateway.cookies import cookie_values

__all__ = ["CLIENT_ID_SALT", "ClientIdCookie"]

CLIENT_ID_SALT: Final = "gateway.client-id.v1"
# CNIL: identifiers stored on the terminal may live at most 13 months; config validation bounds max_age_days too.
MAX_AGE_DAYS_LIMIT: Final = 395
# Verified tokens kept in memory; a hit skips the HMAC (expiry is still checked on every hit).
TOKEN_CACHE_SIZE: Final = 4096

_CLIENT_ID: Final = re.compile(r"[1-9][0-9]{9}\.[0-9]{1,12}")
# "<id>.<timestamp>.<signature>" in itsdangerous' URL-safe base64; anything else is not worth an HMAC. Its base64
# decoder skips characters outside the alphabet, so without this check junk inside a token could still verify.
_TOKEN: Final = re.compile(rb"[1-9][0-9]{9}\.[0-9]{1,12}\.[A-Za-z0-9_-]{1,16}\.[A-Za-z0-9_-]{16,128}")
_MAX_TOKEN_BYTES: Final = 200
_B64_VALUE: Final = {c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}


def _canonical(token: bytes) -> bool:
    """The timestamp and signature segments use no padding bits, so each token has exactly one spelling.

    Python's base64 decoder ignores the unused low bits of the last character; without this check, changing that
    character could still verify (harmless, the signed bytes are the same, but a token should have one form).
    """
    for segment in token.rsplit(b".", 2)[1:]:
        rest = len(segment) % 4
        if rest == 1:
            return False
        last = _B64_VALUE[segment[-1]]
        if (rest == 2 and last & 0x0F) or (rest == 3 and last & 0x03):
            return False
    return True


class ClientIdCookie:
    """Makes, signs, reads and expires the analytics id cookie. One per process; :meth:`read` does no I/O."""

    __slots__ = ("_attributes", "_cache", "_name_eq", "_signer", "_token_cache_size", "cookie_name", "max_age")

    def __init__(self, settings: Settings, *, token_cache_size: int = TOKEN_CACHE_SIZE) -> None:
        if token_cache_size < 1:
            raise ValueError("token_cache_size must be at least 1")
        self._token_cache_size = token_cache_size
        days = settings.consent.max_age_days
        if not 1 <= days <= MAX_AGE_DAYS_LIMIT:
            raise ValueError(f"consent.max_age_days must be between 1 and {MAX_AGE_DAYS_LIMIT}")
        self.cookie_name: str = settings.analytics.client_id_cookie
        self.max_age: int = days * 86400
        keys = [str(key).encode("utf-8") for key in settings.consent.secret_keys] or [secrets.token_bytes(32)]
        # A list of keys (itsdangerous >= 2.0): the last one signs, every one verifies. HMAC-SHA256, not SHA-1.
        self._signer = TimestampSigner(keys, salt=CLIENT_ID_SALT, digest_method=hashlib.sha256)
        self._name_eq = self.cookie_name.encode("latin-1") + b"="
        self._attributes = "; Path=/; Secure; HttpOnly; SameSite=Lax"
        self._cache: dict[bytes, tuple[str, float]] = {}

    def read(self, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """The verified client id from the request's Cookie headers, or "" (absent, tampered or expired)."""
        return self.read_cookies([value for name, value in headers if name == b"cookie"])

    def read_cookies(self, cookies: Iterable[bytes], now: float | None = None) -> str:
        """:meth:`read` given the values of the request's Cookie headers, in order (the middleware reads them once).

        ``now``: ``time.time()`` if the caller has it at hand.
        """
        name_eq = self._name_eq
        for value in cookies:
            start = value.find(name_eq)  # cheap pre-check before any parsing (find: cheaper than "in" for bytes)
            if start != -1:
                for token in cookie_values(value, name_eq, start):
                    client_id = self._verify(token, time.time() if now is None else now)
                    if client_id:
                        # If a stale duplicate is also sent, the first valid one wins: each was signed by us.
                        return client_id
        return ""

    def new(self) -> tuple[str, bytes]:
        """A fresh client id and the full ``Set-Cookie`` header value that stores it."""
        client_id = f"{secrets.randbelow(9 * 10**9) + 10**9}.{int(time.time())}"
        token = self._signer.sign(client_id).decode("ascii")
        header = f"{self.cookie_name}={token}; Max-Age={self.max_age}{self._attributes}"
        return client_id, header.encode("latin-1")

    def expire_header(self) -> bytes:
        """A ``Set-Cookie`` value that deletes the cookie (same name, path and flags, ``Max-Age=0``)."""
        return f"{self.cookie_name}=; Max-Age=0{self._attributes}".encode("latin-1")

    def _verify(self, token: bytes, now: float) -> str:
        cached = self._cache.get(token)
        if cached is not None:
            if cached[1] > now:
                return cached[0]
            del self._cache[token]
            return ""
        if len(token) > _MAX_TOKEN_BYTES or not _TOKEN.fullmatch(token) or not _canonical(token):
            return ""
        try:
            value, signed_at = self._signer.unsign(token, max_age=self.max_age, return_timestamp=True)
            client_id = value.decode("ascii")
        except (BadData, ValueError, TypeError, OverflowError):
            return ""  # tampered, expired, other key or salt: fail closed, no id
        if not _CLIENT_ID.fullmatch(client_id):
            return ""
        remember(self._cache, token, (client_id, signed_at.timestamp() + self.max_age), self._token_cache_size)
        return client_id
