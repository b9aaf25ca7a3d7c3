"""Which gateway modules run compiled (the opt-in mypyc build), and a guard against stale compiled modules.

The wheel hook (``HATCH_BUILD_HOOKS_ENABLE=1 pip install .``, see pyproject.toml) compiles the request-path modules
with mypyc; the build leaves the extension modules next to the sources, where Python imports them in preference to
the ``.py`` files. In a checkout that is a trap: edit a source file and the old compiled module still runs. So
importing the package warns when a compiled module is older than its source.
"""

from __future__ import annotations

import importlib.machinery
import warnings
from pathlib import Path
from typing import Final

__all__ = ["STALE_AFTER_SECONDS", "compiled_modules", "stale_compiled_modules", "warn_if_stale"]

PACKAGE_DIR: Final = Path(__file__).resolve().parent
# An install writes a wheel's .so and .py files a moment apart, in any order: only a source edited clearly after
# the build counts as newer.
STALE_AFTER_SECONDS: Final = 2.0


def _extension_files(package_dir: Path) -> list[tuple[Path, Path]]:
    """(extension module, its source) for every compiled module under ``package_dir`` that has a source beside it."""
    pairs = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for extension in package_dir.rglob(f"*{suffix}"):
            source = extension.with_name(extension.name[: -len(suffix)] + ".py")
            if source.is_file():
                pairs.append((extension, source))
    return pairs


def compiled_modules(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Dotted names of the gateway modules that have a compiled extension module (sorted)."""
    root = package_dir.parent
    return sorted(
        ".".join(source.relative_to(root).with_suffix("").parts) for _, source in _extension_files(package_dir)
    )


def stale_compiled_modules(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Sources edited after their compiled module was built (relative paths, sorted)."""
    root = package_dir.parent
    return sorted(
        str(source.relative_to(root))
        for extension, source in _extension_files(package_dir)
        if source.stat().st_mtime - extension.stat().st_mtime > STALE_AFTER_SECONDS
    )


def warn_if_stale(package_dir: Path = PACKAGE_DIR) -> None:
    stale = stale_compiled_modules(package_dir)
    if stale:
        warnings.warn(
            f"compiled modules are older than their sources ({', '.join(stale)}): the old compiled code runs; "
            "rebuild (HATCH_BUILD_HOOKS_ENABLE=1 pip install .) or delete the *.so files next to them",
            RuntimeWarning,
            stacklevel=2,
        )
