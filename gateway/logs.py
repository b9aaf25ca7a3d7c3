"""The gateway's own logs: one JSON object per line (docs/security.md T6).

Header values, paths and user agents are attacker-controlled text. Written raw, a ``\\r\\n`` starts a forged log line
and ``\\x1b[`` rewrites the operator's terminal (uvicorn's CVE-2020-7694). :func:`json.dumps` with ``ensure_ascii``
escapes every control character and every non-ASCII character (U+2028 too), so one record is always exactly one
line of printable ASCII, whatever the fields contain.

Log only what is already minimised: the access log gets the *truncated* client address and the path without its
query string, where e-mail addresses and tokens live.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import math
import re
import sys
import time
from typing import TextIO

__all__ = ["JSONFormatter", "access_log", "configure_logging", "get_logger", "log_event"]

ROOT_LOGGER = "gateway"
ACCESS_LOGGER = "gateway.access"
ACCESS_EVENT = "http.request"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_FIELDS_ATTRIBUTE = "gateway_fields"
_RESERVED = frozenset({"ts", "level", "logger", "event", "exc", "stack"})
# Long enough for any real path or method; a 64 KB path would otherwise become a 64 KB log line per request.
_MAX_PATH = 2048
_MAX_METHOD = 32

FieldValue = str | int | float | bool | None


def _clean(value: object) -> FieldValue:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        # NaN/Infinity are not JSON; keep them readable instead of emitting an invalid line.
        return value if math.isfinite(value) else repr(value)
    return str(value)


class JSONFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "event": ..., <fields>}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            # A bad %-format would make logging print its own unescaped "--- Logging error ---" to stderr.
            message = f"{record.msg} (unformattable arguments)"
        entry: dict[str, FieldValue] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": message,
        }
        fields = getattr(record, _FIELDS_ATTRIBUTE, None)
        if isinstance(fields, dict):
            for name, value in fields.items():
                key = str(name)
                entry[f"{key}_" if key in _RESERVED else key] = _clean(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


class _JSONLinesHandler(logging.StreamHandler[TextIO]):
    """Marks the handler :func:`configure_logging` installed, so a second call replaces it."""


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send the ``gateway`` logger tree to ``stream`` (stderr) as JSON lines. Idempotent.

    Only the ``gateway`` logger is touched; the root logger and its handlers are left alone. ``gateway`` records do
    not propagate to the root: a foreign handler there would print them unescaped.
    """
    numeric = _LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(_LEVELS)})")
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, _JSONLinesHandler):
            logger.removeHandler(handler)
    handler = _JSONLinesHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JSONFormatter())
    logger.addHandler(handler)
    logger.setLevel(numeric)
    logger.propagate = False
    quiet_http_client_logs()


_SECRET_QUERY = re.compile(r"(?i)(api_secret=)[^&\s\"']*")


class _MaskSecrets(logging.Filter):
    """httpx logs every request URL at INFO; a GA4 Measurement Protocol URL carries ``api_secret`` in its query
    (protocols.md §2). Whatever level someone sets, the secret never reaches a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "api_secret=" in message.lower():
            record.msg = _SECRET_QUERY.sub(r"\1***", message)
            record.args = None
        return True


def quiet_http_client_logs() -> None:
    """Keep the HTTP client libraries' per-request INFO lines (full URLs) out of the logs, secrets masked."""
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)
        if not any(isinstance(f, _MaskSecrets) for f in logger.filters):
            logger.addFilter(_MaskSecrets())


def get_logger(name: str = ROOT_LOGGER) -> logging.Logger:
    """A logger inside the ``gateway`` tree (``"proxy"`` becomes ``gateway.proxy``)."""
    if name != ROOT_LOGGER and not name.startswith(ROOT_LOGGER + "."):
        name = f"{ROOT_LOGGER}.{name}"
    return logging.getLogger(name)


def log_event(logger: logging.Logger, level: int, event: str, /, **fields: FieldValue) -> None:
    """Log ``event`` (a constant name such as ``"sink.error"``) with structured fields.

    The first three arguments are positional-only, so any name can be a field. Fields named like the envelope keys
    (``ts``, ``level``, ``logger``, ``event``, ``exc``) are written with a trailing ``_``.
    Never pass a full client address, a raw query string or a secret as a field.
    """
    if logger.isEnabledFor(level):
        # The event is the message with no %-arguments, so a "%" in it is printed as is.
        logger.log(level, "%s", event, extra={_FIELDS_ATTRIBUTE: fields})


_access_logger = logging.getLogger(ACCESS_LOGGER)


def access_log(method: str, path: str, status: int, client: str, duration_ms: float) -> None:
    """One line per request: method, path without query or fragment, status, truncated client, duration."""
    if not _access_logger.isEnabledFor(logging.INFO):
        return
    # The query string holds PII (e-mail addresses, reset tokens); a fragment never should reach us but is cut too.
    cut = min((i for i in (path.find("?"), path.find("#")) if i >= 0), default=len(path))
    path = path[:cut]
    if len(path) > _MAX_PATH:
        path = path[:_MAX_PATH] + "..."
    log_event(
        _access_logger,
        logging.INFO,
        ACCESS_EVENT,
        method=method[:_MAX_METHOD],
        path=path,
        status=status,
        client=client,
        duration_ms=round(duration_ms, 3),
    )


class AccessLog:
    """The gateway's access log, kept off the request path.

    A request only appends a tuple to a bounded buffer (~0.2 µs); a background task formats the lines and writes
    them in one batch every ``interval`` seconds, in the same JSON-lines shape as :func:`access_log` (formatting
    and logging per request cost ~40 µs, more than everything else the gateway does). The path is logged without
    its query string and escaped; ``client`` must be the truncated address. When the buffer is full (the writer
    cannot keep up), further lines are counted and reported, never allowed to grow memory.
    """

    def __init__(self, stream: TextIO | None = None, *, interval: float = 0.25, max_lines: int = 50_000) -> None:
        self._stream = stream
        self._interval = interval
        self._max_lines = max_lines
        self._lines: list[tuple[float, str, str, int, str, float]] = []
        self._dropped = 0
        self._task: asyncio.Task[None] | None = None

    def record(self, method: str, path: str, status: int, client: str, duration_ms: float) -> None:
        if len(self._lines) < self._max_lines:
            self._lines.append((time.time(), method, path, status, client, duration_ms))
        else:
            self._dropped += 1

    def start(self) -> None:
        if self._task is None and _access_logger.isEnabledFor(logging.INFO):
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.flush()

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        dropped, self._dropped = self._dropped, 0
        if not lines and not dropped:
            return
        out: list[str] = []
        for created, method, path, status, client, duration_ms in lines:
            cut = min((i for i in (path.find("?"), path.find("#")) if i >= 0), default=len(path))
            path = path[:cut] if len(path[:cut]) <= _MAX_PATH else path[:_MAX_PATH] + "..."
            ts = datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat(timespec="milliseconds")
            out.append(
                f'{{"ts":"{ts}","level":"info","logger":"{ACCESS_LOGGER}","event":"{ACCESS_EVENT}",'
                f'"method":{json.dumps(method[:_MAX_METHOD])},"path":{json.dumps(path)},"status":{int(status)},'
                f'"client":{json.dumps(client)},"duration_ms":{round(duration_ms, 3)}}}\n'
            )
        if dropped:
            out.append(
                json.dumps({"ts": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
                            "level": "warning", "logger": ACCESS_LOGGER, "event": "access_log.dropped",
                            "lines": dropped}, separators=(",", ":")) + "\n"
            )  # fmt: skip
        stream = self._stream if self._stream is not None else _current_stream()
        try:
            stream.write("".join(out))
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not take the gateway down
            pass


def _current_stream() -> TextIO:
    """The stream configure_logging() set up for the gateway logger, else stderr."""
    for handler in logging.getLogger(ROOT_LOGGER).handlers:
        if isinstance(handler, _JSONLinesHandler):
            return handler.stream
    return sys.stderr
