"""Build one sink per ``[destinations.NAME]`` table, by ``kind``."""

from __future__ import annotations

from gateway.config import Settings
from gateway.sinks import Sink
from gateway.sinks.dryrun import DryRunSink
from gateway.sinks.ga4 import GA4Sink
from gateway.sinks.plausible import PlausibleSink
from gateway.sinks.sentry import SentrySink

__all__ = ["build_sinks"]


def build_sinks(settings: Settings) -> list[Sink]:
    """Sinks in configuration order. A sink's ``dry_run`` says whether its client needs a DryRunTransport."""
    sinks: list[Sink] = []
    for dest in settings.destinations.values():
        if dest.kind == "plausible":
            sinks.append(PlausibleSink(dest, settings))
        elif dest.kind == "ga4":
            sinks.append(GA4Sink(dest, settings))
        elif dest.kind == "sentry":
            sinks.append(SentrySink(dest, settings))
        elif dest.kind == "dryrun":
            sinks.append(DryRunSink(dest, settings))
        else:  # pragma: no cover - config validation rejects unknown kinds
            raise ValueError(f"destinations.{dest.name}.kind: unknown kind {dest.kind!r}")
    return sinks
