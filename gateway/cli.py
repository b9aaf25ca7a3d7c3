"""The ``gateway`` command.

gateway serve   [--config FILE] [--host H] [--port P] [--workers N]   no config: the zero-config demo
gateway deliver --config FILE                                           the host's delivery process (sidecar)
gateway check   --config FILE                                           exit 0 (warnings on stderr), or one error
                                                                        line and exit 2
gateway explain --config FILE [--url URL] [--consent granted|denied|none] [--gpc]
gateway consent export|verify [--config FILE] [--output FILE]
gateway consent migrate --from sqlite:PATH [--config FILE]        SQLite log -> the configured PostgreSQL one
gateway status  [--url URL] [--token TOKEN]                             counters of a running server
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from gateway.config import ConfigError, Settings, load_settings

__all__ = ["main"]

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="privacy-gateway: a privacy notice enforced in code")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway (no --config: the demo)")
    serve.add_argument("--config", help="TOML settings file; omit for the zero-config demo")
    serve.add_argument("--host", help="bind address (default: server.host)")
    serve.add_argument("--port", type=int, help="bind port (default: server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (default: server.workers)")

    deliver = commands.add_parser(
        "deliver", help="run the host's delivery process (sidecar for workers in dispatch.mode = 'deliverer')"
    )
    deliver.add_argument("--config", required=True, help="the same settings file the request workers use")

    check = commands.add_parser("check", help="validate a settings file")
    check.add_argument("--config", required=True)

    explain = commands.add_parser("explain", help="show what each destination would receive for a page view")
    explain.add_argument("--config", required=True)
    explain.add_argument("--url", help="the sample page URL")
    explain.add_argument("--consent", choices=("granted", "denied", "none"), default="none")
    explain.add_argument("--gpc", action="store_true", help="the visitor sends Sec-GPC: 1")

    consent = commands.add_parser("consent", help="the consent receipt log")
    consent_commands = consent.add_subparsers(dest="consent_command", required=True)
    export = consent_commands.add_parser("export", help="write every receipt as a JSON line")
    export.add_argument("--config")
    export.add_argument("--output", default="-", help="file to write (default: standard output)")
    verify = consent_commands.add_parser("verify", help="check the hash chain of the receipt log")
    verify.add_argument("--config")
    migrate = consent_commands.add_parser(
        "migrate", help="copy a SQLite receipt log into the configured (PostgreSQL) one, verifying both"
    )
    migrate.add_argument("--config")
    migrate.add_argument("--from", dest="source", required=True, metavar="sqlite:PATH")

    status = commands.add_parser("status", help="print the delivery counters of a running gateway")
    status.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway's base URL")
    status.add_argument("--prefix", default="/_privacy")
    status.add_argument("--token", help="metrics bearer token (needed from untrusted addresses)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        code = _run(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        code = EXIT_CONFIG
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _run(args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "serve":
        from gateway.app import serve

        return serve(args.config, host=args.host, port=args.port, workers=args.workers)
    if command == "deliver":
        from gateway.delivery.deliverer import run_deliverer

        return run_deliverer(load_settings(args.config, overrides={"dispatch": {"mode": "deliverer"}}))
    if command == "check":
        return _check(args.config)
    if command == "explain":
        return _explain(args)
    if command == "consent":
        return _consent(args)
    if command == "status":
        return _status(args)
    raise AssertionError(command)  # pragma: no cover - argparse rejects unknown commands


def _load_for_inspection(path: str) -> Settings:
    """Settings for commands that only read them (check, explain): a missing ${VAR} secret is a warning here."""
    settings = load_settings(path, missing_env="warn")
    for line in settings.warnings:
        print(line, file=sys.stderr)
    return settings


def _check(path: str) -> int:
    settings = _load_for_inspection(path)
    # Opening what startup opens catches a missing/corrupt geo database or a bad destination here too.
    from gateway.geo import open_geo
    from gateway.sinks.factory import build_sinks

    open_geo(settings.geo.database, settings.anonymize.ipv4_prefix, settings.anonymize.ipv6_prefix).close()
    sinks = build_sinks(settings)
    names = ", ".join(s.name for s in sinks) or "none"
    print(f"config ok: {path} (upstream: {settings.upstream.url or 'none'}; destinations: {names})")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from gateway.explain import explain

    settings = _load_for_inspection(args.config)
    kwargs: dict[str, object] = {"consent": args.consent, "gpc": args.gpc}
    if args.url:
        kwargs["url"] = args.url
    for row in explain(settings, **kwargs):  # type: ignore[arg-type]
        print(json.dumps(row, indent=2, sort_keys=True))
    return 0


def _settings_or_default(path: str | None) -> Settings:
    return load_settings(path) if path else load_settings()


def _consent(args: argparse.Namespace) -> int:
    from gateway.receipts import open_receipt_log

    settings = _settings_or_default(args.config)
    consent = settings.consent
    # Read-only: the command line never moves a running gateway's queued receipts.
    log = open_receipt_log(consent.receipts, consent.receipts_queue, drain=False)
    if log is None:
        print("config error: consent.receipts: '' the receipt log is disabled", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.consent_command == "migrate":
            return _migrate(args.source, log)
        if args.consent_command == "export":
            if args.output == "-":
                count = log.export(sys.stdout)
            else:
                with open(args.output, "w", encoding="utf-8") as out:
                    count = log.export(out)
            print(f"exported {count} receipts", file=sys.stderr)
            return 0
        result = log.verify()
        if result.ok:
            print(f"ok: {result.count} receipts, hash chain intact")
            return 0
        print(f"TAMPERED: row {result.first_bad_row}: {result.reason}")
        return 1
    finally:
        log.close()


def _migrate(source: str, target: object) -> int:
    """``gateway consent migrate --from sqlite:PATH``: verify the source, append its receipts in order, verify the
    target. Each row keeps its record (and so its original time); rows already migrated are skipped."""
    from gateway.receipts import ReceiptLog
    from gateway.receipts_pg import PostgresReceiptLog

    if not isinstance(target, PostgresReceiptLog):
        print("config error: consent.receipts: migrate needs a postgresql:// receipt log", file=sys.stderr)
        return EXIT_CONFIG
    path = source.removeprefix("sqlite:")
    if not source.startswith("sqlite:") or not path or not os.path.exists(path):
        print(f"migrate: --from {source!r}: expected sqlite:PATH of an existing receipt log", file=sys.stderr)
        return EXIT_CONFIG
    log = ReceiptLog(path)
    try:
        checked = log.verify()
        if not checked.ok:
            print(f"TAMPERED: source row {checked.first_bad_row}: {checked.reason}; nothing migrated")
            return 1
        rows = [(f"sqlite:{digest}", record) for _, record, _, digest in log.rows()]
    finally:
        log.close()
    target.import_rows(rows)
    result = target.verify()
    if not result.ok:
        print(f"TAMPERED: row {result.first_bad_row}: {result.reason}")
        return 1
    print(f"ok: {checked.count} receipts from {path} verified and migrated; {result.count} receipts, hash chain intact")
    return 0


def _status(args: argparse.Namespace) -> int:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"authorization": f"Bearer {args.token}"} if args.token else {}
    url = f"{args.url.rstrip('/')}{args.prefix}/metrics"
    try:
        response = httpx.get(url, headers=headers, timeout=5.0, trust_env=False)
    except httpx.HTTPError as exc:
        print(f"cannot reach {url}: {exc.__class__.__name__}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"{url} answered {response.status_code}", file=sys.stderr)
        return 1
    table: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            destination = sample.labels.get("destination")
            if destination is None or sample.name.endswith("_created"):
                continue
            column = sample.name.removeprefix("gateway_").removeprefix("dispatch_").removesuffix("_total")
            if "reason" in sample.labels:
                column = f"{column}[{sample.labels['reason']}]"
            row = table.setdefault(destination, {})
            row[column] = row.get(column, 0.0) + sample.value
    if not table:
        print("no destinations")
        return 0
    columns = sorted({c for row in table.values() for c in row})
    width = max(len(c) for c in columns)
    print(f"{'':{width}}  " + "  ".join(f"{d:>12}" for d in table))
    for column in columns:
        print(f"{column:{width}}  " + "  ".join(f"{table[d].get(column, 0):>12g}" for d in table))
    return 0
