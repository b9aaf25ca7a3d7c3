"""The small privacy context the middleware leaves in ``scope["state"]["privacy"]`` for the downstream app."""

from __future__ import annotations

import dataclasses

__all__ = ["STATE_KEY", "PrivacyContext"]

STATE_KEY = "privacy"


@dataclasses.dataclass(frozen=True, slots=True)
class PrivacyContext:
    ip: str  # the truncated client address (the only form anything after the gateway sees)
    country: str  # ISO code from the lookup on the full address, "" when unknown
    granted: frozenset[str] = frozenset()  # consent categories in effect after GPC/DNT precedence
    choice_made: bool = False  # a valid, current-revision choice is on record (no banner needed)
    gpc: bool = False  # Sec-GPC: 1 was sent on this request
    consent_id: str = ""  # random id of the stored choice, "" when none
    client_id: str = ""  # first-party analytics id (only with consent), "" when none
