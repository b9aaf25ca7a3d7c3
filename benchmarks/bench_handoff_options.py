"""The handoff mechanisms issue 13 asked to measure before choosing one (docs/delivery.md has the decision).

    python -m benchmarks.bench_handoff_options [--events 20000] [--json]

A request worker hands events to the host's deliverer in small batches (20 events, what a busy worker gathers in
one 10 ms interval). Measured here, CPU per event on the worker's side only (the deliverer's side is its own process):

- ``sqlite_outbox``: one SQLite commit per batch into a WAL-mode table (``synchronous=NORMAL``, as the spool), rows
  of the size of a Plausible payload (~450 bytes of JSON): durable when the commit returns, survives a deliverer
  that is down or restarting.
- ``unix_socket``: one ``sendall`` per batch of newline-separated JSON over a Unix stream socket to a reader process
  that only drains it: nothing is durable until the reader has written it somewhere, and a worker needs a fallback
  (and acknowledgements) for a reader that is down.
- ``json_encode``: encoding the batch alone, which both need; ``build_plausible``: applying Plausible's policy to
  an event (``sink.build``), which whatever rests on disk needs first (only filtered payloads may).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_handoff import _event, _settings
from gateway.sinks.factory import build_sinks

__all__ = ["run"]

BATCH: Final = 20
_READER = """
import socket, sys
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(sys.argv[1]); server.listen(1)
print("ready", flush=True)
conn, _ = server.accept()
while conn.recv(1 << 20):
    pass
"""


def _payloads(count: int, directory: Path) -> list[dict[str, Any]]:
    (sink,) = build_sinks(_settings(directory, "http://127.0.0.1:9", ("plausible",), "deliverer"))
    bodies = []
    for index in range(count):
        event = _event(index)
        event.event_id = f"bench-{index}"
        payload = sink.build(event)
        bodies.append({"id": payload.event_id, "body": payload.body, "headers": payload.headers})
    return bodies


def _batches(items: list[Any]) -> list[list[Any]]:
    return [items[i : i + BATCH] for i in range(0, len(items), BATCH)]


def sqlite_outbox(items: list[dict[str, Any]], directory: Path) -> float:
    conn = sqlite3.connect(directory / "outbox.sqlite3", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE outbox (id TEXT PRIMARY KEY, body TEXT NOT NULL)")
    cpu = time.process_time()
    for batch in _batches(items):
        rows = [(item["id"], json.dumps(item, separators=(",", ":"))) for item in batch]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO outbox (id, body) VALUES (?, ?)", rows)
        conn.execute("COMMIT")
    cpu = time.process_time() - cpu
    conn.close()
    return cpu


def unix_socket(items: list[dict[str, Any]], directory: Path) -> float:
    path = str(directory / "handoff.sock")
    reader = subprocess.Popen([sys.executable, "-c", _READER, path], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        cpu = time.process_time()
        for batch in _batches(items):
            data = "".join(json.dumps(item, separators=(",", ":")) + "\n" for item in batch).encode()
            client.sendall(data)
        cpu = time.process_time() - cpu
        client.close()
        reader.wait(10)
    finally:
        reader.kill()
    return cpu


def json_encode(items: list[dict[str, Any]], directory: Path) -> float:
    cpu = time.process_time()
    for batch in _batches(items):
        "".join(json.dumps(item, separators=(",", ":")) + "\n" for item in batch)
    return time.process_time() - cpu


def build_plausible(count: int, directory: Path) -> float:
    (sink,) = build_sinks(_settings(directory, "http://127.0.0.1:9", ("plausible",), "deliverer"))
    events = [_event(index) for index in range(count)]
    for index, event in enumerate(events):
        event.event_id = f"bench-{index}"
    cpu = time.process_time()
    for event in events:
        sink.build(event)
    return time.process_time() - cpu


def run(events: int) -> dict[str, float]:
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-handoff-options-") as tmp:
        directory = Path(tmp)
        items = _payloads(events, directory)
        for name, measure in (
            ("sqlite_outbox", sqlite_outbox),
            ("unix_socket", unix_socket),
            ("json_encode", json_encode),
        ):
            sub = directory / name
            os.mkdir(sub)
            results[name] = 1e6 * measure(items, sub) / events
        results["build_plausible"] = 1e6 * build_plausible(events, directory) / events
        results["payload_bytes"] = sum(len(json.dumps(item)) for item in items) / events
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args.events)
    if args.json:
        print(json.dumps(results))
        return
    for name, value in results.items():
        unit = "bytes" if name == "payload_bytes" else "µs CPU/event (worker side)"
        print(f"{name:<16} {value:8.1f} {unit}")


if __name__ == "__main__":
    main()
