"""gateway.native: which modules run compiled, and the warning about compiled modules older than their sources."""

from __future__ import annotations

import importlib.machinery
import os
import tomllib
from pathlib import Path

import pytest

import gateway
from gateway import middleware
from gateway.native import STALE_AFTER_SECONDS, compiled_modules, stale_compiled_modules, warn_if_stale

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
REPO = Path(__file__).resolve().parents[1]


def fake_package(tmp_path: Path, modules: dict[str, float]) -> Path:
    """A package dir with ``name.py`` and ``name<SUFFIX>`` per module; the float is the source's age over the build."""
    package = tmp_path / "gateway"
    (package / "sinks").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text("")  # a pure module: no extension beside it
    for name, source_newer_by in modules.items():
        source = package / f"{name}.py"
        extension = package / f"{name}{SUFFIX}"
        source.write_text("")
        extension.write_bytes(b"")
        built = 1_700_000_000.0
        os.utime(extension, (built, built))
        os.utime(source, (built + source_newer_by, built + source_newer_by))
    (package / f"orphan{SUFFIX}").write_bytes(b"")  # no source beside it (e.g. a vendored extension): ignored
    return package


def test_compiled_modules_are_named_by_their_sources(tmp_path: Path) -> None:
    package = fake_package(tmp_path, {"middleware": 0.0, "sinks/ga4": 0.0})
    assert compiled_modules(package) == ["gateway.middleware", "gateway.sinks.ga4"]


def test_a_pure_package_has_no_compiled_modules(tmp_path: Path) -> None:
    assert compiled_modules(fake_package(tmp_path, {})) == []


@pytest.mark.parametrize(
    ("source_newer_by", "stale"),
    [(-60.0, False), (0.0, False), (STALE_AFTER_SECONDS, False), (STALE_AFTER_SECONDS + 0.5, True), (3600.0, True)],
)
def test_a_source_edited_after_the_build_is_stale(tmp_path: Path, source_newer_by: float, stale: bool) -> None:
    package = fake_package(tmp_path, {"middleware": source_newer_by, "clientip": 0.0})
    assert stale_compiled_modules(package) == (["gateway/middleware.py"] if stale else [])


def test_stale_modules_warn_with_their_names_and_the_fix(tmp_path: Path) -> None:
    package = fake_package(tmp_path, {"middleware": 3600.0, "consent": 3600.0, "clientip": 0.0})
    with pytest.warns(RuntimeWarning, match=r"gateway/consent\.py, gateway/middleware\.py.*rebuild") as caught:
        warn_if_stale(package)
    assert "clientip" not in str(caught[0].message)


def test_fresh_modules_do_not_warn(tmp_path: Path) -> None:
    warn_if_stale(fake_package(tmp_path, {"middleware": 0.0}))  # filterwarnings = error: a warning would fail this


def test_the_compile_list_names_existing_modules() -> None:
    hook = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    listed = hook["hooks"]["mypyc"]["include"]
    assert listed == sorted(listed)
    missing = [path for path in listed if not (REPO / path).is_file()]
    assert not missing


def test_the_build_under_test_is_the_one_ci_asked_for() -> None:
    """CI runs the suite twice: pure Python, then on the compiled build (PRIVACY_GATEWAY_BUILD=compiled).

    (Not a GATEWAY_* variable: conftest removes those, so the developer's shell cannot change a test's outcome.)
    """
    hook = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    expected = sorted(".".join(Path(path).with_suffix("").parts) for path in hook["hooks"]["mypyc"]["include"])
    running = compiled_modules(Path(gateway.__file__).resolve().parent)
    if os.environ.get("PRIVACY_GATEWAY_BUILD") == "compiled":
        assert running == expected
        assert middleware.__file__ is not None and middleware.__file__.endswith(SUFFIX)
    else:
        assert running == []
