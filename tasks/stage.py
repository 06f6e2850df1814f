"""The stage runner: what every stage module shares.

A stage module defines `run(params, stage) -> metrics` and ends with
`stage_main("<name>", run)`. stage_main validates params.yaml before any compute, runs the stage
inside its tracked MLflow run (tasks.tracking), and writes the stage's metrics file
(metrics/<name>.json, a DVC metric) atomically once the stage's outputs are in place.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from gradprune.config import ParamError, Params, load_params
from gradprune.data import CorpusError
from gradprune.io import ArtifactError, remove_stale_temporaries, write_json
from gradprune.training.parallel import (
    init_process_group_from_env,
    is_main_process,
    rank_and_size,
    shutdown_process_group,
)
from tasks.artifacts import artifact_remedy, recovery_note

DATA = Path("data")
METRICS = Path("metrics")
PLOTS = Path("plots")
# Beside every metrics file: what produced its numbers (library versions, threads), which
# `dvc metrics show` and the numbers-only metrics files leave out.
ENVIRONMENT = METRICS / "environment"
# The libraries whose versions can move a stage's numbers.
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "pyarrow", "numpy")
EXPECTED_ERRORS = (ParamError, CorpusError, FileNotFoundError, ValueError, FloatingPointError)


class Stage:
    """A running stage's name, params and command-line arguments, and its handle on tracking
    (plots, artifacts, models); the handle is None in a data-parallel helper process."""

    def __init__(self, name: str, params: Params):
        self.name = name
        self.params = params
        self.args: argparse.Namespace | None = None
        self.tracked = None  # tasks.tracking.StageRun

    def write_plot(self, name: str, rows: list[dict]) -> Path:
        path = PLOTS / f"{name}.json"
        write_json(path, rows)
        self.log_artifact(path, "plots")
        return path

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.tracked.log_artifact(path, artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        self.tracked.log_artifacts(folder, artifact_path)

    def register_model(self, folder: Path, artifact_path: str = "model") -> int:
        return self.tracked.register_model(folder, artifact_path)


def quiet_progress_bars() -> None:
    """Progress bars only on a terminal: logs of dvc repro and CI stay readable."""
    if not sys.stderr.isatty():
        import transformers

        transformers.utils.logging.disable_progress_bar()
        # Bars that libraries draw with tqdm directly (GGUF conversion) read this variable.
        os.environ.setdefault("TQDM_DISABLE", "1")


def join_data_parallel(name: str, supported: bool) -> int:
    """Join the process group `torchrun` describes; returns the number of processes, 1 when
    not under torchrun. A stage that cannot split its work refuses to run under torchrun."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1 and not supported:
        print(f"error: stage {name} does not run data-parallel (gradients and finetune do); "
              f"run it as `python -m tasks.{name.split('@')[0]}`, not under torchrun",
              file=sys.stderr)
        sys.exit(2)
    if processes > 1:
        init_process_group_from_env()
    return processes


def matrix_key(name: str, args: argparse.Namespace, arguments: dict[str, dict]) -> str:
    """The matrix item a stage runs: its command-line values joined by `-`, or, when none are
    given, the item DVC names in DVC_STAGE (`compare@gradient-2:4`).

    dvc.yaml's matrix commands carry no values: DVC substitutes `${item.*}` into a shell
    command before any check runs, so a params value such as `x; touch owned` would run as
    shell code. The stage learns its item from DVC_STAGE instead and checks it against the
    validated params (the stage's `run`)."""
    values = [getattr(args, flag.lstrip("-").replace("-", "_")) for flag in arguments]
    if all(v is not None for v in values):
        return "-".join(map(str, values))
    group, _, key = os.environ.get("DVC_STAGE", "").partition("@")
    if any(v is not None for v in values) or group != name or not key:
        flags = " and ".join(arguments)
        print(f"error: stage {name} is a matrix: give {flags}, or run it through DVC "
              f"(`dvc repro {name}`), which names the item in DVC_STAGE", file=sys.stderr)
        sys.exit(2)
    return key


def stage_main(name: str, run: Callable[[Params, Stage], dict],
               arguments: dict[str, dict] | None = None, data_parallel: bool = False) -> None:
    """Run a stage. `arguments` adds command-line options ({"--criterion": {...}}); a stage
    with arguments is a matrix item named `name@<values joined by ->` (compare@gradient-2:4).

    A `data_parallel` stage may run under `torchrun --nproc_per_node=N -m tasks.<name>`: every
    process runs `run`, which splits the work (gradprune.training.parallel); only the main
    process (rank 0) writes outputs, metrics and MLflow runs, so its `run` returns early
    elsewhere."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    for flag, options in (arguments or {}).items():
        parser.add_argument(flag, **options)
    args = parser.parse_args()
    if arguments:
        name = f"{name}@{matrix_key(name, args, arguments)}"
    try:
        params = load_params(args.params)
    except (ParamError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        print(recovery_note(name), file=sys.stderr)
        sys.exit(2)

    processes = join_data_parallel(name, data_parallel)
    try:
        quiet_progress_bars()
        main = is_main_process()
        handler = logging.StreamHandler(sys.stderr)
        prefix = name if processes == 1 else f"{name} rank {rank_and_size()[0]}"
        handler.setFormatter(logging.Formatter(f"[{prefix}] %(message)s"))
        logging.getLogger("gradprune").addHandler(handler)
        # The other ranks' progress repeats the main one's.
        logging.getLogger("gradprune").setLevel(logging.INFO if main else logging.WARNING)
        stage = Stage(name, params)
        stage.args = args
        if main:
            _run_tracked(stage, run, processes if data_parallel else None)
        else:
            _run_untracked(stage, run)
    finally:
        shutdown_process_group()


def _report_expected_error(err: BaseException, stage: Stage | None = None) -> None:
    if os.environ.get("GRADPRUNE_TRACEBACK"):
        traceback.print_exc()
    message = f"error: {err}"
    if isinstance(err, ArtifactError):
        message += f"; {artifact_remedy(err.path, stage.params if stage else None)}"
    print(message, file=sys.stderr)
    if stage is not None:
        print(recovery_note(stage.name), file=sys.stderr)


def environment() -> dict:
    """Library versions and thread counts of this process: what, besides code, data and
    params, can move a stage's numbers."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "versions": versions}


def _run_untracked(stage: Stage, run: Callable[[Params, Stage], dict]) -> None:
    """A data-parallel stage's helper process: its share of the work, nothing written."""
    try:
        run(stage.params, stage)
    except EXPECTED_ERRORS as err:
        _report_expected_error(err, stage)
        sys.exit(1)


def _run_tracked(stage: Stage, run: Callable[[Params, Stage], dict],
                 processes: int | None) -> None:
    """Run the stage inside its nested MLflow run and write its metrics file."""
    from tasks.tracking import stage_run

    name, params = stage.name, stage.params
    for folder in (DATA, METRICS, METRICS / name.split("@")[0], PLOTS, ENVIRONMENT,
                   ENVIRONMENT / name.split("@")[0]):
        remove_stale_temporaries(folder)
    started = time.perf_counter()
    try:
        with stage_run(name, params) as tracked:
            stage.tracked = tracked
            metrics = run(params, stage)
            if processes is not None:
                metrics["processes"] = processes
            metrics["seconds"] = round(time.perf_counter() - started, 2)
            metrics["peak_rss_mb"] = round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            produced_by = environment()
            metrics["threads"] = produced_by["threads"]
            path = METRICS / f"{name.replace('@', '/')}.json"
            write_json(ENVIRONMENT / f"{name.replace('@', '/')}.json", produced_by)
            write_json(path, metrics)
            tracked.log_metrics(metrics, path)
    except EXPECTED_ERRORS as err:
        _report_expected_error(err, stage)
        sys.exit(1)
