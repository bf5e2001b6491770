"""The command line of tests/chaos/run (docs/testing.md, "The chaos harness")."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from .harness import LOGS, Options, Run
from .schedule import CLASSES, DEFAULT_CLASSES, describe, draw

EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tests/chaos/run",
        description="Random faults against a two-node fusemirror cluster in network "
                    "namespaces, with an acknowledged-write checker (issue 7).")
    p.add_argument("--minutes", type=float, default=10.0, help="how long faults are injected")
    p.add_argument("--seed", type=int, default=1, help="the schedule's seed (replays it)")
    p.add_argument("--json", metavar="FILE", help="write the whole report as JSON to FILE")
    p.add_argument("--classes", help="comma-separated fault classes (default: all): "
                                     + ", ".join(CLASSES))
    p.add_argument("--max-faults", type=int, help="draw at most this many faults")
    p.add_argument("--no-disk-full", action="store_true",
                   help="no tmpfs folders: leaves out disk-full")
    p.add_argument("--no-proxy", action="store_true",
                   help="no corrupting proxy on the replication path: leaves out corrupt-frame")
    p.add_argument("--no-checker", action="store_true",
                   help="no [[checker]] on the application's /ready in the module")
    p.add_argument("--logs", default=LOGS, metavar="DIR",
                   help=f"where the logs of a failed run are copied (default {LOGS})")
    p.add_argument("--keep-logs", action="store_true", help="copy the logs even on success")
    p.add_argument("--dry-run", action="store_true", help="print the schedule and stop")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.minutes <= 0:
        p.error("--minutes must be positive")
    classes = tuple(args.classes.split(",")) if args.classes else DEFAULT_CLASSES
    if args.no_disk_full:
        classes = tuple(c for c in classes if c != "disk-full")
    if args.no_proxy:
        classes = tuple(c for c in classes if c != "corrupt-frame")
    unknown = [c for c in classes if c not in CLASSES]
    if unknown or not classes:
        p.error(f"unknown fault classes: {', '.join(unknown)}" if unknown else "no classes")
    args.classes = classes
    return args


def options(args: argparse.Namespace) -> Options:
    return Options(minutes=args.minutes, seed=args.seed, classes=args.classes,
                   disk=not args.no_disk_full, proxy=not args.no_proxy,
                   checker=not args.no_checker,
                   max_faults=args.max_faults, logs=args.logs, keep_logs=args.keep_logs)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    if args.dry_run:
        print(describe(draw(args.seed, args.max_faults or 20, args.classes)))
        return EXIT_PASS
    if os.geteuid() != 0:
        print("tests/chaos/run: run as root (network namespaces, FUSE mounts)", file=sys.stderr)
        return EXIT_USAGE
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        result = Run(options(args)).execute()
    except KeyboardInterrupt:
        print("tests/chaos/run: interrupted; everything started was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
            f.write("\n")
    print(result["text"], flush=True)
    return EXIT_PASS if result["passed"] else EXIT_FAIL
