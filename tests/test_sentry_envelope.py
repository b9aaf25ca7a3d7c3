"""Sentry envelope framing and DSNs (https://develop.sentry.dev/sdk/envelopes/), table-driven."""

from __future__ import annotations

import pytest

from gateway.sentry_envelope import MAX_ITEMS, Envelope, EnvelopeError, parse_dsn, parse_envelope

H = b'{"dsn":"https://k@o1.ingest.sentry.io/42"}'

FRAMING = [
    ("header-only", H, 0),
    ("header-newline", H + b"\n", 0),
    ("item-with-length", H + b'\n{"type":"event","length":2}\n{}', 1),
    ("item-with-length-newline", H + b'\n{"type":"event","length":2}\n{}\n', 1),
    ("item-without-length", H + b'\n{"type":"event"}\n{"a":1}\n', 1),
    ("length-holds-newlines", H + b'\n{"type":"attachment","length":5}\na\nb\nc\n{"type":"session"}\n{}', 2),
    ("empty-payload", H + b'\n{"type":"client_report","length":0}\n\n', 1),
    ("spec-example", b'{"event_id":"9ec79c33ec9942ab8353589fcb2e04dc","dsn":"https://e12d836b15bb49d7bbf99e64295d995b:@sentry.io/42"}\n'
     b'{"type":"attachment","length":10,"content_type":"text/plain","filename":"hello.txt"}\n\xef\xbb\xbfHello\r\n\n'
     b'{"type":"event","length":41,"content_type":"application/json","filename":"application.log"}\n'
     b'{"message":"hello world","level":"error"}\n', 2),
]  # fmt: skip


@pytest.mark.parametrize(("body", "items"), [pytest.param(b, n, id=i) for i, b, n in FRAMING])
def test_framing(body: bytes, items: int) -> None:
    envelope = parse_envelope(body)
    assert len(envelope.items) == items
    again = parse_envelope(envelope.dumps())  # what the gateway writes reads back the same
    assert again.header == envelope.header
    assert [p for _, p in again.items] == [p for _, p in envelope.items]


MALFORMED = [
    ("not-json", b"hello", 400),
    ("header-array", b"[1]", 400),
    ("item-not-json", H + b"\n{nope\n{}", 400),
    ("item-without-type", H + b'\n{"length":2}\n{}', 400),
    ("length-too-long", H + b'\n{"type":"event","length":99}\n{}', 400),
    ("length-negative", H + b'\n{"type":"event","length":-1}\n{}', 400),
    ("length-not-int", H + b'\n{"type":"event","length":"2"}\n{}', 400),
    ("payload-longer-than-length", H + b'\n{"type":"event","length":1}\n{}', 400),
    ("too-many-items", H + b'\n{"type":"session","length":0}\n' * (MAX_ITEMS + 1), 413),
    ("bad-utf8-header", b"\xff\xfe", 400),
]


@pytest.mark.parametrize(("body", "status"), [pytest.param(b, s, id=i) for i, b, s in MALFORMED])
def test_malformed(body: bytes, status: int) -> None:
    with pytest.raises(EnvelopeError) as error:
        parse_envelope(body)
    assert error.value.status == status


DSNS = [
    ("https://abc@o1.ingest.sentry.io/42", "https://o1.ingest.sentry.io/api/42/envelope/", "abc"),
    ("http://abc:secret@127.0.0.1:9000/7", "http://127.0.0.1:9000/api/7/envelope/", "abc"),
    ("https://abc@sentry.example.org/sub/path/42/", "https://sentry.example.org/sub/path/api/42/envelope/", "abc"),
    ("https://o1.ingest.sentry.io/42", None, None),  # no key
    ("https://abc@o1.ingest.sentry.io/project", None, None),
    ("ftp://abc@host/42", None, None),
    ("https://abc@host:99999/42", None, None),
]


@pytest.mark.parametrize(("text", "url", "key"), DSNS)
def test_dsn(text: str, url: str | None, key: str | None) -> None:
    dsn = parse_dsn(text)
    assert (dsn.envelope_url if dsn else None) == url
    assert (dsn.public_key if dsn else None) == key


def test_dumps_sets_every_length() -> None:
    body = Envelope({"a": 1}, [({"type": "event", "length": 999}, b"{}"), ({"type": "x"}, b"a\nb")]).dumps()
    assert body == b'{"a":1}\n{"type":"event","length":2}\n{}\n{"type":"x","length":3}\na\nb\n'
