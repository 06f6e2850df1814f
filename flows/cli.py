"""`gradprune` command line: run the pipeline flow, or a sweep of it, locally (no server
needed)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path



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


def preset_overrides(path: str) -> dict:
    """A preset: a YAML file of dotted params keys (as `--set` and `dvc exp run -S` take)."""
    from gradprune.config import ParamError, read_params_file

    overrides = read_params_file(path)
    flat = [key for key in overrides if "." not in key and key != "seed"]
    if flat:
        raise ParamError(f"{path}: {flat[0]}", "a preset sets dotted keys, e.g. masks.sparsity: 0.7")
    return overrides


def dvc_set_arguments(overrides: dict, params_file: str = "params.yaml") -> list[str]:
    """`-S key=value` arguments for `dvc exp run`, checked against params_file first."""
    from gradprune.config import apply_overrides, read_params_file

    apply_overrides(read_params_file(params_file), overrides)  # a bad key or value fails here
    args = []
    for key, value in overrides.items():
        # JSON is YAML 1.2: lists, mappings, numbers and "2:4" keep their meaning in DVC.
        text = value if isinstance(value, str) and ":" not in value else json.dumps(value)
        args += ["-S", f"{key}={text}"]
    return args


def split_values(text: str) -> list[str]:
    """"a,b,[1, 2]" -> ["a", "b", "[1, 2]"]: commas inside brackets, braces or quotes stay."""
    parts, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    return parts + [current]


def parse_grid(items: list[str]) -> dict[str, list]:
    from gradprune.config import parse_value

    grid: dict[str, list] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise SystemExit(f"error: --grid {item!r}: write key.path=value1,value2, e.g. "
                             "masks.sparsity=0.5,0.7")
        if key in grid:
            raise SystemExit(f"error: --grid {key} given twice; list all its values in one "
                             f"--grid {key}=value1,value2")
        grid[key] = [parse_value(v.strip()) for v in split_values(text)]
    return grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gradprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline as a Prefect flow through DVC")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a params.yaml key (repeatable)")
    run.add_argument("--preset", help="a YAML file of dotted overrides (presets/*.yaml); "
                                      "--set wins over it")
    run.add_argument("--repo", default=".", help="repository root (default: current folder)")
    exp = sub.add_parser("exp", help="run the pipeline as a DVC experiment (`dvc exp run`)")
    exp.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a params.yaml key (repeatable)")
    exp.add_argument("--preset", help="a YAML file of dotted overrides; --set wins over it")
    exp.add_argument("--name", help="the experiment's name in `dvc exp show`")
    sweep = sub.add_parser("sweep", help="run a grid of params points, each a DVC experiment")
    sweep.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                       help="a params.yaml key and its values (repeatable: the grid is every "
                            "combination)")
    sweep.add_argument("--jobs", type=int, default=2, help="points run at once (default: 2)")
    sweep.add_argument("--name", default=None,
                       help="sweep name, prefix of its experiments' names (default: the time)")
    sweep.add_argument("--repo", default=".", help="repository root (default: current folder)")
    args = parser.parse_args(argv)

    from gradprune.config import ParamError
    try:
        if args.command == "sweep":
            from flows.sweep import check_points, grid_points, sweep as run_sweep

            grid = parse_grid(args.grid)
            # Before the flow starts its Prefect server: a bad point fails at once.
            check_points(Path(args.repo) / "params.yaml", grid_points(grid))
            prefect_defaults()
            outcome = run_sweep(grid=grid, jobs=args.jobs, name=args.name, repo=args.repo)
            print(json.dumps(outcome, indent=2))
            return
        overrides = {**(preset_overrides(args.preset) if args.preset else {}),
                     **parse_overrides(args.overrides)}
        if args.command == "exp":
            import subprocess
            cmd = [sys.executable, "-m", "dvc", "exp", "run", *dvc_set_arguments(overrides)]
            print(" ".join(cmd[1:]), flush=True)
            sys.exit(subprocess.run(cmd + (["--name", args.name] if args.name else [])).returncode)
        prefect_defaults()
        from flows.pipeline import pipeline
        outcome = pipeline(overrides=overrides or None, repo=args.repo)
    except (ParamError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(outcome, indent=2))


if __name__ == "__main__":
    main()
