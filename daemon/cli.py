"""The `scanwatch` command line: run, check-config, scan, status, quarantine, journal.

docs/contract.md#command-line is what it promises.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from daemon import __version__
from daemon.config import Config, find_config, load_config
from daemon.engines import build_engines
from daemon.errors import ConfigError, EngineThrottledError, JournalDamagedError, JournalError, ScanwatchError
from daemon.journal import is_damage, open_journal
from daemon.log import configure_logging
from daemon.model import VerdictKind
from daemon.naming import printable

__all__ = ["main"]

EXIT_OK, EXIT_INFECTED, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3
_SURROGATE = re.compile("[\udc80-\udcff]")
EXIT_JOURNAL = 1  # the journal or state_dir cannot be used (docs/operations.md)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scanwatch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"scanwatch {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="config file (default: $SCANWATCH_CONFIG, "
                                         "then /etc/scanwatch/scanwatch.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    check = sub.add_parser("check-config", parents=[common], help="validate; print the plan")
    check.add_argument("--probe", action="store_true", help="also contact every engine once")
    scan = sub.add_parser("scan", parents=[common], help="scan files now")
    scan.add_argument("--watch", help="apply this watch's policy")
    scan.add_argument("--json", action="store_true", help="one JSON object per file")
    scan.add_argument("--move", action="store_true", help="move files under the source as the daemon would")
    scan.add_argument("--rescan-clean", metavar="WATCH",
                      help="scan the watch's clean files again; quarantine the newly infected")
    scan.add_argument("--fresh", action="store_true",
                      help="with --rescan-clean: start over instead of resuming an interrupted rescan")
    scan.add_argument("paths", nargs="*", metavar="PATH_OR_URL")
    status = sub.add_parser("status", parents=[common], help="counts, oldest pending, engine health")
    status.add_argument("--json", action="store_true")
    quarantine = sub.add_parser("quarantine", help="handle quarantined files")
    qsub = quarantine.add_subparsers(dest="action", required=True)
    qlist = qsub.add_parser("list", parents=[common])
    qlist.add_argument("--watch")
    qlist.add_argument("--since", help="ISO date or time, e.g. 2026-11-22")
    qlist.add_argument("--threat", help="substring of a threat name")
    qlist.add_argument("--json", action="store_true")
    qshow = qsub.add_parser("show", parents=[common])
    qshow.add_argument("id", type=int)
    qrelease = qsub.add_parser("release", parents=[common])
    qrelease.add_argument("id", type=int)
    qrelease.add_argument("--to", help="directory to release to (default: the watch's clean)")
    qrelease.add_argument("--reason", default="", help="why (kept in the audit trail)")
    qrelease.add_argument("--force", action="store_true",
                          help="accepted for scripts of earlier versions; release needs no flag")
    qdelete = qsub.add_parser("delete", parents=[common])
    qdelete.add_argument("id", type=int)
    qdelete.add_argument("--reason", default="", help="why (kept in the audit trail)")
    cache = sub.add_parser("cache", help="the verdict cache (docs/engines.md)")
    csub = cache.add_subparsers(dest="action", required=True)
    cclear = csub.add_parser("clear", parents=[common],
                             help="forget kept verdicts: the next copy of any bytes is scanned again")
    cclear.add_argument("--engine", help="only this engine's (default: every engine's)")
    journal = sub.add_parser("journal", help="check the journal, or rebuild it from the destinations")
    jsub = journal.add_subparsers(dest="action", required=True)
    jsub.add_parser("check", parents=[common], help="exit 0 when sound, 1 when damaged")
    jsub.add_parser("rebuild", parents=[common],
                    help="move the journal aside; rebuild history from clean/quarantine/failed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "scan" and bool(args.paths) == bool(args.rescan_clean):
        parser.error("scan needs either paths or --rescan-clean WATCH (not both)")
    config_path = find_config(args.config)
    try:
        config = load_config(config_path)
        # The daemon logs to stdout; every other command's stdout is its output, one line
        # (or `--json` object) per file, so its log records go to stderr (docs/contract.md).
        configure_logging(config.log.format, config.log.level, to_stderr=args.command != "run")
        return int(_COMMANDS[args.command](args, config_path, config))
    except ConfigError as exc:
        print(f"scanwatch: {config_path} is not valid:", file=sys.stderr)
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    except JournalDamagedError as exc:
        print(f"scanwatch: {exc}; {_REBUILD_HINT.format(config_path)}", file=sys.stderr)
        return EXIT_JOURNAL
    except JournalError as exc:
        print(f"scanwatch: {exc}", file=sys.stderr)
        return EXIT_JOURNAL
    except sqlite3.DatabaseError as exc:
        if not is_damage(exc):
            raise
        print(f"scanwatch: the journal in {config.state_dir} is damaged: {exc}; "
              f"{_REBUILD_HINT.format(config_path)}", file=sys.stderr)
        return EXIT_JOURNAL
    except (ScanwatchError, KeyError) as exc:
        print(f"scanwatch: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace, config_path: str, config: Config) -> int:
    from daemon.handoff import Handoff
    from daemon.service import Service, s3_clients
    from daemon.workers.pool import forked_workers

    # Forked before the journal opens and any thread starts, the workers start with every
    # module imported, the S3 clients made and the handoff's socket (docs/architecture.md,
    # "Start-up").
    s3 = s3_clients(config)
    handoff = Handoff()
    with forked_workers(config, s3, handoff) as forked:
        return Service(config_path, config, forked=forked, s3=s3, handoff=handoff).run()


def _check_config(args: argparse.Namespace, config_path: str, config: Config) -> int:
    engines = build_engines(config)
    print(f"{config_path}: valid")
    print(f"state_dir: {config.state_dir}")
    for name, engine_cfg in config.engines.items():
        settings = engine_cfg.model_dump(mode="json", exclude={"type"})
        print(f"engine {name}: {engine_cfg.type} {json.dumps(settings)}")
    for watch in config.watches:
        print(f"watch {watch.name}: {watch.source} -> engine {watch.engine_label}")
        for key, dest in watch.destinations.items():
            print(f"  {key:<10} {dest}")
        print(f"  ignore     {', '.join(watch.ignore)}; settle {watch.settle_seconds:g}s; "
              f"rescan every {watch.rescan_interval:g}s")
    status = EXIT_OK
    if args.probe:
        for name, engine in engines.items():
            try:
                print(f"probe {name}: ok ({engine.probe()})")
            except EngineThrottledError as exc:  # reachable, credentials taken: it only paces us
                print(f"probe {name}: ok (throttled: {exc})")
            except ScanwatchError as exc:
                print(f"probe {name}: FAILED: {exc}")
                status = EXIT_FAILED
    return status


def _scan(args: argparse.Namespace, config_path: str, config: Config) -> int:
    from daemon.oneshot import scan_paths

    engines = build_engines(config)
    if args.rescan_clean:
        return _rescan(args, config, engines)
    journal = open_journal(config.state_dir) if args.move else None
    results = scan_paths(config, engines, args.paths, watch_name=args.watch, move=args.move,
                         journal=journal)
    for r in results:
        if args.json:
            print(_json({"path": r.path, "verdict": r.verdict.value, "threats": list(r.threats),
                         "reason": r.reason, "sha256": r.sha256,
                         "external_reference_id": r.external_reference_id,
                         "destination": r.destination}))
        else:
            detail = ", ".join(r.threats) if r.verdict is VerdictKind.INFECTED else r.reason
            line = f"{printable(r.path)}: {r.verdict.value}" + (f" ({detail})" if detail else "")
            print(line + (f" -> {printable(r.destination)}" if r.destination else ""))
    verdicts = {r.verdict for r in results}
    if VerdictKind.FAILED in verdicts:
        return EXIT_FAILED
    return EXIT_INFECTED if VerdictKind.INFECTED in verdicts else EXIT_OK


def _rescan(args: argparse.Namespace, config: Config, engines: dict[str, Any]) -> int:
    from daemon.rescan import RescanOutcome, rescan_clean

    summary = rescan_clean(config, engines, open_journal(config.state_dir), args.rescan_clean,
                           stream=sys.stderr, fresh=args.fresh)
    for moved in summary.moved:
        if args.json:
            print(_json({"path": moved.path, "verdict": VerdictKind.INFECTED.value,
                         "threats": list(moved.threats), "destination": moved.destination}))
        else:
            print(f"{printable(moved.path)}: infected ({', '.join(moved.threats)}) "
                  f"-> {printable(moved.destination)}")
    if summary.counts.get(RescanOutcome.FAILED, 0):
        return EXIT_FAILED
    return EXIT_INFECTED if summary.counts.get(RescanOutcome.INFECTED, 0) else EXIT_OK


def _status(args: argparse.Namespace, config_path: str, config: Config) -> int:
    from daemon.status import collect, render

    status = collect(config, open_journal(config.state_dir))
    print(_json(status, indent=2) if args.json else render(status))
    return EXIT_OK


def _quarantine(args: argparse.Namespace, config_path: str, config: Config) -> int:
    from daemon import quarantine
    from daemon.outcome_facts import iso

    journal = open_journal(config.state_dir)
    if args.action == "list":
        since = datetime.fromisoformat(args.since).timestamp() if args.since else None
        rows = quarantine.list_quarantined(journal, watch=args.watch, since=since, threat=args.threat)
        for row in rows:
            item: dict[str, Any] = {"id": row.id, "watch": row.watch, "rel_path": row.rel_path,
                                    "threats": row.threats or [], "quarantined_at": iso(row.done_at),
                                    "destination": row.destination,
                                    "external_reference_id": row.ref_id}
            if args.json:
                print(_json(item))
            else:
                print(f"{row.id:>6}  {iso(row.done_at)}  {row.watch}  {printable(row.rel_path)}  "
                      f"[{', '.join(row.threats or [])}]")
    elif args.action == "show":
        print(_json(quarantine.describe(config, journal, args.id), indent=2))
    elif args.action == "release":
        destination = quarantine.release(config, journal, args.id, reason=args.reason, to=args.to)
        print(f"released {args.id} to {printable(destination)}")
    else:
        quarantine.delete(config, journal, args.id, reason=args.reason)
        print(f"deleted {args.id}")
    return EXIT_OK


def _json(value: Any, indent: int | None = None) -> str:
    """JSON with names exact: a byte that is not UTF-8 (`os.fsdecode` makes it U+DC80-U+DCFF)
    is written as that escape, `\\udcff`, so the output stays UTF-8 (README.md, "What happens to a file")."""
    text = json.dumps(value, indent=indent, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)
_REBUILD_HINT = ("stop the daemon and run `scanwatch journal rebuild --config {}` "
                 "(docs/operations.md, \"When things go wrong\")")


def _journal(args: argparse.Namespace, config_path: str, config: Config) -> int:
    import daemon.journal.repair as journal_repair

    if args.action == "check":
        problem = journal_repair.check(config.state_dir)
        if problem:
            print(f"scanwatch: {problem}; {_REBUILD_HINT.format(config_path)}")
            return EXIT_JOURNAL
        print(f"{config.state_dir / 'journal.sqlite3'}: ok")
        return EXIT_OK
    done = journal_repair.rebuild(config)
    for path in done.aside:
        print(f"moved aside: {path}")
    for where, count in done.rows.items():
        print(f"{where}: {count} files")
    for url in done.skipped:
        print(f"not rebuilt (S3): {url}")
    print(f"{done.journal}: rebuilt; files still in the sources are scanned when the daemon starts")
    return EXIT_OK


def _cache(args: argparse.Namespace, config_path: str, config: Config) -> int:
    if args.engine is not None and args.engine not in config.engines:
        raise ScanwatchError(f"no engine {args.engine!r} in {config_path}")
    dropped = open_journal(config.state_dir).verdicts.clear(args.engine)
    print(f"{dropped} cached verdicts dropped")
    return EXIT_OK


_COMMANDS = {"run": _run, "check-config": _check_config, "scan": _scan, "status": _status,
             "quarantine": _quarantine, "journal": _journal, "cache": _cache}

if __name__ == "__main__":
    sys.exit(main())
