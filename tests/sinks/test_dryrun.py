from __future__ import annotations

import io
import json
from typing import Any

import httpx
import pytest

from gateway.config import load_settings
from gateway.sinks import Outcome, PolicyDrop
from gateway.sinks.dryrun import DEFAULT_DRYRUN_ENDPOINT, DryRunSink, DryRunTransport, mask_url
from gateway.sinks.factory import build_sinks
from gateway.sinks.ga4 import GA4Sink
from gateway.sinks.plausible import PlausibleSink
from tests.sinks import (
    CHROME_UA,
    GA4_SECRET,
    GA_CLIENT_ID,
    TRUNCATED_IP,
    make_event,
    python_org_overrides,
    python_org_settings,
    sink_named,
)


def dryrun_settings(**dest: Any) -> Any:
    overrides = python_org_overrides()
    # config.py asks for an endpoint unless dry_run is set, even for kind "dryrun" (always a dry run anyway).
    overrides["destinations"]["preview"] = {"kind": "dryrun", "dry_run": True, **dest}
    return load_settings(None, environ={}, overrides=overrides)


async def send_dry(transport: DryRunTransport, request: httpx.Request) -> httpx.Response:
    async with httpx.AsyncClient(transport=transport) as http:
        return await http.send(request)


@pytest.mark.anyio
async def test_ga4_request_prints_one_masked_json_line_and_answers_204() -> None:
    sink = sink_named(build_sinks(python_org_settings()), "ga4")
    out = io.StringIO()
    event = make_event(granted=frozenset({"analytics"}), client_id=GA_CLIENT_ID)
    request = sink.request([sink.build(event)])
    response = await send_dry(DryRunTransport("ga4", out), request)

    assert response.status_code == 204
    assert sink.classify(response).outcome is Outcome.DELIVERED
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert GA4_SECRET not in text
    line = json.loads(text)
    assert set(line) == {"destination", "method", "url", "headers", "body"}
    assert line["destination"] == "ga4"
    assert line["method"] == "POST"
    assert line["url"] == "https://region1.google-analytics.com/mp/collect?measurement_id=G-PYORG123&api_secret=***"
    assert line["headers"] == {
        "host": "region1.google-analytics.com",
        "content-type": "application/json",
        "content-length": str(len(request.content)),
    }
    assert line["body"] == json.loads(request.content)


@pytest.mark.anyio
async def test_plausible_request_prints_and_answers_202() -> None:
    sink = sink_named(build_sinks(python_org_settings()), "plausible")
    out = io.StringIO()
    response = await send_dry(DryRunTransport("plausible", out), sink.request([sink.build(make_event())]))
    assert response.status_code == 202
    assert sink.classify(response).outcome is Outcome.DELIVERED
    line = json.loads(out.getvalue())
    assert line["url"] == "https://plausible.io/api/event"
    assert line["headers"]["user-agent"] == CHROME_UA
    assert line["headers"]["x-forwarded-for"] == TRUNCATED_IP
    assert line["body"]["url"] == "https://www.python.org/downloads/"


@pytest.mark.anyio
async def test_status_can_be_forced() -> None:
    out = io.StringIO()
    response = await send_dry(
        DryRunTransport("x", out, status=503), httpx.Request("POST", "https://a.example/", content=b"not json")
    )
    assert response.status_code == 503
    assert json.loads(out.getvalue())["body"] == "not json"


@pytest.mark.anyio
async def test_default_output_is_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    await send_dry(DryRunTransport("d"), httpx.Request("POST", "https://a.example/", content=b"{}"))
    assert json.loads(capsys.readouterr().out)["destination"] == "d"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            "https://h/mp/collect?measurement_id=G-1&api_secret=abc",
            "https://h/mp/collect?measurement_id=G-1&api_secret=***",
        ),
        ("https://h/mp/collect?api_secret=abc&x=1", "https://h/mp/collect?api_secret=***&x=1"),
        ("https://h/api/event", "https://h/api/event"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_dryrun_sink_builds_every_allowed_field_and_nothing_else() -> None:
    fields = ["name", "url", "referrer", "title", "country", "language", "user_agent", "ip", "props"]
    sink = sink_named(build_sinks(dryrun_settings(fields=fields)), "preview")
    assert isinstance(sink, DryRunSink)
    assert sink.dry_run is True and sink.max_batch == 1
    payload = sink.build(make_event(props={"section": "downloads"}, url="https://www.python.org/x/?q=hi&token=t"))
    assert payload.body == {
        "name": "pageview",
        "url": "https://www.python.org/x/?q=hi",
        "referrer": "https://www.google.com/",
        "title": "Download Python | Python.org",
        "country": "GB",
        "language": "en-gb",
        "user_agent": CHROME_UA,
        "ip": TRUNCATED_IP,
        "props": {"section": "downloads"},
    }
    minimal = sink_named(build_sinks(dryrun_settings(fields=["url"])), "preview").build(make_event())
    assert minimal.body == {"name": "pageview", "url": "https://www.python.org/downloads/"}


@pytest.mark.anyio
async def test_dryrun_sink_goes_through_the_transport() -> None:
    sink = sink_named(build_sinks(dryrun_settings()), "preview")
    out = io.StringIO()
    request = sink.request([sink.build(make_event())])
    assert str(request.url) == DEFAULT_DRYRUN_ENDPOINT
    response = await send_dry(DryRunTransport("preview", out), request)
    assert sink.classify(response).outcome is Outcome.DELIVERED
    assert json.loads(out.getvalue())["body"]["url"] == "https://www.python.org/downloads/"
    assert sink.classify(httpx.Response(500)).outcome is Outcome.REJECTED


def test_dryrun_sink_checks_consent_and_custom_names() -> None:
    sink = sink_named(build_sinks(dryrun_settings(requires=["analytics"])), "preview")
    with pytest.raises(PolicyDrop):
        sink.build(make_event())
    sink = sink_named(build_sinks(dryrun_settings(fields=["url"])), "preview")
    with pytest.raises(PolicyDrop):
        sink.build(make_event(name="Download"))
    with pytest.raises(ValueError):
        sink.request([])


def test_build_sinks_one_per_destination_in_order() -> None:
    sinks = build_sinks(dryrun_settings())
    assert [(s.name, s.kind) for s in sinks] == [("plausible", "plausible"), ("ga4", "ga4"), ("preview", "dryrun")]
    assert isinstance(sinks[0], PlausibleSink) and isinstance(sinks[1], GA4Sink)
    assert [s.dry_run for s in sinks] == [False, False, True]
    assert [s.max_batch for s in sinks] == [1, 25, 1]
    assert sinks[1].requires == frozenset({"analytics"}) and sinks[0].requires == frozenset()
    assert [getattr(s, "ttl_seconds", None) for s in sinks] == [3600.0, 3600.0, 3600.0]
    assert build_sinks(load_settings(None, environ={})) == []


def test_dry_run_flag_of_real_kinds_is_passed_through() -> None:
    sinks = build_sinks(python_org_settings(plausible={"dry_run": True}, ga4={"dry_run": True}))
    assert all(s.dry_run for s in sinks)
