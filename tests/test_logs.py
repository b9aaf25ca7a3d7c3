"""JSON-lines logging (security.md T6): hostile text stays inside one escaped line; no query strings in the log."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.logs import access_log, configure_logging, get_logger, log_event


@pytest.fixture(autouse=True)
def restore_gateway_logger() -> Iterator[None]:
    """configure_logging changes process-wide logger state; put it back for the other test modules."""
    logger = logging.getLogger("gateway")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


@pytest.fixture
def stream() -> io.StringIO:
    out = io.StringIO()
    configure_logging("debug", out)
    return out


def _records(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n") or not text
    lines = text.splitlines()
    for line in lines:
        assert line.isascii() and line.isprintable(), line
    return [json.loads(line) for line in lines]


HOSTILE = [
    "fe80::1%\x1b[31mX",
    "Mozilla/5.0\r\nX-Injected: 1",
    '{"event":"forged"}\n{"level":"error"}',
    "nul\x00byte",
    "line\u2028separator\u2029paragraph",
    "\x1b]0;title\x07bell",
    "tab\tand\x0bvertical\x0cfeed\x85nel",
    "%s %d %(name)s",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_fields_stay_on_one_line(stream: io.StringIO, value: str) -> None:
    log_event(get_logger("test"), logging.WARNING, "sink.error", user_agent=value, path=value)
    (record,) = _records(stream)
    assert record["user_agent"] == value
    assert record["path"] == value
    assert record["event"] == "sink.error"
    assert record["level"] == "warning"
    assert record["logger"] == "gateway.test"
    assert "\x1b" not in stream.getvalue()
    assert stream.getvalue().count("\n") == 1


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=10), st.one_of(st.text(), st.integers(), st.none()), max_size=5))
def test_any_fields_make_one_valid_line(fields: dict[str, Any]) -> None:
    out = io.StringIO()
    configure_logging("info", out)
    log_event(get_logger(), logging.INFO, "event\r\nforged", **fields)
    (record,) = _records(out)
    assert record["event"] == "event\r\nforged"


def test_hostile_event_and_message_args(stream: io.StringIO) -> None:
    get_logger("proxy").warning("upstream said %s", "bad\r\n\x1b[2J")
    (record,) = _records(stream)
    assert record["event"] == "upstream said bad\r\n\x1b[2J"


def test_bad_format_arguments_stay_in_the_json_line(stream: io.StringIO, capsys: pytest.CaptureFixture[str]) -> None:
    # pytest >= 9.2 also attaches its own capture handler to non-propagating loggers, and that handler fails the
    # test on a malformed message; this test is about OUR formatter, so only our handler may see the record.
    gateway_logger = logging.getLogger("gateway")
    foreign = [h for h in gateway_logger.handlers if type(h).__name__ != "_JSONLinesHandler"]
    for handler in foreign:
        gateway_logger.removeHandler(handler)
    try:
        get_logger("x").warning("two %s %s", "only-one\r\n")
    finally:
        for handler in foreign:
            gateway_logger.addHandler(handler)
    (record,) = _records(stream)
    assert record["event"].startswith("two %s %s")
    assert "Logging error" not in capsys.readouterr().err


def test_exceptions_are_one_line(stream: io.StringIO) -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        get_logger("x").exception("failed")
    (record,) = _records(stream)
    assert "RuntimeError: boom\nsecond line" in record["exc"]


def test_reserved_and_odd_values(stream: io.StringIO) -> None:
    log_event(get_logger(), logging.INFO, "e", level="fake", ts="fake", ratio=float("nan"), big=float("inf"), ok=True)
    (record,) = _records(stream)
    assert record["level"] == "info"
    assert record["level_"] == "fake"
    assert record["ts_"] == "fake"
    assert record["ratio"] == "nan"
    assert record["big"] == "inf"
    assert record["ok"] is True


def test_access_log_drops_query_and_fragment(stream: io.StringIO) -> None:
    access_log("GET", "/reset?email=alice@example.org&token=s3cr3t#frag", 200, "203.0.113.0", 1.23456)
    access_log("POST", "/a#b?c=d", 404, "2001:db8::", 0.5)
    first, second = _records(stream)
    assert first == {
        "ts": first["ts"],
        "level": "info",
        "logger": "gateway.access",
        "event": "http.request",
        "method": "GET",
        "path": "/reset",
        "status": 200,
        "client": "203.0.113.0",
        "duration_ms": 1.235,
    }
    assert second["path"] == "/a"
    output = stream.getvalue()
    for canary in ("alice@example.org", "s3cr3t", "token", "frag", "c=d"):
        assert canary not in output


def test_access_log_escapes_decoded_crlf_path(stream: io.StringIO) -> None:
    # uvicorn percent-decodes the path: "/%0d%0aSet-Cookie:x" arrives as real CR LF.
    access_log("GET", "/\r\nSet-Cookie: x=1\x1b[31m", 200, "203.0.113.0", 1.0)
    (record,) = _records(stream)
    assert record["path"] == "/\r\nSet-Cookie: x=1\x1b[31m"


def test_access_log_caps_huge_paths(stream: io.StringIO) -> None:
    access_log("GET" * 100, "/" + "a" * 100_000, 200, "203.0.113.0", 1.0)
    (record,) = _records(stream)
    assert len(record["path"]) < 3000
    assert len(record["method"]) <= 32


def test_configure_logging_is_idempotent(stream: io.StringIO) -> None:
    root_handlers = list(logging.getLogger().handlers)
    second = io.StringIO()
    configure_logging("info", second)
    configure_logging("info", second)
    log_event(get_logger(), logging.INFO, "once")
    assert stream.getvalue() == ""
    assert len(_records(second)) == 1
    assert logging.getLogger().handlers == root_handlers


def test_level_filters(stream: io.StringIO) -> None:
    configure_logging("warning", stream)
    log_event(get_logger(), logging.INFO, "hidden")
    access_log("GET", "/", 200, "203.0.113.0", 1.0)
    log_event(get_logger(), logging.ERROR, "shown")
    assert [r["event"] for r in _records(stream)] == ["shown"]


def test_bad_level() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("verbose")


def test_get_logger_stays_in_the_gateway_tree() -> None:
    assert get_logger().name == "gateway"
    assert get_logger("gateway.proxy").name == "gateway.proxy"
    assert get_logger("proxy").name == "gateway.proxy"
    assert get_logger("gatewayish").name == "gateway.gatewayish"


def test_http_client_request_lines_never_carry_the_ga4_secret(caplog: pytest.LogCaptureFixture) -> None:
    import httpx

    from gateway.logs import quiet_http_client_logs

    quiet_http_client_logs()
    httpx_logger = logging.getLogger("httpx")
    httpx_logger.setLevel(logging.DEBUG)  # even someone who turns httpx's logging back on
    try:
        with (
            caplog.at_level(logging.DEBUG, logger="httpx"),
            httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(204))) as client,
        ):
            client.post("https://region1.google-analytics.com/mp/collect?measurement_id=G-X1&api_secret=CANARYSECRET")
    finally:
        httpx_logger.setLevel(logging.WARNING)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "api_secret=***" in text
    assert "CANARYSECRET" not in text


@pytest.mark.anyio
async def test_access_log_writes_batched_json_lines_without_query_strings() -> None:
    from gateway.logs import AccessLog

    stream = io.StringIO()
    log = AccessLog(stream, interval=0.01, max_lines=3)
    log.start()
    log.record("GET", "/reset/?token=canary-token&email=a@b.example", 200, "198.51.100.0", 1.25)
    log.record("POST", '/x\r\n{"forged":1}\x1b[31m', 404, "2001:db8::", 0.5)
    await log.stop()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["method"], x["path"], x["status"], x["client"]) for x in lines] == [
        ("GET", "/reset/", 200, "198.51.100.0"),
        ("POST", '/x\r\n{"forged":1}\x1b[31m', 404, "2001:db8::"),
    ]
    assert "canary-token" not in stream.getvalue()
    assert len(stream.getvalue().splitlines()) == 2  # CR/LF in a path cannot start a line


def test_access_log_buffer_is_bounded_and_counts_what_it_drops() -> None:
    from gateway.logs import AccessLog

    stream = io.StringIO()
    log = AccessLog(stream, max_lines=5)
    for _ in range(12):
        log.record("GET", "/", 200, "198.51.100.0", 1.0)
    log.flush()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 6
    assert lines[-1]["event"] == "access_log.dropped" and lines[-1]["lines"] == 7
