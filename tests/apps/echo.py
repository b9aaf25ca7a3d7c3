"""A downstream app that reports exactly what it was given, wrapped in the gateway (for uvicorn --factory)."""

from __future__ import annotations

import dataclasses
import json
import os

from starlette.types import Receive, Scope, Send

from gateway import PrivacyGateway, load_settings
from gateway.context import STATE_KEY
from gateway.demo import answer_lifespan


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    assert scope["type"] == "http"
    privacy = scope.get("state", {}).get(STATE_KEY)
    report = {
        "client": list(scope["client"]) if scope.get("client") else None,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        "privacy": {k: sorted(v) if isinstance(v, frozenset) else v for k, v in dataclasses.asdict(privacy).items()}
        if privacy is not None
        else None,
        "path": scope["path"],
    }
    # The app logs what it saw, like a real app would: this output is checked for canaries too.
    print("app saw client", report["client"], flush=True)
    body = json.dumps(report).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def gateway_echo() -> PrivacyGateway:
    return PrivacyGateway(echo_app, load_settings(os.environ["ECHO_GATEWAY_CONFIG"]))
