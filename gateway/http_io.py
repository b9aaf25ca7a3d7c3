"""Small HTTP pieces for the gateway's own endpoints: reading a request body with a cap and a deadline, and
sending a short answer.

A body is counted while it streams, never more than the cap plus one chunk is read, so an oversized body costs
bounded memory whatever its Content-Length claimed.
"""

from __future__ import annotations

import anyio
from starlette.types import Receive, Send

__all__ = ["BodyTooLarge", "BodyTooSlow", "ClientGone", "read_body", "send_simple"]


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


async def send_simple(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = b"text/plain; charset=utf-8",
    extra_headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    """A complete, uncacheable answer in two messages."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                (b"x-content-type-options", b"nosniff"),
                *extra_headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
