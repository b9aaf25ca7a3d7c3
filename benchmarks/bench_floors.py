"""Issue 13's CPU goals against the floors of the pieces every design that keeps its rules must pay.

    python -m benchmarks.bench_floors [--events 10000] [--json]

Each piece is timed alone, in process, in its cheapest setting (the largest batch per SQLite commit, warm caches),
CPU per event, best of ``--repeats``. A floor is the sum of the pieces a path cannot avoid:

- **Request worker** (goal <= 10 us added per delivered page view): only payloads a destination may receive rest on
  disk, so the worker applies the policy (``sink.build``) and writes the result durably (``Spool.hand_off``: JSON
  encode, insert, the books, one commit per 20 events, as the handoff's 10 ms batches).
- **Deliverer, Plausible** (goal <= 40 us per delivered event): one event per request (the Events API), sent with
  httpx (the issue keeps it): an ``httpx.Request`` from ``sink.request`` and an ``httpx.Response`` per event; and
  per row, durably, the states that make SIGKILL safe: leased (and read back: the row's JSON decoded), marked as
  on the wire before the request, deleted and counted after it (``lease_due``, ``mark_sending``, ``settle``, 200
  rows per commit).
- **Deliverer, GA4 batched** (goal <= 15 us): the same per row; the request and response shared by 25 events.

For the deliverer a second floor, ``floor_lightest``, prices a design this code does not have: leases kept in memory
only (the rows read and decoded, nothing written: the deliverer is the spool's only reader) and one "on the wire"
row per request instead of a mark on each payload row. Deleting and counting each row after delivery stays.

What the floors leave out (so the real paths cost more): the socket I/O and the parsing of the answer, the event
loop, the senders' and the keeper's bookkeeping, the handoff's writer thread, and commits smaller than 200 rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from benchmarks.bench_handoff import GA4_VISITORS, _event, _settings
from gateway.delivery import dispatcher as _dispatcher  # noqa: F401 - loads the delivery package before the spool
from gateway.sinks import Payload, Sink
from gateway.sinks.factory import build_sinks
from gateway.spool import _ROW_COLUMNS, Spool, SpoolRow, _decode

__all__ = ["run"]

HANDOFF_BATCH: Final = 20  # events per worker commit (one 10 ms handoff interval at 2,000 events/s)
COMMIT_ROWS: Final = 200  # rows per deliverer commit: more than a real deliverer gathers, so a lower bound
GA4_BATCH: Final = 25  # events per GA4 Measurement Protocol request
_READ_SQL: Final = (
    f"SELECT {_ROW_COLUMNS} FROM payloads WHERE destination = ? AND event_id > ? ORDER BY event_id LIMIT ?"
)
GOALS: Final = {"worker": 10.0, "plausible": 40.0, "ga4": 15.0}
# What a collector answers (Plausible: 202 and a short body); parsed into an httpx.Response per request.
RESPONSE_HEADERS: Final = [
    (b"date", b"Fri, 04 Dec 2026 10:00:00 GMT"),
    (b"server", b"uvicorn"),
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", b"2"),
]


def _cpu(work: Callable[[], Any]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def _sink(directory: Path, destination: str) -> Sink:
    (sink,) = build_sinks(_settings(directory, "http://127.0.0.1:9", (destination,), "deliverer"))
    return sink


def _payloads(sink: Sink, events: int, visitors: int) -> list[Payload]:
    payloads = []
    for index in range(events):
        event = _event(index, visitors)
        event.event_id = f"floor-{index}"
        payloads.append(sink.build(event))
    return payloads


def _spool(directory: Path, name: str) -> Spool:
    settings = _settings(directory / name, "http://127.0.0.1:9", ("plausible",), "deliverer").spool
    (directory / name).mkdir()
    spool = Spool(settings, host=True)
    spool.open()
    return spool


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def worker_pieces(directory: Path, events: int) -> dict[str, float]:
    sink = _sink(directory, "plausible")
    raw = [_event(index) for index in range(events)]
    for index, event in enumerate(raw):
        event.event_id = f"floor-{index}"
    build = _cpu(lambda: [sink.build(event) for event in raw])
    rows = [SpoolRow(payload, payload.created_at) for payload in _payloads(sink, events, 0)]
    spool = _spool(directory, "worker")
    try:
        counts = {"plausible": {"accepted": HANDOFF_BATCH}}
        hand_off = _cpu(lambda: [spool.hand_off(batch, counts) for batch in _chunks(rows, HANDOFF_BATCH)])
    finally:
        spool.close()
    return {"build": 1e6 * build / events, "hand_off": 1e6 * hand_off / events}


def deliverer_pieces(directory: Path, destination: str, events: int) -> dict[str, float]:
    batch = GA4_BATCH if destination == "ga4" else 1
    sink = _sink(directory, destination)
    payloads = _payloads(sink, events, GA4_VISITORS if destination == "ga4" else 0)
    spool = _spool(directory, f"deliver-{destination}")
    try:
        counts = {destination: {"accepted": COMMIT_ROWS}}
        for chunk in _chunks([SpoolRow(payload, payload.created_at) for payload in payloads], COMMIT_ROWS):
            spool.hand_off(chunk, counts)
        now = time.time() + 1
        leased: list[SpoolRow] = []

        def lease() -> None:
            while got := spool.lease_due(destination, now, COMMIT_ROWS, batch):
                leased.extend(got)

        lease_cpu = _cpu(lease)
        assert len(leased) == events, (len(leased), events)
        read = _cpu(lambda: _read_rows(spool, destination))
        ids = [row.event_id for row in leased]
        groups: dict[str, list[str]] = {}
        for row in leased:
            groups.setdefault(row.payload.batch_key, []).append(row.event_id)
        request_ids = [chunk for group in groups.values() for chunk in _chunks(group, batch)]
        mark = _cpu(lambda: [spool.mark_sending(destination, chunk) for chunk in _chunks(ids, COMMIT_ROWS)])
        mark_per_request = _cpu(lambda: _mark_per_request(spool, request_ids, COMMIT_ROWS // batch))
        settle = _cpu(lambda: [spool.settle(destination, {"delivered": chunk}) for chunk in _chunks(ids, COMMIT_ROWS)])
    finally:
        spool.close()
    # The requests are built from the payloads as the deliverer has them: read back from the spool (with their JSON).
    by_key: dict[str, list[Payload]] = {}
    for row in leased:
        by_key.setdefault(row.payload.batch_key, []).append(row.payload)
    requests = [chunk for group in by_key.values() for chunk in _chunks(group, batch)]
    request = _cpu(lambda: [sink.request(chunk) for chunk in requests])
    response = _cpu(
        lambda: [httpx.Response(202, headers=RESPONSE_HEADERS, content=b"ok") for _ in range(len(requests))]
    )
    http = 1e6 * (request + response) / events
    return {
        "lease": 1e6 * lease_cpu / events,
        "read": 1e6 * read / events,
        "mark_on_the_wire": 1e6 * mark / events,
        "mark_per_request": 1e6 * mark_per_request / events,
        "settle": 1e6 * settle / events,
        "httpx_request": 1e6 * request / events,
        "httpx_response": 1e6 * response / events,
        "events_per_request": events / len(requests),
        "floor": 1e6 * (lease_cpu + mark + settle) / events + http,
        "floor_lightest": 1e6 * (read + mark_per_request + settle) / events + http,
    }


def _read_rows(spool: Spool, destination: str) -> None:
    """Every row read back and decoded, COMMIT_ROWS per query, nothing written: a lease kept in memory only."""
    conn = spool._db
    last = ""
    while True:
        records = conn.execute(_READ_SQL, (destination, last, COMMIT_ROWS)).fetchall()
        if not records:
            return
        rows = [_decode(record) for record in records]
        last = rows[-1].event_id


def _mark_per_request(spool: Spool, requests: list[list[str]], per_commit: int) -> None:
    """One row per request naming its events, in a table of its own: "on the wire" without touching the rows."""
    conn = spool._db
    conn.execute("CREATE TABLE IF NOT EXISTS floor_wire (id INTEGER PRIMARY KEY, destination TEXT, event_ids TEXT)")
    for chunk in _chunks(requests, max(1, per_commit)):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO floor_wire (destination, event_ids) VALUES (?, ?)", [("d", json.dumps(ids)) for ids in chunk]
        )
        conn.execute("COMMIT")


def run(events: int, repeats: int) -> dict[str, dict[str, float]]:
    """Every piece, best (lowest) of ``repeats`` fresh measurements; then the floors and the goals."""
    best: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="bench-floors-") as tmp:
            directory = Path(tmp)
            measured = {
                "worker": worker_pieces(directory, events),
                "plausible": deliverer_pieces(directory, "plausible", events),
                "ga4": deliverer_pieces(directory, "ga4", events),
            }
        for path, pieces in measured.items():
            kept = best.setdefault(path, {})
            for name, value in pieces.items():
                kept[name] = min(value, kept.get(name, value))
    for path, pieces in best.items():
        if path == "worker":
            pieces["floor"] = pieces["build"] + pieces["hand_off"]
        pieces["goal"] = GOALS[path]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args.events, args.repeats)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for path, pieces in results.items():
        skip = ("floor", "floor_lightest", "goal", "events_per_request")
        parts = ", ".join(f"{name} {value:.1f}" for name, value in pieces.items() if name not in skip)
        verdict = "above" if pieces["floor"] > pieces["goal"] else "below"
        lightest = f", lightest design {pieces['floor_lightest']:.1f}" if "floor_lightest" in pieces else ""
        print(
            f"{path:<10} floor {pieces['floor']:5.1f} us/event{lightest} ({verdict} the goal of {pieces['goal']:g}):"
            f" {parts}"
        )


if __name__ == "__main__":
    main()
