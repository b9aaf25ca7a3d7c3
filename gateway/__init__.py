"""privacy-gateway: makes a website's privacy notice true in code.

``app = PrivacyGateway(app, load_settings("config/gateway.toml"))`` truncates the client IP before the app, its
logs or any third party sees it, enforces signed consent and GPC, and sends each analytics destination only the
fields its policy permits, from a background dispatcher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.config import ConfigError, Settings, load_settings
from gateway.context import PrivacyContext
from gateway.native import warn_if_stale

if TYPE_CHECKING:
    from gateway.middleware import PrivacyGateway

__all__ = ["ConfigError", "PrivacyContext", "PrivacyGateway", "Settings", "__version__", "load_settings"]

__version__ = "0.1.0"

warn_if_stale()


def __getattr__(name: str) -> object:
    # Lazy, so `gateway check` and the config module import without loading the whole request stack.
    if name == "PrivacyGateway":
        from gateway.middleware import PrivacyGateway

        return PrivacyGateway
    raise AttributeError(f"module 'gateway' has no attribute {name!r}")
