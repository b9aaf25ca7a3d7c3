"""A fake Sentry ingest for tests: ``POST /api/{project_id}/envelope/`` parsed the way Sentry's relay parses it.

Written apart from the gateway's own parser on purpose (an independent check of what the gateway sends): the
envelope header must be a JSON object; each item a JSON header with a ``type`` and, when ``length`` is given,
exactly that many payload bytes followed by a newline or the end; ``event``/``transaction`` payloads must be JSON
objects. Authentication: ``X-Sentry-Auth`` (``sentry_key=...``) must name the project's key (``SENTRY_INGEST_KEYS``
= ``"42:publickey,43:otherkey"``). Anything else is answered 400/401/404 with the reason and recorded as rejected.
``GET /_records`` lists every request: path, headers, raw body (latin-1), status, problems.
``SENTRY_INGEST_RATE_LIMITS`` (optional) is sent back as ``X-Sentry-Rate-Limits`` on every answer.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

_PATH = re.compile(r"^/api/([0-9]+)/envelope/$")
_KEY = re.compile(r"sentry_key=([0-9A-Za-z]+)")


def parse(body: bytes) -> tuple[dict[str, Any], list[tuple[dict[str, Any], bytes]]]:
    lines = body.split(b"\n", 1)
    header = json.loads(lines[0])
    if not isinstance(header, dict):
        raise ValueError("envelope header is not an object")
    rest = lines[1] if len(lines) > 1 else b""
    items = []
    while rest:
        if rest.startswith(b"\n"):
            rest = rest[1:]
            continue
        line, _, rest = rest.partition(b"\n")
        item = json.loads(line)
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise ValueError("item header without a type")
        if "length" in item:
            length = item["length"]
            if not isinstance(length, int) or length < 0 or length > len(rest):
                raise ValueError("item length exceeds the envelope")
            payload, rest = rest[:length], rest[length:]
            if rest and not rest.startswith(b"\n"):
                raise ValueError("payload longer than its length")
        else:
            payload, _, rest = rest.partition(b"\n")
        if item["type"] in ("event", "transaction"):
            data = json.loads(payload)
            if not isinstance(data, dict):
                raise ValueError(f"{item['type']} payload is not an object")
        items.append((item, payload))
    return header, items


class SentryIngest:
    def __init__(self, keys: dict[str, str], rate_limits: str = "") -> None:
        self.keys = keys
        self.rate_limits = rate_limits
        self.records: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/_records":
            await self._answer(send, 200, json.dumps(self.records).encode(), rate_limited=False)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        problems: list[str] = []
        status = 200
        match = _PATH.match(scope["path"])
        if scope["method"] != "POST" or match is None:
            status, problems = 404, [f"{scope['method']} {scope['path']}"]
        else:
            key = _KEY.search(headers.get("x-sentry-auth", ""))
            if key is None or self.keys.get(match.group(1)) != key.group(1):
                status, problems = 401, ["bad or missing sentry_key"]
            else:
                try:
                    parse(body)
                except (ValueError, UnicodeDecodeError) as exc:
                    status, problems = 400, [f"malformed envelope: {exc}"]
        self.records.append(
            {"path": scope["path"], "headers": headers, "body": body.decode("latin-1"), "status": status,
             "problems": problems}
        )  # fmt: skip
        answer = json.dumps({"id": "0" * 32} if status == 200 else {"detail": problems[0]}).encode()
        await self._answer(send, status, answer, rate_limited=True)

    async def _answer(self, send: Any, status: int, body: bytes, *, rate_limited: bool) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if rate_limited and self.rate_limits:
            headers.append((b"x-sentry-rate-limits", self.rate_limits.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def ingest_app() -> SentryIngest:
    keys = dict(pair.split(":", 1) for pair in os.environ.get("SENTRY_INGEST_KEYS", "42:publickey").split(","))
    return SentryIngest(keys, os.environ.get("SENTRY_INGEST_RATE_LIMITS", ""))
