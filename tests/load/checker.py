"""The load test's verdict: pure functions from what was sent, received and counted to a list of problems.

Each ``check_*`` returns human-readable problems; an empty list means the check passed. Nothing here does I/O, so
``tests/test_load_checker.py`` can prove with synthetic data that every check fails when it must (a leaked canary,
a silently dropped event, a 5xx, growing memory).

Identifying events: every request the traffic generator sends has an id ``r<number>`` as a path segment
(``/p/r123/...``), which the gateway keeps in the page URL it forwards (the id is neither personal nor
token-like). A delivered event is matched to its request through that id, so the accounting is per event, not
just per count: duplicates, events that should not exist (bots, assets, 404s) and events a destination must
never receive (no consent, GPC) are all caught by id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import html
import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final
from urllib.parse import unquote, unquote_plus

from tests.load.collectors import CollectorRecord

__all__ = [
    "MAX_LISTED",
    "AccountingRow",
    "Delivered",
    "Expect",
    "LatencySummary",
    "MemoryTrend",
    "RequestResult",
    "RssSample",
    "accounting_rows",
    "check_accounting",
    "check_canaries",
    "check_collector_problems",
    "check_log",
    "check_memory",
    "check_statuses",
    "delivered_events",
    "format_report",
    "latency_summary",
    "memory_trend",
    "outcomes_settled",
    "parse_metrics",
    "rid_of",
    "text_record",
]

MAX_LISTED: Final = 15  # problems of one kind listed before "... and N more"
RID: Final = re.compile(r"/p/(r[0-9]{1,7})(?=[/?#]|$)")
MIB: Final = 1024 * 1024


class Expect(enum.Enum):
    """What one accepted event may become at one destination."""

    MUST = "must"  # delivered, unless counted as lost (back-pressure, dead letter)
    MAY = "may"  # delivered, or dropped by policy with a reason (e.g. Plausible and GPC: a policy choice)
    MUST_NOT = "must_not"  # never delivered; dropped by policy with a reason (no consent, GPC)


@dataclasses.dataclass(frozen=True, slots=True)
class RequestResult:
    rid: str
    kind: str
    status: int  # 0 = no response (connection error or timeout)
    seconds: float
    error: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Delivered:
    destination: str
    rid: str | None  # None: the event carries no request id (it cannot be accounted for)
    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class RssSample:
    seconds: float  # since the traffic started
    rss_bytes: int
    completed: int  # requests answered so far


# Destination -> request id -> what may happen to that event there. Only accepted events are listed.
Expectations = Mapping[str, Mapping[str, Expect]]
# Destination -> counter column -> value: the metric name without "gateway_dispatch_" (or "gateway_") and "_total",
# plus "[reason]" when the sample has a reason label ("dropped_policy[consent]").
MetricsTable = Mapping[str, Mapping[str, float]]

# Counter columns (base name, before any "[reason]") by meaning, as gateway/metrics.py names them
# (gateway_dispatch_<name>_total). Its books, per destination:
#   accepted = delivered + dropped_policy + dropped_destination + dropped_overflow + dropped_expired
#              + dead_lettered + ambiguous + pending
# Anything else (retried, replayed, refused, queue gauges) is informational, not an outcome.
ACCEPTED_COLUMNS: Final = frozenset({"accepted"})
DELIVERED_COLUMNS: Final = frozenset({"delivered"})
DROP_COLUMNS: Final = frozenset(
    {"dropped_policy", "dropped_destination", "dropped_overflow", "dropped_expired", "dead_lettered", "ambiguous"}
)
METRIC_PREFIXES: Final = ("gateway_dispatch_", "gateway_")
POLICY_MARK: Final = "policy"


def _listed(problems: list[str], limit: int = MAX_LISTED) -> list[str]:
    if len(problems) <= limit:
        return problems
    return [*problems[:limit], f"... and {len(problems) - limit} more like these"]


# ---------------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------------


def check_statuses(results: Iterable[RequestResult]) -> list[str]:
    """Every 5xx and every request that got no answer at all is a problem."""
    problems = []
    for result in results:
        if result.status == 0:
            problems.append(f"{result.rid} ({result.kind}): no response: {result.error or 'connection error'}")
        elif result.status >= 500:
            problems.append(f"{result.rid} ({result.kind}): HTTP {result.status}")
    return _listed(problems)


@dataclasses.dataclass(frozen=True, slots=True)
class LatencySummary:
    requests: int
    seconds: float
    per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    statuses: Mapping[str, Mapping[int, int]]  # kind -> status -> count


def _percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: the value some request actually saw)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary(results: Sequence[RequestResult], seconds: float) -> LatencySummary:
    answered = sorted(r.seconds * 1000.0 for r in results if r.status)
    statuses: dict[str, Counter[int]] = {}
    for result in results:
        statuses.setdefault(result.kind, Counter())[result.status] += 1
    return LatencySummary(
        requests=len(results),
        seconds=seconds,
        per_second=len(results) / seconds if seconds > 0 else 0.0,
        p50_ms=_percentile(answered, 0.50),
        p95_ms=_percentile(answered, 0.95),
        p99_ms=_percentile(answered, 0.99),
        max_ms=answered[-1] if answered else 0.0,
        statuses={kind: dict(sorted(counts.items())) for kind, counts in sorted(statuses.items())},
    )


# ---------------------------------------------------------------------------------------------------------------
# Collector records
# ---------------------------------------------------------------------------------------------------------------


def check_collector_problems(records: Iterable[CollectorRecord]) -> list[str]:
    """Every payload a collector rejected, with the collector's reasons."""
    problems = []
    for index, record in enumerate(records):
        if record["problems"]:
            problems.append(
                f"{record['destination']} record #{index} ({record['method']} {record['path']}) rejected: "
                + "; ".join(record["problems"][:5])
            )
    return _listed(problems)


def rid_of(url: object) -> str | None:
    if not isinstance(url, str):
        return None
    match = RID.search(url)
    return match.group(1) if match else None


def _json_body(record: CollectorRecord) -> dict[str, Any] | None:
    try:
        value = json.loads(record["body"])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def delivered_events(record: CollectorRecord) -> list[Delivered]:
    """The events one accepted (2xx) collector request delivered; [] for rejected requests and other peers."""
    if not 200 <= record["status"] < 300:
        return []
    body = _json_body(record)
    if body is None:
        return []
    destination = record["destination"]
    if destination == "plausible":
        name = body.get("n") or body.get("name")
        url = body.get("u") or body.get("url")
        return [Delivered(destination, rid_of(url), str(name))]
    if destination == "ga4":
        delivered = []
        events = body.get("events")
        for event in events if isinstance(events, list) else []:
            params = event.get("params") if isinstance(event, dict) else None
            url = params.get("page_location") if isinstance(params, dict) else None
            name = event.get("name") if isinstance(event, dict) else None
            delivered.append(Delivered(destination, rid_of(url), str(name)))
        return delivered
    return []


# ---------------------------------------------------------------------------------------------------------------
# Canaries
# ---------------------------------------------------------------------------------------------------------------


def text_record(destination: str, text: str) -> CollectorRecord:
    """Wrap free text (a server log) as a record so :func:`check_canaries` can search it."""
    return {
        "destination": destination,
        "method": "",
        "path": "",
        "query": "",
        "headers": [],
        "body": text,
        "status": 0,
        "problems": [],
        "received_at": 0.0,
    }


def _json_strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _json_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_strings(item)


def _searchable_forms(record: CollectorRecord) -> list[str]:
    """The record's text as sent and decoded every way a canary could hide: percent, plus, JSON and HTML escapes."""
    parts = [record["path"], record["query"], record["body"]]
    parts += [f"{name}: {value}" for name, value in record["headers"]]
    with contextlib.suppress(ValueError):
        parts += _json_strings(json.loads(record["body"]))  # "\u0040" spells "@" in JSON
    raw = "\n".join(parts)
    forms = [raw]
    text = raw
    for _ in range(3):  # a%2540b decodes to a%40b, then to a@b
        decoded = unquote(text)
        if decoded == text:
            break
        forms.append(decoded)
        text = decoded
    forms.append(unquote_plus(raw))
    forms.append(html.unescape(text))
    return [form.lower() for form in forms]


def check_canaries(records: Iterable[CollectorRecord], canaries: Iterable[str]) -> list[str]:
    """Every record in which any canary (full client IP, e-mail, token, session, bearer) appears in any form."""
    needles = sorted({c.lower() for c in canaries if c})
    problems = []
    for index, record in enumerate(records):
        forms = _searchable_forms(record)
        found = [needle for needle in needles if any(needle in form for form in forms)]
        if found:
            where = f"{record['method']} {record['path']}".strip() or "text"
            problems.append(f"canary {', '.join(repr(f) for f in found)} in {record['destination']} #{index} ({where})")
    return _listed(problems)


def check_log(text: str, canaries: Iterable[str]) -> list[str]:
    """A server log must hold no canary and no traceback (an exception escaped somewhere)."""
    problems = check_canaries([text_record("log", text)], canaries)
    tracebacks = text.count("Traceback (most recent call last)")
    if tracebacks:
        first = text.index("Traceback (most recent call last)")
        problems.append(f"{tracebacks} traceback(s) in the log, the first:\n{text[first : first + 1500]}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """Prometheus text exposition -> ``{destination: {column: value}}`` (like the `gateway status` table)."""
    from prometheus_client.parser import text_string_to_metric_families

    table: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            destination = sample.labels.get("destination")
            if destination is None or sample.name.endswith(("_created", "_bucket", "_count", "_sum")):
                continue
            column = sample.name.removesuffix("_total")
            for prefix in METRIC_PREFIXES:
                if column.startswith(prefix):
                    column = column.removeprefix(prefix)
                    break
            if "reason" in sample.labels:
                column = f"{column}[{sample.labels['reason']}]"
            row = table.setdefault(destination, {})
            row[column] = row.get(column, 0.0) + sample.value
    return table


def _base(column: str) -> str:
    return column.split("[", 1)[0]


def _is_drop(column: str) -> bool:
    base = _base(column)
    return base in DROP_COLUMNS or base.startswith("dropped_")


def _sum(row: Mapping[str, float], predicate: Any) -> float:
    return sum(value for column, value in row.items() if predicate(column))


def _accepted(row: Mapping[str, float]) -> float | None:
    values = [value for column, value in row.items() if _base(column) in ACCEPTED_COLUMNS]
    return sum(values) if values else None


def _delivered_metric(row: Mapping[str, float]) -> float:
    return _sum(row, lambda c: _base(c) in DELIVERED_COLUMNS)


def outcomes_settled(metrics: MetricsTable) -> bool:
    """True when, for every destination, each accepted event has an outcome (nothing queued or in flight)."""
    if not metrics:
        return False
    for row in metrics.values():
        accepted = _accepted(row)
        if accepted is None:
            return False
        if _delivered_metric(row) + _sum(row, _is_drop) < accepted:
            return False
    return True


@dataclasses.dataclass(frozen=True, slots=True)
class AccountingRow:
    destination: str
    expected: int  # accepted events the traffic should have produced for this destination
    must: int
    may: int
    must_not: int
    received: int  # events the collector accepted (duplicates included)
    metric_accepted: float | None
    metric_delivered: float
    drops: Mapping[str, float]  # drop column -> count
    pending: float  # the gateway's own "not yet settled" gauge when the counters were read
    silently_missing: int  # expected - (unique received + counted drops); > 0 is silent loss


def accounting_rows(
    expected: Expectations, records: Iterable[CollectorRecord], metrics: MetricsTable
) -> list[AccountingRow]:
    by_destination: dict[str, list[Delivered]] = {}
    for record in records:
        for event in delivered_events(record):
            by_destination.setdefault(event.destination, []).append(event)
    rows = []
    for destination in sorted(set(expected) | set(by_destination) | set(metrics)):
        wanted = expected.get(destination, {})
        delivered = by_destination.get(destination, [])
        unique = {e.rid for e in delivered if e.rid is not None and e.rid in wanted}
        row = metrics.get(destination, {})
        drops = {column: value for column, value in sorted(row.items()) if _is_drop(column)}
        kinds = Counter(wanted.values())
        rows.append(
            AccountingRow(
                destination=destination,
                expected=len(wanted),
                must=kinds[Expect.MUST],
                may=kinds[Expect.MAY],
                must_not=kinds[Expect.MUST_NOT],
                received=len(delivered),
                metric_accepted=_accepted(row),
                metric_delivered=_delivered_metric(row),
                drops=drops,
                pending=row.get("pending", 0.0),
                silently_missing=len(wanted) - len(unique) - round(sum(drops.values())),
            )
        )
    return rows


def check_accounting(expected: Expectations, records: Iterable[CollectorRecord], metrics: MetricsTable) -> list[str]:
    """Every accepted event is delivered exactly once or counted as dropped with a reason, per destination.

    - no event at a collector that no accepted request explains (bots, assets, 404s, unknown ids), no duplicate;
    - no event where the policy forbids it (``MUST_NOT``: no consent, GPC);
    - unique deliveries + counted drops == accepted events: fewer is a silent loss, more is double counting;
    - every ``MUST`` event that is missing is covered by a loss counter that is not a policy drop;
    - the gateway's own counters agree with what the collectors received and with what was sent.
    """
    records = list(records)
    problems: list[str] = []
    by_destination: dict[str, list[Delivered]] = {}
    for record in records:
        for event in delivered_events(record):
            by_destination.setdefault(event.destination, []).append(event)

    for destination in sorted(set(expected) | set(by_destination)):
        wanted = expected.get(destination, {})
        delivered = by_destination.get(destination, [])
        counts = Counter(e.rid for e in delivered)
        unidentified = counts.pop(None, 0)
        if unidentified:
            problems.append(f"{destination}: {unidentified} delivered event(s) without a request id in their URL")
        listed: list[str] = []
        for rid, count in sorted(counts.items(), key=lambda item: str(item[0])):
            assert rid is not None
            if rid not in wanted:
                listed.append(f"{destination}: {rid} delivered but no accepted page view or beacon explains it")
            elif wanted[rid] is Expect.MUST_NOT:
                listed.append(f"{destination}: {rid} delivered although its policy forbids it (consent/GPC)")
            if count > 1:
                listed.append(f"{destination}: {rid} delivered {count} times")
        problems += _listed(listed)

        row = metrics.get(destination)
        if row is None:
            problems.append(f"{destination}: no counters for this destination in the gateway's metrics")
            row = {}
        drops = _sum(row, _is_drop)
        non_policy_drops = _sum(row, lambda c: _is_drop(c) and POLICY_MARK not in _base(c))
        unique = sum(1 for rid in counts if rid in wanted)
        outcome_total = unique + round(drops)
        if outcome_total < len(wanted):
            pending = round(row.get("pending", 0.0))
            problems.append(
                f"{destination}: {len(wanted) - outcome_total} event(s) silently lost: {len(wanted)} accepted, "
                f"{unique} delivered, {round(drops)} counted as dropped"
                + (f" ({pending} still pending in the gateway after the drain wait)" if pending else "")
            )
        elif outcome_total > len(wanted):
            problems.append(
                f"{destination}: {outcome_total - len(wanted)} outcome(s) more than events: {len(wanted)} accepted, "
                f"{unique} delivered, {round(drops)} counted as dropped"
            )
        missing_must = sum(1 for rid, e in wanted.items() if e is Expect.MUST and rid not in counts)
        if missing_must > round(non_policy_drops):
            problems.append(
                f"{destination}: {missing_must} event(s) that had to be delivered are missing, but only "
                f"{round(non_policy_drops)} are counted as lost (back-pressure, dead letter)"
            )
        accepted = _accepted(row)
        if accepted is not None and round(accepted) != len(wanted):
            problems.append(f"{destination}: the gateway counted {round(accepted)} accepted events, the traffic "
                            f"produced {len(wanted)}")  # fmt: skip
        delivered_metric = _delivered_metric(row)
        if round(delivered_metric) != len(delivered):
            problems.append(
                f"{destination}: the gateway counted {round(delivered_metric)} delivered, the collector accepted "
                f"{len(delivered)}"
            )
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------

# Why these bounds. Every per-request structure in the gateway is bounded (bot-verdict and token caches 4096
# entries, dispatcher queues `dispatch.queue_size`, with anything waiting longer than two flush ticks moved to the
# on-disk spool), so after warm-up (caches filled, pymalloc arenas and connection pools at their peak-concurrency
# size) RSS stays flat apart from allocator noise: clean runs of 3,000 requests grow by 1-3 MiB after warm-up
# (~1 KiB per request, a ~50 MiB process). The bound lets the last quarter exceed the first by 10% + 12 MiB (17 MiB
# for a 50 MiB process); between those quarters lie ~1,600 requests, so a leak that keeps >= ~10 KiB per request
# (its headers, an event, a response buffer) fails, with 5x headroom over the noise seen in clean runs.
WARMUP_FRACTION: Final = 0.25
GROWTH_RATIO: Final = 1.1
GROWTH_SLACK_BYTES: Final = 12 * MIB


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryTrend:
    baseline: float  # median RSS of the first quarter after warm-up, bytes
    final: float  # median RSS of the last quarter, bytes
    bound: float  # the most `final` may be
    requests: int  # requests answered between the first and the last sample after warm-up

    @property
    def bytes_per_request(self) -> float:
        return (self.final - self.baseline) / max(1, self.requests)


def memory_trend(
    samples: Sequence[RssSample],
    *,
    warmup_fraction: float = WARMUP_FRACTION,
    ratio: float = GROWTH_RATIO,
    slack_bytes: int = GROWTH_SLACK_BYTES,
) -> MemoryTrend | None:
    """None when there are too few samples after warm-up to compare two quarters."""
    after_warmup = list(samples[int(len(samples) * warmup_fraction) :])
    if len(after_warmup) < 8:
        return None
    quarter = len(after_warmup) // 4
    baseline = statistics.median(s.rss_bytes for s in after_warmup[:quarter])
    final = statistics.median(s.rss_bytes for s in after_warmup[-quarter:])
    return MemoryTrend(
        baseline=baseline,
        final=final,
        bound=baseline * ratio + slack_bytes,
        requests=after_warmup[-1].completed - after_warmup[0].completed,
    )


def check_memory(
    samples: Sequence[RssSample],
    *,
    warmup_fraction: float = WARMUP_FRACTION,
    ratio: float = GROWTH_RATIO,
    slack_bytes: int = GROWTH_SLACK_BYTES,
) -> list[str]:
    """After warm-up, the last quarter's median RSS must stay below ``first quarter's median * ratio + slack``."""
    trend = memory_trend(samples, warmup_fraction=warmup_fraction, ratio=ratio, slack_bytes=slack_bytes)
    if trend is None:
        return [f"only {len(samples)} RSS samples: too few to judge memory growth"]
    if trend.final > trend.bound:
        return [
            f"server memory keeps growing: RSS median {trend.final / MIB:.1f} MiB at the end vs "
            f"{trend.baseline / MIB:.1f} MiB after warm-up (bound {trend.bound / MIB:.1f} MiB; "
            f"{trend.bytes_per_request:.0f} bytes per request)"
        ]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [
        max(len(header[i]), *(len(row[i]) for row in rows)) if rows else len(header[i]) for i in range(len(header))
    ]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    for row in rows:
        lines.append(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
    return lines


def format_report(
    summary: LatencySummary,
    rows: Sequence[AccountingRow],
    samples: Sequence[RssSample] = (),
    problems: Sequence[str] = (),
    *,
    planned: int | None = None,
) -> str:
    lines = ["", "=== load test report ==="]
    sent = f"{summary.requests}" + (f" of {planned} planned" if planned is not None else "")
    lines.append(f"requests: {sent} in {summary.seconds:.1f} s = {summary.per_second:.0f} requests/s")
    lines.append(
        f"latency: p50 {summary.p50_ms:.1f} ms   p95 {summary.p95_ms:.1f} ms   p99 {summary.p99_ms:.1f} ms   "
        f"max {summary.max_ms:.1f} ms"
    )
    lines.append("statuses: " + "   ".join(
        f"{kind} " + ",".join(f"{status or 'error'}x{count}" for status, count in statuses.items())
        for kind, statuses in summary.statuses.items()
    ))  # fmt: skip
    if samples:
        rss = [s.rss_bytes for s in samples]
        lines.append(
            f"server RSS: first {rss[0] / MIB:.1f} MiB, peak {max(rss) / MIB:.1f} MiB, last {rss[-1] / MIB:.1f} MiB "
            f"({len(samples)} samples)"
        )
        trend = memory_trend(samples)
        if trend is not None:
            lines.append(
                f"server RSS after warm-up: {trend.baseline / MIB:.1f} MiB -> {trend.final / MIB:.1f} MiB "
                f"({trend.bytes_per_request:+.0f} bytes/request; bound {trend.bound / MIB:.1f} MiB)"
            )
    lines.append("")
    lines.append("accounting (events per destination):")
    header = ["destination", "expected", "must", "may", "must_not", "received", "gw_accepted", "gw_delivered",
              "gw_dropped", "gw_pending", "silent"]  # fmt: skip
    table_rows = [
        [
            row.destination,
            str(row.expected),
            str(row.must),
            str(row.may),
            str(row.must_not),
            str(row.received),
            "-" if row.metric_accepted is None else f"{row.metric_accepted:g}",
            f"{row.metric_delivered:g}",
            f"{sum(row.drops.values()):g}",
            f"{row.pending:g}",
            str(row.silently_missing),
        ]
        for row in rows
    ]
    lines += _table(header, table_rows)
    for row in rows:
        if row.drops:
            counted = ", ".join(f"{c}={v:g}" for c, v in row.drops.items() if v) or "none"
            lines.append(f"  {row.destination} drops: {counted}")
    lines.append("")
    if problems:
        lines.append(f"PROBLEMS ({len(problems)}):")
        lines += [f"  - {p}" for p in problems]
    else:
        lines.append("no problems")
    return "\n".join(lines)
