"""The official Sentry browser SDK from npm, bundled for the browser test with esbuild from npm.

Installed by the test tooling into ``.cache/npm-sentry/`` (git-ignored), never committed; node and npm are needed.
The versions are pinned so a run is repeatable; the bundle is rebuilt only when missing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.servers import REPO

SENTRY_BROWSER = "@sentry/browser@11.12.0"
ESBUILD = "esbuild@0.28.2"
CACHE = REPO / ".cache" / "npm-sentry"
_ENTRY = 'import * as Sentry from "@sentry/browser";\nwindow.Sentry = Sentry;\n'


def sentry_bundle() -> Path:
    """Path of ``sentry.bundle.js`` (an IIFE that sets ``window.Sentry``); raises when npm is unavailable."""
    bundle = CACHE / f"sentry-{SENTRY_BROWSER.rsplit('@', 1)[1]}.bundle.js"
    if bundle.exists():
        return bundle
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed to fetch the Sentry browser SDK for this test")
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(CACHE), SENTRY_BROWSER, ESBUILD],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    entry = CACHE / "entry.js"
    entry.write_text(_ENTRY)
    esbuild = CACHE / "node_modules" / ".bin" / "esbuild"
    subprocess.run(
        [str(esbuild), str(entry), "--bundle", "--format=iife", "--minify", f"--outfile={bundle}"],
        check=True, capture_output=True, timeout=300, cwd=CACHE,
    )  # fmt: skip
    return bundle
