"""Reading a request body with a size cap and a deadline, for the gateway's own POST endpoints.

Counted while streaming, never reading more than the cap plus one chunk, so an oversized body costs bounded memory
whatever its Content-Length claimed.
"""

from __future__ import annotations

import anyio
from starlette.types import Receive

__all__ = ["BodyTooLarge", "BodyTooSlow", "ClientGone", "read_body"]


class BodyTooLarge(Exception):
    """More than the cap arrived (answer 413)."""


class BodyTooSlow(Exception):
    """The body did not arrive within the deadline (answer 408)."""


class ClientGone(Exception):
    """The client disconnected before the body was complete (answer nothing)."""


async def read_body(receive: Receive, limit: int, timeout: float) -> bytes:
    body = bytearray()
    try:
        with anyio.fail_after(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                if message["type"] != "http.request":
                    continue
                chunk = message.get("body", b"")
                if len(body) + len(chunk) > limit:
                    raise BodyTooLarge
                body += chunk
                if not message.get("more_body", False):
                    return bytes(body)
    except TimeoutError:
        raise BodyTooSlow from None
