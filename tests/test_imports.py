"""Every module of the package imports on its own, first, in a fresh interpreter: an import cycle only shows
when the cycle's entry point is imported before anything else (``import gateway.spool`` once failed that way while
every test passed, because the tests had always imported the delivery package first)."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gateway

PACKAGE = Path(gateway.__file__).resolve().parent


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] != "__main__":
            names.append(".".join(parts))
    return names


def import_alone(name: str) -> tuple[str, int, str]:
    done = subprocess.run(
        [sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=60, cwd=PACKAGE.parent
    )
    return name, done.returncode, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    names = module_names()
    assert "gateway.spool" in names and "gateway.delivery.books" in names and len(names) > 40
    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [(name, error) for name, code, error in pool.map(import_alone, names) if code != 0]
    assert not failures, failures
