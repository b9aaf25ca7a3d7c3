"""Reading one cookie's values out of raw ``Cookie`` header bytes, without parsing the whole header.

Shared by the consent cookie and the analytics id cookie: both run on the request path, where a full cookie
parser (http.cookies) would cost far more than the single ``bytes.find`` that most requests stop at.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

__all__ = ["cookie_values"]

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
