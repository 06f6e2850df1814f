"""`gradprune` command line: run the pipeline flow locally (no server needed)."""

from __future__ import annotations

import argparse
import json
import os
import sys



def prefect_defaults() -> None:
    """Offline-friendly Prefect settings, unless the user set them."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def parse_overrides(items: list[str]) -> dict:
    from gradprune.config import parse_value

    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {item!r}: write key.path=value, e.g. masks.sparsity=0.7")
        overrides[key.strip()] = parse_value(text)
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gradprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline as a Prefect flow through DVC")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a params.yaml key (repeatable)")
    run.add_argument("--repo", default=".", help="repository root (default: current folder)")
    args = parser.parse_args(argv)

    prefect_defaults()
    from gradprune.config import ParamError
    from flows.pipeline import pipeline

    try:
        outcome = pipeline(overrides=parse_overrides(args.overrides) or None, repo=args.repo)
    except ParamError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(outcome, indent=2))


if __name__ == "__main__":
    main()
