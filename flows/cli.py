"""`gradprune` command line: run the pipeline flow now, or schedule it on a Prefect server.

    gradprune check  [--stage STAGE]...                         params and every artifact the
                                                                stages read, in seconds: run it
                                                                before `dvc repro`
    gradprune track                                             log to MLflow the stages that ran
                                                                while it was unreachable
    gradprune run    [--set KEY=VALUE]... [--stage STAGE]...   run now (no server needed)
    gradprune serve  --cron "0 3 * * *" [...]                   schedule; this process runs them
    gradprune deploy --pool NAME --cron "0 3 * * *" [...]       schedule on a process work pool;
                                                                `prefect worker start --pool NAME`
                                                                runs them
    gradprune exp    [--preset FILE] [--set KEY=VALUE]... [STAGE]...   a DVC experiment
    gradprune sweep  --grid KEY=V1,V2 [--grid ...] [--jobs N]     a grid of DVC experiments
    gradprune table  [--reports reports]                          the comparison, < 120 columns
    gradprune export [--out exports] [--gguf-dtype f16|f32]       final model: HF, sparse, GGUF
    gradprune plan   --config config.json [--device-memory GIB]   memory and disk per stage,
                     [--processes N]                            predicted on the meta device
Every command takes --preset presets/<name>.yaml (dotted overrides); --set wins over it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flows.overrides import dvc_set_arguments, parse_grid, preset_overrides
from gradprune.config import parse_overrides


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# A flow run outlives a Prefect server outage of about 4 minutes (a restart): its client retries
# a refused request 7 times, 2, 4, ..., 128 s apart. With Prefect's default (5 times, up to 32 s
# apart: about a minute) a 70 s outage ended the run Crashed though its stage had run
# (tests/test_scheduling.py, docs/RELIABILITY.md).
CLIENT_RETRIES = "7"


def prefect_defaults() -> None:
    """Offline-friendly Prefect settings, and client retries that outlast a server restart,
    unless the user set them."""
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", CLIENT_RETRIES)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def flow_parameters(args: argparse.Namespace, overrides: dict) -> dict:
    """The pipeline flow's parameters, checked against the repository before anything runs:
    a scheduled run must not be the first to find a bad params file, override or stage name."""
    from flows.dag import stage_graph, topological_order
    from gradprune.config import apply_overrides, read_params_file

    root = Path(args.repo).resolve()
    apply_overrides(read_params_file(root / "params.yaml"), overrides)
    topological_order(stage_graph(root / "dvc.yaml"), args.stages or None)
    return {"overrides": overrides or None, "repo": str(root), "stages": args.stages or None}


def preflight(root: Path, stages: list[str] | None) -> list[str]:
    """`gradprune check` of `stages` and everything upstream of them (as `dvc repro` runs)."""
    from flows.dag import stage_graph, topological_order
    from tasks.artifacts import check_pipeline

    try:
        order = topological_order(stage_graph(root / "dvc.yaml"), stages)
    except (ValueError, FileNotFoundError) as err:
        return [str(err)]
    return check_pipeline(root, order)


def check_cron(cron: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise ValueError(f"--cron {cron!r}: not a cron expression; write five fields, minute "
                         "hour day-of-month month day-of-week, e.g. '0 3 * * *'") from None


def require_server() -> None:
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        fail("scheduling needs a Prefect server: start one with `prefect server start --host "
             "127.0.0.1 --port 4200`, then export PREFECT_API_URL=http://127.0.0.1:4200/api")


def serve(name: str, cron: str | None, parameters: dict) -> None:
    from flows.pipeline import pipeline

    # Blocks: this process polls the server and runs each scheduled or triggered flow run in
    # a subprocess, one at a time (two runs in one workspace would race on DVC's lock).
    pipeline.serve(name=name, cron=cron, parameters=parameters, global_limit=1,
                   pause_on_shutdown=False)


def deploy(name: str, cron: str | None, parameters: dict, pool: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.asyncutils import run_coro_as_sync

    from flows.pipeline import pipeline

    async def pool_type() -> str:
        async with get_client() as client:
            try:
                return (await client.read_work_pool(pool)).type
            except ObjectNotFound:
                await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                print(f"created process work pool {pool!r}")
                return "process"

    found = run_coro_as_sync(pool_type())
    if found != "process":
        fail(f"--pool {pool!r} is a {found!r} work pool; the pipeline runs in a repository on "
             "the worker's disk, so use a 'process' pool (another name creates one)")
    # The worker runs the flow in the repository folder: on another machine, a clone at the
    # same path (see docs/SCALE.md).
    deployment_id = pipeline.from_source(
        source=parameters["repo"], entrypoint="flows/pipeline.py:pipeline",
    ).deploy(name=name, work_pool_name=pool, cron=cron, parameters=parameters,
             concurrency_limit=1, print_next_steps=False, ignore_warnings=True,
             # The worker's environment is not ours: its flow runs get the retries here.
             job_variables={"env": {"PREFECT_CLIENT_MAX_RETRIES":
                                    os.environ["PREFECT_CLIENT_MAX_RETRIES"]}})
    print(f"deployment gradprune-pipeline/{name} ({deployment_id}) on pool {pool!r}; "
          f"start a worker: prefect worker start --pool {pool}")


def print_plan(args: argparse.Namespace) -> int:
    """The plan as a table (or JSON); exit status 1 when a stage does not fit."""
    from gradprune.config import apply_overrides, params_from_dict, read_params_file
    from gradprune.plan import plan_stages, plan_table, read_llama_config

    overrides = {**(preset_overrides(args.preset) if args.preset else {}),
                 **parse_overrides(args.overrides)}
    params = params_from_dict(apply_overrides(read_params_file(args.params), overrides))
    rows = plan_table(plan_stages(read_llama_config(args.config), params,
                                  processes=args.processes), args.cpu)
    limit = args.device_memory * 2**30
    for row in rows:
        row["fits"] = args.cpu or row["device"] <= limit
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        gib = 2**30
        where = "CPU" if args.cpu else f"{args.device_memory:g} GiB GPU"
        print(f"plan for {args.config} ({where}"
              + (f", {args.processes} processes" if args.processes > 1 else "") + ")")
        print(f"{'stage':<10} {'device GiB':>11} {'host GiB':>9} {'disk GiB':>9}  fits  "
              "largest device parts")
        for row in rows:
            parts = sorted(row["device_parts"].items(), key=lambda kv: -kv[1])[:3]
            print(f"{row['stage']:<10} {row['device'] / gib:>11.1f} {row['host'] / gib:>9.1f} "
                  f"{row['disk'] / gib:>9.1f}  {'yes' if row['fits'] else 'NO ':<4}  "
                  + ", ".join(f"{k} {v / gib:.1f}" for k, v in parts))
    return 0 if all(row["fits"] for row in rows) else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gradprune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline as a Prefect flow through DVC")
    serve_cmd = sub.add_parser("serve", help="schedule the flow on the Prefect server at "
                               "PREFECT_API_URL and run its flow runs in this process")
    deploy_cmd = sub.add_parser("deploy", help="schedule the flow on a process work pool of the "
                                "Prefect server at PREFECT_API_URL")
    exp = sub.add_parser("exp", help="run the pipeline as a DVC experiment (`dvc exp run`)")
    for command in (run, serve_cmd, deploy_cmd, exp):
        command.add_argument("--set", dest="overrides", action="append", default=[],
                             metavar="KEY=VALUE", help="override a params.yaml key (repeatable)")
        command.add_argument("--preset", help="a YAML file of dotted overrides (presets/*.yaml); "
                                              "--set wins over it")
    for command in (run, serve_cmd, deploy_cmd):
        command.add_argument("--stage", dest="stages", action="append", default=[],
                             metavar="STAGE", help="run only this stage and what it depends on "
                             "(repeatable; default: every stage)")
        command.add_argument("--repo", default=".", help="repository root (default: current folder)")
    for command in (serve_cmd, deploy_cmd):
        command.add_argument("--name", default="gradprune", help="deployment name (default: %(default)s)")
        command.add_argument("--cron", default=None, help="schedule, e.g. '0 3 * * *' (03:00 "
                             "every day, UTC); without it the deployment runs only when triggered")
    deploy_cmd.add_argument("--pool", required=True, help="process work pool (created if missing)")
    exp.add_argument("--name", help="the experiment's name in `dvc exp show`")
    exp.add_argument("targets", nargs="*", help="stages to run with what they need (default: all)")
    check = sub.add_parser("check", help="check params.yaml and every artifact the stages read "
                           "(seconds, nothing computed): run it before `dvc repro`, which "
                           "removes a stage's outputs before the stage can refuse bad input")
    check.add_argument("--stage", dest="stages", action="append", default=[], metavar="STAGE",
                       help="check only what this stage and its upstream stages read "
                            "(repeatable; default: every stage)")
    check.add_argument("--repo", default=".", help="repository root (default: current folder)")
    track = sub.add_parser("track", help="log to MLflow the stages that ran while it was "
                           "unreachable (mlflow-untracked.json), and mark runs whose process "
                           "died KILLED")
    track.add_argument("--repo", default=".", help="repository root (default: current folder)")
    sweep = sub.add_parser("sweep", help="run a grid of params points, each a DVC experiment")
    sweep.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                       help="a params.yaml key and its values (repeatable: the grid is every "
                            "combination)")
    sweep.add_argument("--jobs", type=int, default=2, help="points run at once (default: 2)")
    sweep.add_argument("--name", default=None,
                       help="sweep name, prefix of its experiments' names (default: the time)")
    sweep.add_argument("--repo", default=".", help="repository root (default: current folder)")
    plan_cmd = sub.add_parser("plan", help="predicted peak device and host memory and disk bytes "
                              "of every stage for a LLaMA config.json (no weights needed)")
    plan_cmd.add_argument("--config", required=True,
                          help="a LLaMA config.json or model folder, e.g. "
                               "presets/llama2-7b-config.json")
    plan_cmd.add_argument("--device-memory", type=float, default=80.0, metavar="GIB",
                          help="the GPU's memory to check each stage against (default %(default)s)")
    plan_cmd.add_argument("--cpu", action="store_true",
                          help="plan for a CPU run (device memory is host memory)")
    plan_cmd.add_argument("--processes", type=int, default=1, metavar="N",
                          help="torchrun processes (GPUs) fine-tuning splits batches over and, "
                               "with finetune.sharding: fsdp, shards over (default %(default)s)")
    plan_cmd.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan_cmd.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    for command in (plan_cmd,):
        command.add_argument("--set", dest="overrides", action="append", default=[],
                             metavar="KEY=VALUE", help="override a params.yaml key (repeatable)")
        command.add_argument("--preset", help="a YAML file of dotted overrides (presets/*.yaml)")
    table = sub.add_parser("table", help="print the models' comparison in under 120 columns")
    table.add_argument("--reports", default="reports", help="the stages' records (default: "
                       "%(default)s)")
    export = sub.add_parser("export", help="write the final model as a Hugging Face folder, a "
                            "sparse file and a GGUF file")
    export.add_argument("--out", default="exports", help="folder (default: %(default)s)")
    export.add_argument("--gguf-dtype", default="f16", choices=["f16", "f32"],
                        help="GGUF tensor type of the 2-D weights (default: %(default)s)")
    export.add_argument("--repo", default=".", help="repository root (default: current folder)")
    args = parser.parse_args(argv)

    if args.command == "check":
        problems = preflight(Path(args.repo), args.stages or None)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if problems:
            sys.exit(2)
        print("gradprune check: params.yaml and every artifact the stages read are usable")
        return
    if args.command == "track":
        from gradprune.config import load_params
        from tasks.tracking import UNTRACKED, track_untracked

        root = Path(args.repo)
        try:
            logged = track_untracked(load_params(root / "params.yaml"), root)
        except (ValueError, FileNotFoundError) as err:
            fail(str(err))
        print(f"logged {len(logged)} stage(s) from {UNTRACKED}: {', '.join(logged)}" if logged
              else f"nothing to log: no {UNTRACKED}")
        return
    try:
        if args.command == "plan":
            sys.exit(print_plan(args))
        if args.command == "table":
            from flows.table import render_table

            print(render_table(Path(args.reports)))
            return
        if args.command == "export":
            from flows.export import export_final

            written = export_final(Path(args.repo), Path(args.out), args.gguf_dtype)
            for name, size in written.items():
                print(f"{Path(args.out) / name}  {size / 1e6:.1f} MB")
            return
        if args.command == "sweep":
            from flows.sweep import check_points, grid_points
            from flows.sweep import sweep as run_sweep

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
            cmd = [sys.executable, "-m", "dvc", "exp", "run", *args.targets,
                   *dvc_set_arguments(overrides)]
            print(" ".join(cmd[1:]), flush=True)
            sys.exit(subprocess.run(cmd + (["--name", args.name] if args.name else [])).returncode)
        prefect_defaults()
        parameters = flow_parameters(args, overrides)
        if args.command != "run" and args.cron is not None:
            check_cron(args.cron)
    except (ValueError, FileNotFoundError) as err:  # ParamError is a ValueError
        fail(str(err))
    if args.command == "run":
        from flows.pipeline import pipeline

        print(json.dumps(pipeline(**parameters), indent=2))
    elif args.command == "serve":
        require_server()
        serve(args.name, args.cron, parameters)
    else:
        require_server()
        deploy(args.name, args.cron, parameters, args.pool)


if __name__ == "__main__":
    main()
