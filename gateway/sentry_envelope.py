"""Sentry envelopes: the framing the SDKs send, parsed strictly, and DSNs.

An envelope (https://develop.sentry.dev/sdk/envelopes/) is a JSON header line, then items: each an item header line
(JSON with ``type`` and optionally ``length``) and a payload: exactly ``length`` bytes when given (then an optional
newline), otherwise everything up to the next newline. The tunnel parses the framing on the request path (to refuse
a foreign DSN, oversized or malformed input with a 4xx); item payloads are scrubbed off the request path, in the
dispatcher (gateway.sinks.sentry).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Final
from urllib.parse import urlsplit

__all__ = ["MAX_ENVELOPE_BYTES", "MAX_ITEMS", "Dsn", "Envelope", "EnvelopeError", "parse_dsn", "parse_envelope"]

# Sentry's own ingest caps an event at 1 MB (https://develop.sentry.dev/sdk/expected-features/data-handling/): a
# browser error is a few KB; the rest would be replays and attachments, which are off by default anyway.
MAX_ENVELOPE_BYTES: Final = 1_048_576
MAX_ITEMS: Final = 100
_MAX_HEADER_BYTES: Final = 16_384


class EnvelopeError(Exception):
    """Input the tunnel refuses: ``status`` (400, 403, 413) and a short reason for the answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class Dsn:
    """A Sentry DSN's parts: where envelopes go and the key that authenticates them."""

    text: str
    public_key: str
    envelope_url: str  # {scheme}://{host}[:port][/path]/api/{project_id}/envelope/
    project_id: str


def parse_dsn(text: str) -> Dsn | None:
    """https://develop.sentry.dev/sdk/overview/#parsing-the-dsn; None for anything else."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.username:
        return None
    path, _, project_id = parts.path.rstrip("/").rpartition("/")
    if not project_id.isdigit():
        return None
    netloc = parts.hostname + (f":{port}" if port else "")
    return Dsn(text.strip(), parts.username, f"{parts.scheme}://{netloc}{path}/api/{project_id}/envelope/", project_id)


@dataclasses.dataclass(slots=True)
class Envelope:
    header: dict[str, Any]
    items: list[tuple[dict[str, Any], bytes]]

    def dumps(self) -> bytes:
        """The envelope as bytes, every item with an explicit ``length`` (unambiguous for any payload)."""
        out = [json.dumps(self.header, separators=(",", ":")).encode()]
        for header, payload in self.items:
            item_header = {**header, "length": len(payload)}
            out.append(json.dumps(item_header, separators=(",", ":")).encode())
            out.append(payload)
        return b"\n".join(out) + b"\n"


def _json_line(line: bytes, what: str) -> dict[str, Any]:
    if len(line) > _MAX_HEADER_BYTES:
        raise EnvelopeError(400, f"{what} too long")
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise EnvelopeError(400, f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise EnvelopeError(400, f"{what} is not a JSON object")
    return value


def parse_envelope(body: bytes, *, max_items: int = MAX_ITEMS) -> Envelope:
    """Parse the framing; raise :class:`EnvelopeError` (400 malformed, 413 too many items)."""
    end = body.find(b"\n")
    header = _json_line(body if end < 0 else body[:end], "envelope header")
    pos = len(body) if end < 0 else end + 1
    items: list[tuple[dict[str, Any], bytes]] = []
    size = len(body)
    while pos < size:
        line_end = body.find(b"\n", pos)
        line = body[pos:] if line_end < 0 else body[pos:line_end]
        if not line.strip():  # trailing newline(s)
            pos = size if line_end < 0 else line_end + 1
            continue
        item_header = _json_line(line, "item header")
        item_type = item_header.get("type")
        if not isinstance(item_type, str) or not item_type:
            raise EnvelopeError(400, "item without a type")
        pos = size if line_end < 0 else line_end + 1
        length = item_header.get("length")
        if length is not None:
            if isinstance(length, bool) or not isinstance(length, int) or length < 0 or pos + length > size:
                raise EnvelopeError(400, "item length does not match the envelope")
            payload = body[pos : pos + length]
            pos += length
            if pos < size:
                if body[pos : pos + 1] != b"\n":
                    raise EnvelopeError(400, "item payload is longer than its length")
                pos += 1
        else:
            payload_end = body.find(b"\n", pos)
            payload = body[pos:] if payload_end < 0 else body[pos:payload_end]
            pos = size if payload_end < 0 else payload_end + 1
        items.append((item_header, payload))
        if len(items) > max_items:
            raise EnvelopeError(413, f"more than {max_items} items")
    return Envelope(header, items)
