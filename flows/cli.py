"""`gradprune` command line: run the pipeline flow locally (no server needed)."""

from __future__ import annotations

import argparse
import json
import os
import re
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
        if isinstance(value, dict):
            # Hydra merges into a mapping key by key; delete and re-add to replace it as --set does.
            args += ["-S", f"~{key}", "-S", f"+{key}={hydra(value)}"]
        else:
            args += ["-S", f"{key}={hydra(value)}"]
    return args


def hydra(value) -> str:
    """A value in the Hydra override grammar `dvc exp run -S` parses: [a,b], {k:v}, 'quoted'."""
    from gradprune.config import parse_value

    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra(v) for v in value) + "]"
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z_][\w./-]*", value) and parse_value(value) == value
        return value if plain else "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return json.dumps(value)  # numbers, true/false, null


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
    exp.add_argument("targets", nargs="*", help="stages to run with what they need (default: all)")
    args = parser.parse_args(argv)

    from gradprune.config import ParamError
    try:
        overrides = {**(preset_overrides(args.preset) if args.preset else {}),
                     **parse_overrides(args.overrides)}
        if args.command == "exp":
            import subprocess
            cmd = [sys.executable, "-m", "dvc", "exp", "run", *args.targets,
                   *dvc_set_arguments(overrides)]
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
