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
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from gradprune.config import ParamError, Params, load_params
from gradprune.data import CorpusError
from gradprune.device import device_name, peak_memory_bytes, reset_peak_memory, resolve_device
from gradprune.io import ArtifactError, remove_stale_temporaries, write_json
from gradprune.progress import elapsed, progress_interval
from gradprune.training.parallel import (
    init_process_group_from_env,
    is_main_process,
    rank_and_size,
    shutdown_process_group,
)
from tasks.artifacts import artifact_remedy, recovery_note

DATA = Path("data")
METRICS = Path("metrics")
# A stage's whole record (its metrics beside the settings and names that explain them); the
# metrics file holds only its numbers, so that `dvc metrics show` and `dvc exp show` stay
# readable.
REPORTS = Path("reports")
PLOTS = Path("plots")
# Beside every metrics file: what produced its numbers (library versions, threads), which
# `dvc metrics show` and the numbers-only metrics files leave out.
ENVIRONMENT = REPORTS / "environment"
# The libraries whose versions can move a stage's numbers.
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "pyarrow", "numpy")
EXPECTED_ERRORS = (ParamError, CorpusError, FileNotFoundError, ValueError, FloatingPointError)


class Stage:
    """A running stage's name, params and command-line arguments, and its handle on tracking
    (plots, artifacts, models); the handle is None in a data-parallel helper process."""

    def __init__(self, name: str, params: Params, device=None):
        self.name = name
        self.params = params
        # Where the stage computes: the `device` param, resolved (and checked) at the start.
        self.device = resolve_device(params.device) if device is None else device
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

    def register_model(self, folder: Path, artifact_path: str = "model", **metadata) -> int:
        """Log and register an HF folder as an MLflow model (tasks.tracking.StageRun's
        register_model: description, tags, alias)."""
        return self.tracked.register_model(folder, artifact_path, **metadata)

    def log_curve(self, rows: list[dict], prefix: str = "", series: str | None = None) -> None:
        """Per-step metrics, so MLflow draws the curve."""
        self.tracked.log_curve(rows, prefix, series)

    def log_parent_metrics(self, metrics: dict) -> None:
        """Headline numbers on the execution's parent run (the runs table's row)."""
        self.tracked.log_parent_metrics(metrics)

    def tag_final_model(self, tags: dict, description: str | None = None) -> None:
        """Measurements of the registered final model (its `champion` version)."""
        from tasks.tracking import tag_champion

        tag_champion(self.params, tags, description)

    def source_tags(self) -> dict[str, str]:
        from tasks.tracking import source_tags

        return source_tags()


def quiet_progress_bars() -> None:
    """Progress bars only on a terminal: logs of dvc repro and CI stay readable."""
    if not sys.stderr.isatty():
        import transformers

        transformers.utils.logging.disable_progress_bar()
        # Bars that libraries draw with tqdm directly (GGUF conversion) read this variable.
        os.environ.setdefault("TQDM_DISABLE", "1")


class Heartbeat(logging.Handler):
    """No silent stage: when stderr is not a terminal (dvc repro's log, a Prefect task), a
    line every progress interval in which the stage printed nothing else, naming the elapsed
    time and the stage's last message (what it is doing and how far)."""

    def __init__(self):
        super().__init__()
        self.started = self.last = time.monotonic()
        self.latest = "started"
        self._stop = threading.Event()
        self._log = logging.getLogger("gradprune.heartbeat")

    def emit(self, record: logging.LogRecord) -> None:
        self.last = time.monotonic()
        if record.name != self._log.name:
            self.latest = record.getMessage()

    def _beat(self, interval: float) -> None:
        interval = max(interval, 1.0)  # at most a line a second, whatever the setting
        while not self._stop.wait(interval / 4):
            if time.monotonic() - self.last >= interval:
                self._log.info("working, %s in; last: %s",
                               elapsed(time.monotonic() - self.started), self.latest)

    def start(self, interval: float) -> None:
        logging.getLogger("gradprune").addHandler(self)
        threading.Thread(target=self._beat, args=(interval,), daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        logging.getLogger("gradprune").removeHandler(self)


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
        device = resolve_device(params.device)
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
        stage = Stage(name, params, device)
        stage.args = args
        heartbeat = Heartbeat()
        if main and not sys.stderr.isatty():
            heartbeat.start(progress_interval())
        try:
            if main:
                _run_tracked(stage, run, processes if data_parallel else None)
            else:
                _run_untracked(stage, run)
        finally:
            heartbeat.stop()
    finally:
        shutdown_process_group()


def numbers_only(record: dict) -> dict:
    """The numbers of a stage's record, nesting kept: what DVC shows as metrics. Settings
    (names, flags, lists, and any "settings" entry, such as speed's prompt length) stay in the
    record (reports/<stage>.json)."""
    kept = {}
    for key, value in record.items():
        if key == "settings":
            continue
        if isinstance(value, dict):
            value = numbers_only(value)
            if value:
                kept[key] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            kept[key] = value
    return kept


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
    for folder in (DATA, METRICS, METRICS / name.split("@")[0], REPORTS,
                   REPORTS / name.split("@")[0], PLOTS, ENVIRONMENT,
                   ENVIRONMENT / name.split("@")[0]):
        remove_stale_temporaries(folder)
    started = time.perf_counter()
    reset_peak_memory(stage.device)
    try:
        with stage_run(name, params) as tracked:
            stage.tracked = tracked
            tracked.log_params({"device_name": device_name(stage.device)})
            metrics = run(params, stage)
            if processes is not None:
                metrics["processes"] = processes
            metrics["seconds"] = round(time.perf_counter() - started, 2)
            metrics["peak_rss_mb"] = round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            metrics["cuda"] = int(stage.device.type == "cuda")
            if (peak := peak_memory_bytes(stage.device)) is not None:
                metrics["peak_device_mb"] = round(peak / 2**20, 1)
            produced_by = environment()
            metrics["threads"] = produced_by["threads"]
            relative = f"{name.replace('@', '/')}.json"
            write_json(ENVIRONMENT / relative, produced_by)
            write_json(REPORTS / relative, metrics)
            path = METRICS / relative
            write_json(path, numbers_only(metrics))
            tracked.log_metrics(metrics, path)
            tracked.log_artifact(REPORTS / relative, "reports")
    except EXPECTED_ERRORS as err:
        _report_expected_error(err, stage)
        sys.exit(1)
