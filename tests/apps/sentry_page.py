"""A page that reports an error with the official Sentry browser SDK through the gateway's tunnel (browser test).

``/app`` and ``/other`` initialise Sentry with ``SENTRY_PAGE_DSN`` and ``SENTRY_PAGE_OTHER_DSN``;
``/static/sentry.js`` is the npm bundle at ``SENTRY_PAGE_BUNDLE``. The page puts canary values (an e-mail, a token,
a full address) wherever the SDK lets a site put them: user, breadcrumb, message, and its own URL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CANARY_EMAIL = "alice@example.org"
CANARY_TOKEN = "Zx9KqL2mWv8RtY4pNs6B"
CANARY_IP = "198.51.100.77"

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>error page</title></head>
<body><p>An error happens here.</p>
<script src="/static/sentry.js"></script>
<script>
Sentry.init({{dsn: {dsn}, tunnel: "/_privacy/sentry", sendDefaultPii: true, release: "python-org@2026.12.1"}});
Sentry.setUser({{email: "{email}", ip_address: "{ip}", id: "42"}});
Sentry.setTag("account", "{email}");
Sentry.addBreadcrumb({{category: "navigation", data: {{from: "/reset/{email}?token={token}", to: "/checkout"}}}});
Sentry.captureException(new Error("checkout failed for {email} with token {token}"));
Sentry.flush(5000).then(function (ok) {{ document.title = ok ? "flushed" : "not flushed"; }});
</script></body></html>
"""


class SentryPage:
    def __init__(self, bundle: bytes, dsns: dict[str, str]) -> None:
        self.bundle = bundle
        self.pages = {
            path: _PAGE.format(dsn=json.dumps(dsn), email=CANARY_EMAIL, token=CANARY_TOKEN, ip=CANARY_IP).encode()
            for path, dsn in dsns.items()
        }

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/static/sentry.js":
            status, content_type, body = 200, b"text/javascript", self.bundle
        elif path in self.pages:
            status, content_type, body = 200, b"text/html; charset=utf-8", self.pages[path]
        else:
            status, content_type, body = 404, b"text/plain", b"not found"
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def page_app() -> SentryPage:
    bundle = Path(os.environ["SENTRY_PAGE_BUNDLE"]).read_bytes()
    return SentryPage(bundle, {"/app": os.environ["SENTRY_PAGE_DSN"], "/other": os.environ["SENTRY_PAGE_OTHER_DSN"]})
