"""The opt-in mypyc-compiled build, built in a scratch copy so it can be measured next to the pure-Python build.

    python -m benchmarks.compiled [--dir DIR]     # build (or reuse) a compiled copy and print what it holds

:func:`build` copies the repository's current working tree (tracked files plus untracked, non-ignored ones:
``git ls-files -co --exclude-standard``, i.e. the sources as they are now, uncommitted edits included) into a scratch
directory and runs the wheel build there with the hatch-mypyc hook enabled
(``HATCH_BUILD_HOOKS_ENABLE=1 python -m pip wheel --no-deps -w DIR .``, see pyproject.toml). The hook compiles *in
place*: the copy ends up with ``gateway/**/*.so`` next to the sources (and a top-level ``<hash>__mypyc`` support
module), and Python imports those in preference to the ``.py`` files. So any process started with the copy as its
working directory and ``PYTHONPATH`` (``python -m`` puts the working directory first on ``sys.path``) runs the
compiled gateway; the ``benchmarks`` package is part of the copy, so the same benchmark code runs there.

The build never happens in the repository itself: stale extension modules there would shadow everyone's edits
(gateway/native.py). Nothing is trusted on faith: after the build, :func:`gateway.native.compiled_modules` must list
compiled modules, a fresh interpreter in the copy must import every one of them from its extension module, and each
benchmark process checks again what it really loaded (:func:`require_build`, :func:`check_process`), so a row
labelled compiled cannot silently be pure Python, nor the other way round.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final, Literal

__all__ = [
    "COMPILED",
    "PURE",
    "BuildKind",
    "CompiledBuild",
    "build",
    "check_process",
    "compiled_build",
    "compiled_build_if_asked",
    "loaded_extension_modules",
    "mapped_extension_modules",
    "require_build",
    "source_files",
    "subprocess_env",
]

REPO: Final = Path(__file__).resolve().parents[1]
PACKAGE: Final = "gateway"
# The two builds, as the results name them.
PURE: Final = "pure Python"
COMPILED: Final = "compiled"
BuildKind = Literal["pure Python", "compiled"]

_EXTENSION_SUFFIXES: Final = tuple(importlib.machinery.EXTENSION_SUFFIXES)
_STAMP: Final = "stamp.json"
_BUILD_TIMEOUT_S: Final = 1800.0
# pip -v shows the build environment's installation ("Successfully installed hatch-mypyc-0.16.0 mypy-1.11.2 ..."):
# the versions that really compiled the code when the build is isolated.
_INSTALLED = re.compile(r"Successfully installed (.+)$", re.MULTILINE)


@dataclasses.dataclass(frozen=True, slots=True)
class CompiledBuild:
    """A compiled copy of the repository (``root``), or why there is none (``root is None``, see ``note``)."""

    root: Path | None
    modules: tuple[str, ...] = ()  # dotted names of the compiled gateway modules
    seconds: float = 0.0  # wall clock of the wheel build (of the original build when reused)
    note: str = ""  # how it was built, or why it was not
    tools: str = ""  # build tool versions, e.g. "hatch-mypyc 0.16.0, mypy 1.11.2"
    reused: bool = False

    @property
    def available(self) -> bool:
        return self.root is not None

    def env(self) -> dict[str, str]:
        """Environment overrides that make a process import the compiled copy (with cwd = ``root``)."""
        if self.root is None:
            raise RuntimeError("no compiled build")
        return {"PYTHONPATH": str(self.root)}

    def describe(self) -> str:
        """One line for the results: what is compiled and how long the build took, or why it is missing."""
        if self.root is None:
            return f"not built: {self.note}"
        how = (
            f"reused from an earlier run (built in {self.seconds:.0f} s)"
            if self.reused
            else (f"built in {self.seconds:.0f} s")
        )
        tools = f" with {self.tools}" if self.tools else ""
        return f"{len(self.modules)} modules compiled by mypyc (hatch-mypyc hook){tools}, {how}: " + ", ".join(
            f"`{module}`" for module in self.modules
        )


# --------------------------------------------------------------------------------------------------------------
# what runs where
# --------------------------------------------------------------------------------------------------------------


def _module_name(path: Path, root: Path) -> str | None:
    """``gateway.sinks.ga4`` for ``root/gateway/sinks/ga4.cpython-311-x86_64-linux-gnu.so``; None for others."""
    for suffix in _EXTENSION_SUFFIXES:
        if path.name.endswith(suffix):
            try:
                relative = path.with_name(path.name[: -len(suffix)]).relative_to(root)
            except ValueError:
                return None
            return ".".join(relative.parts) if relative.parts[:1] == (PACKAGE,) else None
    return None


def loaded_extension_modules() -> list[str]:
    """The gateway modules this process imported from extension modules (the compiled ones), sorted."""
    found = []
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None) or ""
        if (name == PACKAGE or name.startswith(PACKAGE + ".")) and origin.endswith(_EXTENSION_SUFFIXES):
            found.append(name)
    return sorted(found)


def require_build(kind: BuildKind, loaded: Sequence[str], essential: Sequence[str], where: str) -> None:
    """Raise unless ``loaded`` (compiled gateway modules a process runs) matches the build it is measured as.

    Compiled: every module in ``essential`` must be among them. Pure Python: none may be (a stale ``.so`` next to
    the sources would otherwise be measured as pure Python).
    """
    if kind == COMPILED:
        missing = sorted(set(essential) - set(loaded))
        if missing:
            raise RuntimeError(f"{where}: measured as compiled, but runs pure-Python {', '.join(missing)}")
    elif loaded:
        raise RuntimeError(
            f"{where}: measured as pure Python, but imports compiled {', '.join(loaded)} (stale *.so files next to "
            "the sources? delete them)"
        )


def _mapped_files(pid: int) -> set[Path]:
    """The files a running process has mapped (``/proc/<pid>/maps``): among them every extension module it loaded."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    files = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            files.add(Path(fields[5].strip()))
    return files


def mapped_extension_modules(pid: int) -> tuple[dict[str, Path], list[Path]]:
    """What compiled gateway code a running process has loaded, from its memory maps, without asking it.

    Returns the gateway modules whose own extension module is mapped (name -> file) and the mapped mypyc group
    libraries (``<hash>__mypyc.*.so``, next to the package). mypyc compiles the modules of one build into the
    group library; a module's own ``.so`` is only a small shim the import system loads when *Python* code imports it.
    Compiled modules importing each other initialise straight from the group library, so only the entry points
    (e.g. ``gateway.middleware``, imported by the app factory) show up as shims.
    """
    modules: dict[str, Path] = {}
    groups: list[Path] = []
    for path in _mapped_files(pid):
        if not path.name.endswith(_EXTENSION_SUFFIXES):
            continue
        if "__mypyc." in path.name and (path.parent / PACKAGE).is_dir():
            groups.append(path)
            continue
        for parent in path.parents:  # the package directory holding this module: its parent is the checkout
            if parent.name == PACKAGE:
                name = _module_name(path, parent.parent)
                if name:
                    modules[name] = path
                break
    return modules, sorted(groups)


def check_process(pid: int, kind: BuildKind, where: str, root: Path | None = None) -> None:
    """Raise unless the running process ``pid`` runs the ``kind`` build (of the compiled copy ``root``).

    Compiled: the group library of ``root`` and ``gateway.middleware``'s module from ``root`` must be mapped, and no
    compiled gateway code from anywhere else (the build itself verified that every compiled module of ``root``
    imports from its extension module). Pure Python: no compiled gateway code at all.
    """
    modules, groups = mapped_extension_modules(pid)
    if kind == PURE:
        if modules or groups:
            found = ", ".join([*modules, *(str(g) for g in groups)])
            raise RuntimeError(
                f"{where}: measured as pure Python, but runs compiled code ({found}): stale *.so files next to the "
                "sources? delete them"
            )
        return
    if root is None:
        raise ValueError("check_process: a compiled process needs the compiled copy's root")
    problems = []
    if not any(group.parent == root for group in groups):
        problems.append(f"the mypyc group library of {root} is not loaded")
    if modules.get("gateway.middleware", Path()).parent != root / PACKAGE:
        problems.append(f"gateway.middleware is not loaded from {root / PACKAGE}")
    foreign = [f"{name} ({path})" for name, path in modules.items() if root not in path.parents]
    foreign += [str(group) for group in groups if group.parent != root]
    if foreign:
        problems.append("compiled code from elsewhere is loaded: " + ", ".join(foreign))
    if problems:
        raise RuntimeError(f"{where}: measured as compiled, but " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------------------------


def source_files(repo: Path = REPO) -> list[str]:
    """Relative paths of the working tree's files: tracked plus untracked non-ignored (``git ls-files -co``).

    Without git (an unpacked source tree), every file except VCS metadata, caches and build output.
    """
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "-co", "--exclude-standard"],
            cwd=repo,
            capture_output=True,
            timeout=60,
            check=True,
        ).stdout.decode()
        names = [name for name in listed.split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", "__pycache__", "build", "dist", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
        names = [
            str(path.relative_to(repo))
            for path in repo.rglob("*")
            if path.is_file() and not skip.intersection(path.relative_to(repo).parts)
        ]
    # Files listed but deleted in the working tree are skipped; extension modules never travel (they would shadow
    # the sources they were not built from).
    return sorted(name for name in names if (repo / name).is_file() and not name.endswith(_EXTENSION_SUFFIXES))


def _is_build_input(name: str) -> bool:
    """The files the compiled result depends on: the package and the build configuration."""
    return name == "pyproject.toml" or name.startswith(PACKAGE + "/")


def _digest(repo: Path, names: Sequence[str]) -> str:
    """Identifies the build inputs and the interpreter a build belongs to (for reusing a kept build)."""
    digest = hashlib.sha256()
    digest.update(f"{sys.executable}\0{sys.version}\0{sys.platform}\0".encode())
    for name in names:
        if _is_build_input(name):
            digest.update(name.encode() + b"\0" + (repo / name).read_bytes() + b"\0")
    return digest.hexdigest()


def _copy(repo: Path, root: Path, names: Sequence[str]) -> None:
    for name in names:
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, target)


def _tool_versions(log: str, isolated: bool) -> str:
    versions: dict[str, str] = {}
    if isolated:
        for match in _INSTALLED.finditer(log):
            for item in match.group(1).split():
                name, _, version = item.rpartition("-")
                if name.lower().replace("_", "-") in {"hatchling", "hatch-mypyc", "mypy", "setuptools"}:
                    versions[name.lower().replace("_", "-")] = version
    else:
        import importlib.metadata

        for name in ("hatchling", "hatch-mypyc", "mypy", "setuptools"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                versions[name] = importlib.metadata.version(name)
    order = ("hatch-mypyc", "mypy", "hatchling", "setuptools")
    return ", ".join(f"{name} {versions[name]}" for name in order if name in versions)


def _failure(log: str, limit: int = 300) -> str:
    """The most telling line of a failed build's output (its last error), shortened."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    text = (errors or lines or ["no output"])[-1]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _verify_import(root: Path, modules: Sequence[str]) -> list[str]:
    """Import ``modules`` in a fresh interpreter inside ``root``; the ones that came from extension modules."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "from benchmarks.compiled import loaded_extension_modules\n"
        "print(json.dumps(loaded_extension_modules()))\n"
    )
    env = {**_clean_env(), "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"importing the compiled copy failed: {_failure(done.stderr)}")
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "PYTHONPATH"}


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def build(
    directory: Path, repo: Path = REPO, *, progress: Callable[[str], None] = print, reuse: bool = True
) -> CompiledBuild:
    """Copy ``repo``'s working tree to ``directory/src`` and compile it there; never raises for a failed build.

    With ``reuse``, a build already in ``directory`` made from identical package sources (``gateway/``,
    pyproject.toml) by this interpreter is kept, its other files (``benchmarks/``, ...) refreshed from ``repo``.
    """
    from gateway.native import compiled_modules

    root = (directory / "src").resolve()  # as /proc/<pid>/maps names it
    names = source_files(repo)
    if "pyproject.toml" not in names:
        return CompiledBuild(None, note=f"{repo} has no pyproject.toml to build from")
    digest = _digest(repo, names)
    stamp_path = directory / _STAMP
    if reuse and stamp_path.is_file():
        with contextlib.suppress(ValueError, KeyError, OSError):
            stamp = json.loads(stamp_path.read_text())
            modules = compiled_modules(root / PACKAGE)
            if stamp["digest"] == digest and modules == stamp["modules"]:
                # Same package sources: keep the compiled package, refresh everything else (benchmarks/ above all).
                _copy(repo, root, [name for name in names if not _is_build_input(name)])
                progress(f"  reusing the compiled copy in {root} (same gateway sources, same interpreter)")
                return CompiledBuild(root, tuple(modules), float(stamp["seconds"]), stamp["note"], stamp["tools"], True)
    if _compiler() is None:
        return CompiledBuild(None, note="no C compiler (cc/gcc/clang) on PATH; mypyc needs one")

    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(directory / "dist", ignore_errors=True)
    stamp_path.unlink(missing_ok=True)
    root.mkdir(parents=True)
    _copy(repo, root, names)

    # The hook's own build dependencies: from the current interpreter when it has them (no network, no isolated
    # environment to set up), otherwise pip's normal isolated build fetches them from the package index.
    isolated = not all(importlib.util.find_spec(name) for name in ("hatchling", "hatch_mypyc"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(directory / "dist")]
    command += [] if isolated else ["--no-build-isolation"]
    command.append(".")
    env = {**_clean_env(), "HATCH_BUILD_HOOKS_ENABLE": "1"}
    log_path = directory / "build.log"
    how = "isolated build" if isolated else "--no-build-isolation"
    progress(f"  building the compiled copy in {root} ({how}; mypyc takes a minute or two) ...")
    started = time.monotonic()
    try:
        with log_path.open("wb") as log_file:
            done = subprocess.run(
                command, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=_BUILD_TIMEOUT_S
            )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CompiledBuild(None, note=f"the wheel build did not finish: {exc}")
    seconds = time.monotonic() - started
    log = log_path.read_text(errors="replace")
    if done.returncode != 0:
        offline = " (no network for the build dependencies?)" if isolated else ""
        return CompiledBuild(
            None, note=f"the wheel build failed (pip exit {done.returncode}){offline}: {_failure(log)}", seconds=seconds
        )
    modules = compiled_modules(root / PACKAGE)
    if not modules:
        return CompiledBuild(
            None, note="the wheel build succeeded but left no compiled modules (hook not enabled?)", seconds=seconds
        )
    try:
        loaded = _verify_import(root, modules)
    except (OSError, subprocess.SubprocessError, RuntimeError, ValueError) as exc:
        return CompiledBuild(None, note=str(exc), seconds=seconds)
    if sorted(loaded) != modules:
        pure = sorted(set(modules) - set(loaded))
        return CompiledBuild(None, note=f"the copy imports pure-Python {', '.join(pure)} despite the build")
    tools = _tool_versions(log, isolated)
    note = "isolated build (pip)" if isolated else "--no-build-isolation (this interpreter's hatchling/hatch-mypyc)"
    stamp_path.write_text(
        json.dumps({"digest": digest, "modules": modules, "seconds": seconds, "note": note, "tools": tools})
    )
    return CompiledBuild(root, tuple(modules), seconds, note, tools)


@contextlib.contextmanager
def compiled_build(
    directory: Path | None = None, repo: Path = REPO, *, progress: Callable[[str], None] = print
) -> Iterator[CompiledBuild]:
    """:func:`build` in ``directory`` (kept, and reused next time) or in a temporary directory removed afterwards."""
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        yield build(directory.resolve(), repo, progress=progress)
        return
    with tempfile.TemporaryDirectory(prefix="bench-compiled-") as tmp:
        yield build(Path(tmp), repo, progress=progress, reuse=False)


def compiled_build_if_asked(
    stack: contextlib.ExitStack, wanted: bool, directory: Path | None, progress: Callable[[str], None]
) -> CompiledBuild | None:
    """For a section's own command line (``--compiled`` / ``--compiled-dir``): the build, kept open on ``stack``."""
    if not (wanted or directory):
        return None
    result = stack.enter_context(compiled_build(directory, progress=progress))
    progress(f"compiled build: {result.describe()}")
    return result


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a benchmark subprocess: no GATEWAY_* settings, ``extra`` on top."""
    return {**_clean_env(), **(extra or {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="build in (and reuse) this directory; default: a temporary one")
    args = parser.parse_args()
    with compiled_build(args.dir) as result:
        print(result.describe())
        if result.root is not None:
            print(f"compiled copy: {result.root} ({result.note})")
    if not result.available:
        sys.exit(1)


if __name__ == "__main__":
    main()
