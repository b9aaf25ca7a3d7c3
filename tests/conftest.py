from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No proxy, SSL or GATEWAY_* variable from the developer's shell may change a test's outcome."""
    for name in list(os.environ):
        upper = name.upper()
        if upper.startswith("GATEWAY_") or upper.endswith("_PROXY") or upper in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
            monkeypatch.delenv(name, raising=False)
    yield
