"""gateway.banner.inject.wrap_send: streaming-safe injection before </body>, headers fixed up, everything else alone."""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.types import Message, Receive, Scope, Send

from gateway.banner.inject import HOLD_LIMIT, _rewrite_start, _rewrite_start_uncached, wrap_send
from tests.servers import free_port

SNIPPET = b"<!--pg-snippet-->"
PAGE = b"<!DOCTYPE html><html><head><title>t</title></head><body><p>Hello</p></body></html>\n"
INJECTED = PAGE.replace(b"</body>", SNIPPET + b"</body>")
_BODY_END = re.compile(rb"</body(?=[\t\n\f\r />])", re.IGNORECASE)


def start(
    *headers: tuple[bytes, bytes], status: int = 200, content_type: bytes | None = b"text/html; charset=utf-8"
) -> Message:
    all_headers = ([(b"content-type", content_type)] if content_type is not None else []) + list(headers)
    return {"type": "http.response.start", "status": status, "headers": all_headers}


def body(data: bytes, more: bool = False) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


def chunked(data: bytes, cuts: Sequence[int]) -> list[Message]:
    points = sorted({0, *(c for c in cuts if 0 < c < len(data)), len(data)})
    pieces = [data[a:b] for a, b in itertools.pairwise(points)] or [b""]
    return [body(p, more=True) for p in pieces] + [body(b"")]


async def run(messages: Sequence[Message], snippet: bytes = SNIPPET, **kwargs: Any) -> list[Message]:
    sent: list[Message] = []

    async def record(message: Message) -> None:
        sent.append(message)

    wrapped = wrap_send(record, snippet, **kwargs)
    for message in messages:
        await wrapped(message)
    return sent


def body_of(sent: Sequence[Message]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def header(sent: Sequence[Message], name: bytes) -> list[bytes]:
    first = sent[0]
    assert first["type"] == "http.response.start"
    return [v for k, v in first["headers"] if k.lower() == name]


def reference(data: bytes, snippet: bytes = SNIPPET) -> bytes:
    """The documented rule: before the last </body> if it is within HOLD_LIMIT of the end, else appended."""
    matches = list(_BODY_END.finditer(data))
    if matches and len(data) - matches[-1].start() <= HOLD_LIMIT:
        at = matches[-1].start()
        return data[:at] + snippet + data[at:]
    return data + snippet


# ------------------------------------------------------------------------------------------------ where it goes


@pytest.mark.anyio
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(PAGE)), max_size=12))
@settings(max_examples=200, deadline=None)
async def test_snippet_lands_before_body_end_for_every_split(cuts: list[int]) -> None:
    sent = await run([start((b"content-length", str(len(PAGE)).encode())), *chunked(PAGE, cuts)])
    assert body_of(sent) == INJECTED
    assert header(sent, b"content-length") == [str(len(INJECTED)).encode()]


@pytest.mark.anyio
async def test_every_single_split_point_including_inside_the_tag() -> None:
    for cut in range(len(PAGE) + 1):
        for second in (cut, cut + 1, cut + 3):
            sent = await run([start(), *chunked(PAGE, [cut, second])])
            assert body_of(sent) == INJECTED, (cut, second)


@pytest.mark.anyio
@given(size=st.integers(min_value=1, max_value=16))
@settings(max_examples=16, deadline=None)
async def test_fixed_chunk_sizes(size: int) -> None:
    sent = await run([start(), *chunked(PAGE, list(range(size, len(PAGE), size)))])
    assert body_of(sent) == INJECTED


# Bodies built from pieces that make the tag hard to find: partial tags, case variants, tags with whitespace.
_PIECES = st.sampled_from(
    [b"</body>", b"</BODY>", b"</Body \n>", b"</body/>", b"</bod", b"y>", b"</", b"body", b"</bodyx>", b"<body>", b"x"]
)
_FILLER = st.binary(max_size=40) | st.integers(min_value=1, max_value=3 * HOLD_LIMIT).map(lambda n: b"a" * n)


@pytest.mark.anyio
@given(
    parts=st.lists(_PIECES | _FILLER, max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=8000), max_size=10),
)
@settings(max_examples=300, deadline=None)
async def test_any_body_any_chunking_matches_the_rule(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    sent = await run([start((b"content-length", str(len(data)).encode())), *chunked(data, cuts)])
    out = body_of(sent)
    assert out == reference(data)
    assert len(out) == len(data) + len(SNIPPET)
    assert header(sent, b"content-length") == [str(len(out)).encode()]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("page", "expected"),
    [
        (b"<BODY>x</BODY></HTML>", b"<BODY>x" + SNIPPET + b"</BODY></HTML>"),
        (b"<body>x</Body >", b"<body>x" + SNIPPET + b"</Body >"),
        (b"<body>x</body\n>", b"<body>x" + SNIPPET + b"</body\n>"),
        # The last one wins: an earlier "</body>" inside a script string is not the end of the document.
        (
            b'<body><script>document.write("</body>")</script></body></html>',
            b'<body><script>document.write("</body>")</script>' + SNIPPET + b"</body></html>",
        ),
        # Not end tags: "</bodyx>" and "<body>".
        (b"<body>x</bodyx>", b"<body>x</bodyx>" + SNIPPET),
        (b"<p>no body end", b"<p>no body end" + SNIPPET),
        (b"", SNIPPET),
    ],
)
async def test_placement_table(page: bytes, expected: bytes) -> None:
    sent = await run([start(), body(page)])
    assert body_of(sent) == expected


@pytest.mark.anyio
async def test_body_end_followed_by_more_than_the_hold_limit_gets_the_snippet_appended() -> None:
    page = b"<body>x</body>" + b"<!--" + b"z" * HOLD_LIMIT + b"-->"
    sent = await run([start(), *chunked(page, [10, 20, 700])])
    assert body_of(sent) == page + SNIPPET


# -------------------------------------------------------------------------------------------------- headers


@pytest.mark.anyio
async def test_content_length_absent_stays_absent() -> None:
    sent = await run([start(), body(PAGE)])
    assert header(sent, b"content-length") == []
    assert body_of(sent) == INJECTED


@pytest.mark.anyio
async def test_content_length_rewritten_exactly() -> None:
    sent = await run([start((b"content-length", str(len(PAGE)).encode())), body(PAGE)])
    assert header(sent, b"content-length") == [str(len(PAGE) + len(SNIPPET)).encode()]
    assert len(body_of(sent)) == len(PAGE) + len(SNIPPET)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("existing", "vary", "expected"),
    [
        ([], (b"cookie",), [b"cookie"]),
        ([b"Accept-Encoding"], (b"cookie",), [b"Accept-Encoding, cookie"]),
        ([b"Accept-Encoding", b"Origin"], (b"cookie",), [b"Accept-Encoding, Origin, cookie"]),
        ([b"Cookie"], (b"cookie",), [b"Cookie"]),
        ([b"accept-encoding, COOKIE"], (b"cookie", b"accept-language"), [b"accept-encoding, COOKIE, accept-language"]),
        ([b"*"], (b"cookie",), [b"*"]),
    ],
)
async def test_vary_is_merged(existing: list[bytes], vary: tuple[bytes, ...], expected: list[bytes]) -> None:
    sent = await run([start(*[(b"vary", v) for v in existing]), body(PAGE)], vary=vary)
    assert header(sent, b"vary") == expected


@pytest.mark.anyio
async def test_validators_and_ranges_are_dropped_because_the_bytes_changed() -> None:
    kept = [(b"cache-control", b"public, max-age=60"), (b"x-frame-options", b"DENY"), (b"set-cookie", b"a=b")]
    dropped = [(b"etag", b'"abc"'), (b"last-modified", b"Sat, 01 Jan 2000 00:00:00 GMT"), (b"accept-ranges", b"bytes")]
    sent = await run([start(*kept, *dropped), body(PAGE)])
    names = [k for k, _ in sent[0]["headers"]]
    for name, value in kept:
        assert header(sent, name) == [value]
    for name, _ in dropped:
        assert name not in names


@pytest.mark.anyio
async def test_original_message_and_header_list_are_not_mutated() -> None:
    headers = [(b"content-type", b"text/html"), (b"content-length", str(len(PAGE)).encode()), (b"etag", b'"x"')]
    original = {"type": "http.response.start", "status": 200, "headers": headers}
    snapshot = list(headers)
    await run([original, body(PAGE)])
    assert original["headers"] is headers and headers == snapshot


# ------------------------------------------------------------------------------------------ left alone


PASS_THROUGH_STARTS = {
    "gzip": start((b"content-encoding", b"gzip"), (b"content-length", b"10")),
    "br": start((b"content-encoding", b"br")),
    "gzip-upper": start((b"Content-Encoding", b"GZIP")),
    "json": start(content_type=b"application/json"),
    "plain": start(content_type=b"text/plain"),
    "xhtml": start(content_type=b"application/xhtml+xml"),
    "no-content-type": start(content_type=None),
    "html-lookalike": start(content_type=b"text/htmlx"),
    "no-transform": start((b"cache-control", b"public, no-transform")),
    "range": start((b"content-range", b"bytes 0-9/100"), status=206),
    "redirect": start((b"location", b"/x"), status=302),
    "not-modified": start(status=304),
    "no-content": start(status=204),
    "reset": start(status=205),
    "info": start(status=103),
    "two-content-lengths": start((b"content-length", b"5"), (b"content-length", b"5")),
    "bad-content-length": start((b"content-length", b"12abc")),
    "two-content-types": start((b"content-type", b"text/plain")),
}


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(PASS_THROUGH_STARTS))
async def test_responses_left_byte_identical(name: str) -> None:
    first = PASS_THROUGH_STARTS[name]
    rest = [body(PAGE[:20], more=True), body(PAGE[20:])]
    sent = await run([first, *rest])
    assert sent == [first, *rest]
    assert sent[0] is first  # not even copied


@pytest.mark.anyio
@pytest.mark.parametrize("status", [200, 201, 203, 400, 403, 404, 410, 500, 503])
async def test_injected_statuses(status: int) -> None:
    sent = await run([start(status=status), body(PAGE)])
    assert body_of(sent) == INJECTED


@pytest.mark.anyio
@pytest.mark.parametrize("content_type", [b"text/html", b"TEXT/HTML; charset=UTF-8", b" text/html ;charset=utf-8"])
async def test_html_content_types(content_type: bytes) -> None:
    sent = await run([start(content_type=content_type), body(PAGE)])
    assert body_of(sent) == INJECTED


@pytest.mark.anyio
async def test_identity_encoding_is_still_injected() -> None:
    sent = await run([start((b"content-encoding", b"identity")), body(PAGE)])
    assert body_of(sent) == INJECTED


@pytest.mark.anyio
async def test_gzip_body_is_forwarded_byte_identical() -> None:
    import gzip

    compressed = gzip.compress(PAGE)
    first = start((b"content-encoding", b"gzip"), (b"content-length", str(len(compressed)).encode()))
    sent = await run([first, body(compressed)])
    assert body_of(sent) == compressed
    assert header(sent, b"content-length") == [str(len(compressed)).encode()]


@pytest.mark.anyio
async def test_pathsend_gets_the_original_headers() -> None:
    # The server reads a file itself; the body cannot be edited, so the unmodified start goes out.
    first = start((b"content-length", b"1234"), (b"etag", b'"f"'))
    pathsend = {"type": "http.response.pathsend", "path": "/srv/index.html"}
    sent = await run([first, pathsend])
    assert sent == [first, pathsend]


@pytest.mark.anyio
async def test_trailers_pass_after_the_body() -> None:
    trailers = {"type": "http.response.trailers", "headers": [(b"x-checksum", b"1")], "more_trailers": False}
    sent = await run([{**start(), "trailers": True}, body(PAGE), trailers])
    assert body_of(sent) == INJECTED and sent[-1] == trailers


@pytest.mark.anyio
async def test_start_is_held_only_until_the_first_body_message() -> None:
    sent: list[Message] = []

    async def record(message: Message) -> None:
        sent.append(message)

    wrapped = wrap_send(record, SNIPPET)
    await wrapped(start())
    assert sent == []
    await wrapped(body(b"<p>", more=True))
    assert [m["type"] for m in sent] == ["http.response.start"]  # "<p>" is shorter than a possible split tag
    await wrapped(body(b"0123456789", more=True))
    assert body_of(sent) == b"<p>0123"  # everything but the last six bytes already went out


# ---------------------------------------------------------------------------------------- bounded and safe


@pytest.mark.anyio
@pytest.mark.parametrize("early_end", [False, True])
async def test_memory_is_bounded_to_the_tail(early_end: bool) -> None:
    """5 MB streamed in 64 KiB chunks: at no point are more than HOLD_LIMIT bytes held back."""
    chunk = (b"<p>" + b"x" * 1021) * 64
    sent: list[Message] = []

    async def record(message: Message) -> None:
        sent.append(message)

    wrapped = wrap_send(record, SNIPPET)
    await wrapped(start())
    received = 0
    if early_end:  # a "</body>" early on must not make it hold the rest of the page
        await wrapped(body(b"<body></body>", more=True))
        received += len(b"<body></body>")
    for _ in range(80):
        await wrapped(body(chunk, more=True))
        received += len(chunk)
        assert received - len(body_of(sent)) <= HOLD_LIMIT
    await wrapped(body(b""))
    assert len(body_of(sent)) == received + len(SNIPPET)


MALFORMED_STARTS: list[Message] = [
    {"type": "http.response.start"},
    {"type": "http.response.start", "status": "200", "headers": [(b"content-type", b"text/html")]},
    {"type": "http.response.start", "status": 200, "headers": None},
    {"type": "http.response.start", "status": 200, "headers": [(b"content-type",)]},
    {"type": "http.response.start", "status": 200, "headers": [("content-type", "text/html")]},
    {"type": "http.response.start", "status": 200, "headers": 42},
    {"type": "http.response.body", "body": b"body before start"},
    {"type": "websocket.send", "text": "x"},
]


@pytest.mark.anyio
@pytest.mark.parametrize("message", MALFORMED_STARTS, ids=range(len(MALFORMED_STARTS)))
async def test_surprising_messages_pass_through_without_raising(message: Message) -> None:
    sent = await run([message, body(PAGE)])
    assert sent[0] is message
    assert body_of(sent[1:]) == PAGE


@pytest.mark.anyio
@pytest.mark.parametrize("bad_body", [None, 42, "text"])
async def test_unreadable_body_passes_through_without_raising(bad_body: object) -> None:
    bad = {"type": "http.response.body", "body": bad_body, "more_body": False}
    sent = await run([start(), body(b"<body>abcdefgh", more=True), bad])
    assert sent[-1] is bad
    assert body_of(sent[:-1]) == b"<body>abcdefgh"  # what was held back is flushed first


@pytest.mark.anyio
async def test_bytes_like_bodies_are_accepted() -> None:
    sent = await run([start(), {"type": "http.response.body", "body": bytearray(PAGE[:30]), "more_body": True},
                      {"type": "http.response.body", "body": memoryview(PAGE[30:])}])  # fmt: skip
    assert body_of(sent) == INJECTED


@pytest.mark.anyio
async def test_errors_from_the_server_send_propagate() -> None:
    async def broken(message: Message) -> None:
        raise OSError("client went away")

    wrapped = wrap_send(broken, SNIPPET)
    await wrapped(start())
    with pytest.raises(OSError, match="client went away"):
        await wrapped(body(PAGE))


@pytest.mark.anyio
async def test_empty_snippet_changes_nothing() -> None:
    first = start((b"content-length", str(len(PAGE)).encode()))
    sent = await run([first, body(PAGE)], snippet=b"")
    assert sent[0] is first and body_of(sent) == PAGE


# ------------------------------------------------------------------------ through a real server (h11/httptools)


def _html_app(chunks: list[bytes], with_length: bool) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-type", b"text/html; charset=utf-8")]
        if with_length:
            headers.append((b"content-length", str(sum(map(len, chunks))).encode()))
        send = wrap_send(send, SNIPPET, vary=(b"cookie",))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i, piece in enumerate(chunks):
            await send({"type": "http.response.body", "body": piece, "more_body": i < len(chunks) - 1})

    return app


@pytest.fixture(params=["h11", "httptools"])
def served(request: pytest.FixtureRequest) -> Iterator[str]:
    pieces = [PAGE[:40], PAGE[40:70], PAGE[70:]]
    routes = {"/length": _html_app(pieces, True), "/chunked": _html_app(pieces, False)}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await routes[scope["path"]](scope, receive, send)

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=request.param, log_level="error", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize("path", ["/length", "/chunked"])
def test_real_server_accepts_the_rewritten_length(served: str, path: str) -> None:
    # uvicorn's h11 and httptools protocols both refuse to send more bytes than Content-Length declares.
    with httpx.Client(base_url=served, trust_env=False) as client:
        response = client.get(path)
    assert response.status_code == 200
    assert response.content == INJECTED
    assert response.headers["vary"] == "cookie"
    if path == "/length":
        assert response.headers["content-length"] == str(len(INJECTED))
    else:
        assert response.headers.get("transfer-encoding") == "chunked"


@pytest.mark.anyio
async def test_headers_given_as_a_one_shot_iterable() -> None:
    first = {"type": "http.response.start", "status": 200, "headers": iter([(b"content-type", b"text/html")])}
    sent = await run([first, body(PAGE)])
    assert header(sent, b"content-type") == [b"text/html"] and body_of(sent) == INJECTED


# ------------------------------------------------------------------------------------ the rewritten-start cache

_NAMES = [b"content-type", b"content-length", b"vary", b"etag", b"cache-control", b"Content-Type", b"x-other"]
_VALUES = [b"text/html", b"text/plain", b"12", b"x1", b"cookie", b"no-transform", b"public"]


@settings(max_examples=300, deadline=None)
@given(
    headers=st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)), max_size=5),
    status=st.sampled_from([200, 204, 302, 404]),
    added=st.integers(min_value=0, max_value=3),
    vary=st.sampled_from([(), (b"cookie",), (b"cookie", b"accept-language")]),
)
def test_cached_rewrite_equals_the_uncached_one(
    headers: list[tuple[bytes, bytes]], status: int, added: int, vary: tuple[bytes, ...]
) -> None:
    message = {"type": "http.response.start", "status": status, "headers": headers}
    expected = _rewrite_start_uncached(dict(message), added, vary)
    for _ in range(2):  # the first call fills the cache, the second is answered from it
        assert _rewrite_start(message, added, vary) == expected
    assert message["headers"] is headers  # never modified in place


@pytest.mark.anyio
async def test_a_cached_rewrite_is_a_fresh_list_each_time() -> None:
    # Whoever the rewritten start goes to may change its header list; the next response must not see that.
    length = (b"content-length", str(len(PAGE)).encode())
    for _ in range(2):  # the first fills the cache, the second is answered from it
        sent = await run([start(length), body(PAGE)])
        sent[0]["headers"].append((b"x-added-downstream", b"1"))
    sent = await run([start(length), body(PAGE)])
    assert header(sent, b"x-added-downstream") == []
    assert header(sent, b"content-length") == [str(len(PAGE) + len(SNIPPET)).encode()]


@pytest.mark.anyio
async def test_unhashable_headers_are_rewritten_without_the_cache() -> None:
    message = {"type": "http.response.start", "status": 200, "headers": [[b"content-type", b"text/html"]]}
    for _ in range(2):
        sent = await run([message, body(PAGE)])
        assert body_of(sent) == INJECTED
