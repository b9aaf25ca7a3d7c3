"""The host's one delivery process (``gateway deliver``), and its supervisor inside ``gateway serve --workers N``.

The deliverer is a :class:`~gateway.delivery.dispatcher.Dispatcher` in host mode: it leases the payloads the request
workers wrote to the host spool, sends them (retries, circuit breakers, ``Retry-After``), and settles each row and its
count in one commit (:mod:`gateway.delivery.books`). The spool's lock file makes it one per host: a second deliverer on
the same spool exits with an error. It stops on SIGTERM/SIGINT: what is in flight finishes within
``dispatch.shutdown_timeout``; everything else simply stays in the spool for the next start.

The supervisor restarts a deliverer that died (SIGKILL, OOM, a bug) with a growing delay (1 s doubling to 30 s);
payloads that were on the wire at that moment are counted as ``ambiguous`` at the next start, never sent twice
(unless ``dispatch.retry_ambiguous``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Final

from gateway.config import Settings
from gateway.delivery.dispatcher import Dispatcher
from gateway.logs import configure_logging
from gateway.sinks.dryrun import DryRunTransport
from gateway.sinks.factory import build_sinks
from gateway.spool import Spool, SpoolError

__all__ = ["DelivererSupervisor", "adopt_worker_spools", "build_deliverer", "run_deliverer"]

log = logging.getLogger("gateway.deliverer")

RESTART_DELAY_MIN: Final = 1.0
RESTART_DELAY_MAX: Final = 30.0
# A deliverer that ran this long before dying starts again after the shortest delay.
STABLE_SECONDS: Final = 60.0


_WORKER_SPOOL = re.compile(r"\.w[0-9]+$")


def adopt_worker_spools(settings: Settings) -> int:
    """Move the rows of per-worker spool files (``<spool.path>.wN``, before deliverer mode) into the host spool.

    Each is taken only if no process holds it; its rows count as ``accepted`` and ``replayed`` in the host books,
    and the file is removed. Returns how many rows were moved.
    """
    host = Spool(settings.spool, host=True, owner=False)
    moved = 0
    for path in sorted(glob.glob(glob.escape(settings.spool.path) + ".w*")):
        if not _WORKER_SPOOL.search(path):
            continue  # its -wal/-shm/.lock/.slot companions
        old = Spool(dataclasses.replace(settings.spool, path=path))
        try:
            old.open()
        except SpoolError as exc:
            log.warning("deliverer: left %s alone: %s", path, exc)
            continue
        try:
            rows = old.rows_for()
            counts: dict[str, dict[str, int]] = {}
            for row in rows:
                lane = counts.setdefault(row.destination, {"accepted": 0, "replayed": 0})
                lane["accepted"] += 1
                lane["replayed"] += 1
            if not host.is_open:
                host.open()
            host.hand_off(rows, counts)
        finally:
            old.close()
        for leftover in (path, f"{path}-wal", f"{path}-shm", f"{path}.lock", f"{path}.slot"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        log.warning("deliverer: moved %d rows from the per-worker spool %s into the host spool", len(rows), path)
        moved += len(rows)
    host.close()
    return moved


def build_deliverer(settings: Settings) -> Dispatcher:
    sinks = build_sinks(settings)
    transports = {s.name: DryRunTransport(s.name) for s in sinks if s.dry_run}
    ttls = {name: dest.ttl_seconds for name, dest in settings.destinations.items()}
    return Dispatcher(sinks, settings.dispatch, settings.spool, transports=transports, ttls=ttls, host=True)


async def _deliver_until_signalled(settings: Settings) -> int:
    dispatcher = build_deliverer(settings)
    await dispatcher.start()
    if dispatcher.spool_open:
        adopt_worker_spools(settings)  # after start(): the host spool's lock says we are the one deliverer
    else:
        await dispatcher.stop()
        print(
            f"gateway deliver: cannot use the host spool {settings.spool.path!r} (another deliverer runs, or see the "
            "log above)",
            file=sys.stderr,
        )
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("deliverer: delivering from %s to %s", settings.spool.path, ", ".join(dispatcher.destinations))
    await stop.wait()
    await dispatcher.stop()
    return 0


def run_deliverer(settings: Settings) -> int:
    """``gateway deliver``: run until SIGTERM/SIGINT; return the exit code."""
    if not settings.spool.enabled:
        print("config error: spool.enabled: false (gateway deliver needs the host spool)", file=sys.stderr)
        return 2
    configure_logging(settings.logging.level)
    return asyncio.run(_deliver_until_signalled(settings))


class DelivererSupervisor:
    """Runs ``gateway deliver --config PATH`` as a child process and restarts it when it dies."""

    def __init__(self, config_path: str) -> None:
        self._command = [sys.executable, "-m", "gateway", "deliver", "--config", config_path]
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="gateway-deliverer-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        with self._lock:
            if not self._stopping.is_set():
                # Its own session: a Ctrl+C or a signal to the terminal's process group stops the workers, and the
                # deliverer only after them (stop()), so it can still send what they wrote last.
                self._process = subprocess.Popen(  # noqa: S603 - our own CLI
                    self._command, start_new_session=True
                )

    def _watch(self) -> None:
        delay = RESTART_DELAY_MIN
        while not self._stopping.is_set():
            process = self._process
            if process is not None:
                started = time.monotonic()
                code = process.wait()
                if self._stopping.is_set():
                    return
                if time.monotonic() - started > STABLE_SECONDS:
                    delay = RESTART_DELAY_MIN
                log.error("deliverer exited with %s; restarting in %.0f s", code, delay)
            if self._stopping.wait(delay):
                return
            delay = min(RESTART_DELAY_MAX, delay * 2)
            self.restarts += 1
            try:
                self._spawn()
            except OSError as exc:
                # No process now (out of memory or PIDs, the interpreter replaced): keep trying with the same
                # backoff rather than let this thread die and leave the host without a deliverer for good.
                with self._lock:
                    self._process = None
                log.error("deliverer could not be started (%s); trying again in %.0f s", exc, delay)

    def stop(self, timeout: float) -> int | None:
        """SIGTERM the deliverer and wait for its clean stop (SIGKILL after ``timeout``); its exit code."""
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("deliverer did not stop within %.0f s; killing it", timeout)
            process.kill()
            code = process.wait()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        return code
