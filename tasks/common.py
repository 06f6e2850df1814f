"""What every stage shares: params, paths, the stage entry point, and MLflow tracking.

A stage module defines `run(params, stage) -> metrics` and ends with
`stage_main("<name>", run)`. stage_main validates params.yaml before any compute, opens a nested
MLflow run under the pipeline execution's parent run, and writes the stage's metrics file
(metrics/<name>.json, a DVC metric) atomically once the stage's outputs are in place.

One pipeline execution = one MLflow parent run. The flow passes its parent run id in
GRADPRUNE_PARENT_RUN_ID; under a plain `dvc repro` the stages find the parent run by a tag
holding the identity of the `dvc` process that launched them, so every stage of one
`dvc repro` lands under one parent.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import yaml

from gradprune.config import ParamError, Params, load_params, section_dict
from gradprune.data import CorpusError
from gradprune.io import remove_stale_temporaries, write_json

DATA = Path("data")
METRICS = Path("metrics")
PLOTS = Path("plots")
PARENT_ENV = "GRADPRUNE_PARENT_RUN_ID"
# Set by DVC for the stages it runs: the repository root, and the experiment's name under
# `dvc exp run`.
DVC_ROOT_ENV = "DVC_ROOT"
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"
EXPECTED_ERRORS = (ParamError, CorpusError, FileNotFoundError, ValueError, FloatingPointError)


def stage_params_keys(stage: str, dvc_file: Path = Path("dvc.yaml")) -> list[str]:
    """The params keys dvc.yaml declares for `stage` (`group@item` reads `group`): what this
    stage's nested run records."""
    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    return [k for entry in stages[stage.split("@")[0]].get("params", []) for k in
            (entry if isinstance(entry, dict) else [entry])]


def params_value(params: Params, dotted: str):
    value = params
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _dvc_ancestor() -> str | None:
    """'pid-starttime' of the nearest `dvc` process above this one, if any (Linux /proc)."""
    pid = os.getppid()
    while pid > 1:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2:].split()
        if any(Path(a.decode(errors="replace")).name == "dvc" for a in argv[:3]):  # dvc, or python -m dvc
            return f"dvc-{pid}-{fields[19]}"
        pid = int(fields[1])
    return None


class Stage:
    """A running stage's handle on tracking: metrics, artifacts, plots, models."""

    def __init__(self, name: str, params: Params):
        self.name = name
        self.params = params
        self.run_id: str | None = None
        self.args: argparse.Namespace | None = None
        self._mlflow = None

    def write_plot(self, name: str, rows: list[dict]) -> Path:
        path = PLOTS / f"{name}.json"
        write_json(path, rows)
        self.log_artifact(path, "plots")
        return path

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        self._mlflow.log_artifacts(str(folder), artifact_path)

    def register_model(self, folder: Path, artifact_path: str = "model") -> int:
        """Log a Hugging Face model folder and register it as a new version of the
        configured registered model; returns the version number."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.log_artifacts(folder, artifact_path)
        client = MlflowClient()
        name = self.params.mlflow.registered_model
        try:
            client.create_registered_model(name, description=(
                "Pruned, fine-tuned and averaged model from the gradprune pipeline "
                "(Hugging Face format: load with AutoModelForCausalLM.from_pretrained)."))
        except MlflowException as err:
            if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
                raise
        run = client.get_run(self.run_id)
        version = client.create_model_version(
            name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=self.run_id)
        return int(version.version)


def test_tokens(params: Params):
    """The test split as one token stream, cut to evaluate.max_tokens."""
    from gradprune.data import read_blocks

    tokens = read_blocks(DATA / "prepare" / "test.parquet").reshape(-1)
    return tokens if params.evaluate.max_tokens is None else tokens[: params.evaluate.max_tokens]


def test_examples(params: Params, target_length: int, limit: int | None = None):
    """The first seq2seq test examples (packed rows): at most `limit`, and no more than hold
    evaluate.max_tokens target tokens."""
    import math

    from gradprune.data import read_blocks

    rows = read_blocks(DATA / "prepare" / "test.parquet")
    if params.evaluate.max_tokens is not None:
        rows = rows[: math.ceil(params.evaluate.max_tokens / target_length)]
    return rows if limit is None else rows[:limit]


def test_perplexity(model, params: Params) -> dict:
    """Test perplexity as compare and evaluate report it: sliding windows over the test token
    stream for a decoder LM; for the seq2seq model, target-token perplexity of the test
    examples (teacher forcing, pad tokens not scored)."""
    import math

    from gradprune.evaluation import sliding_window_perplexity
    from gradprune.model import bf16_enabled
    from gradprune.seq2seq import Seq2SeqTransformer
    from gradprune.training import mean_loss

    cfg = params.evaluate
    bf16 = bf16_enabled(cfg.bf16)
    if isinstance(model, Seq2SeqTransformer):
        rows = test_examples(params, model.config.target_length)
        loss = mean_loss(model, rows, cfg.batch_size, bf16)
        targets = model.split(rows)[1]
        return {"perplexity": math.exp(loss), "loss": loss, "examples": len(rows),
                "tokens_scored": int((targets != model.config.pad_token_id).sum())}
    context, stride = perplexity_window(params)
    return sliding_window_perplexity(model, test_tokens(params), context, stride,
                                     cfg.batch_size, bf16)


def perplexity_window(params: Params) -> tuple[int, int]:
    """(context, stride) of sliding-window perplexity: the evaluate params or their defaults."""
    context = params.evaluate.context or params.data.block_size
    return context, params.evaluate.stride or max(1, context // 2)


def zero_shot(model, tokenizer, params: Params) -> dict:
    """Every evaluate.tasks benchmark on `model` ({} with no tasks), and the averages."""
    import statistics

    from gradprune.model import bf16_enabled
    from gradprune.zeroshot import evaluate_task

    cfg = params.evaluate
    tasks = {task: evaluate_task(model, tokenizer, task, cfg.task_limits.get(task, cfg.limit),
                                 cfg.batch_size, bf16_enabled(cfg.bf16)) for task in cfg.tasks}
    if not tasks:
        return {"tasks": {}}
    return {"tasks": tasks,
            "average_acc": statistics.mean(t["acc"] for t in tasks.values()),
            "average_acc_norm": statistics.mean(t["acc_norm"] for t in tasks.values())}


def _tracking_uri(params: Params, root: Path) -> str:
    # A DVC experiment runs in a temporary copy of the repository (dvc exp run --queue/--temp)
    # and names the repository itself in DVC_ROOT: its runs belong in that repository's store.
    root = Path(os.environ.get(DVC_ROOT_ENV) or root)
    return (params.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{root.resolve() / 'mlflow.db'}")


def configure_tracking(params: Params, root: Path = Path(".")) -> str:
    """Point MLflow at the configured store; returns the experiment id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    mlflow.set_tracking_uri(_tracking_uri(params, root))
    return mlflow.set_experiment(params.mlflow.experiment).experiment_id


def create_parent_run(params: Params, launcher: str, root: Path = Path("."),
                      overrides: dict | None = None, execution_key: str | None = None,
                      title: str | None = None) -> str:
    """A new parent run for one pipeline execution, holding every param and the overrides."""
    from mlflow.tracking import MlflowClient

    experiment_id = configure_tracking(params, root)
    client = MlflowClient()
    tags = {"gradprune.launcher": launcher,
            "gradprune.execution": execution_key or f"{launcher}-{os.getpid()}-{time.time_ns()}"}
    if os.environ.get(DVC_EXP_NAME_ENV):
        tags["gradprune.experiment"] = os.environ[DVC_EXP_NAME_ENV]
    if overrides:
        tags["gradprune.overrides"] = ", ".join(f"{k}={v}" for k, v in overrides.items())
    if title is None:
        title = (f"experiment {tags['gradprune.experiment']}" if "gradprune.experiment" in tags
                 else f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}")
    parent = client.create_run(experiment_id, tags=tags, run_name=title)
    flat = {k: v for section in (f.name for f in dataclasses.fields(params) if f.name != "mlflow")
            for k, v in section_dict(params, section).items()}
    flat.update({f"override.{k}": v for k, v in (overrides or {}).items()})
    for k, v in flat.items():
        client.log_param(parent.info.run_id, k, v)
    return parent.info.run_id


def finish_parent_run(run_id: str, params: Params, root: Path, status: str) -> None:
    from mlflow.tracking import MlflowClient

    configure_tracking(params, root)
    MlflowClient().set_terminated(run_id, status)


def _parent_run_for_stage(params: Params, experiment_id: str) -> str:
    """The flow's parent run, else the one of the `dvc` process above us, else a new one."""
    from mlflow.tracking import MlflowClient

    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    key = _dvc_ancestor()
    if key:
        found = MlflowClient().search_runs(
            [experiment_id], filter_string=f"tags.`gradprune.execution` = '{key}'", max_results=1)
        if found:
            return found[0].info.run_id
    return create_parent_run(params, "dvc" if key else "standalone", execution_key=key)


def quiet_progress_bars() -> None:
    """Progress bars only on a terminal: logs of dvc repro and CI stay readable."""
    if not sys.stderr.isatty():
        import transformers

        transformers.utils.logging.disable_progress_bar()
        # Bars that libraries draw with tqdm directly (GGUF conversion) read this variable.
        os.environ.setdefault("TQDM_DISABLE", "1")


def start_data_parallel(name: str, supported: bool) -> int:
    """Join the process group that `torchrun` describes in the environment (WORLD_SIZE, RANK,
    MASTER_ADDR...); returns the number of processes, 1 when not under torchrun. CPU tensors
    travel over gloo, CUDA tensors over NCCL."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes == 1:
        return 1
    if not supported:
        print(f"error: stage {name} does not run data-parallel (gradients and finetune do); "
              f"run it as `python -m tasks.{name.split('@')[0]}`, not under torchrun",
              file=sys.stderr)
        sys.exit(2)
    import torch
    import torch.distributed as dist

    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return processes


def stop_data_parallel() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def stage_main(name: str, run: Callable[[Params, Stage], dict],
               arguments: dict[str, dict] | None = None, data_parallel: bool = False) -> None:
    """Run a stage. `arguments` adds command-line options ({"--criterion": {...}}); a stage
    with arguments is a matrix item named `name@<values joined by ->` (compare@gradient-2:4).

    A `data_parallel` stage may run under `torchrun --nproc_per_node=N -m tasks.<name>`: every
    process runs `run`, which splits the work (gradprune.parallel); only the main process
    (rank 0) writes outputs, metrics and MLflow runs, so its `run` returns early elsewhere."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    for flag, options in (arguments or {}).items():
        parser.add_argument(flag, **options)
    args = parser.parse_args()
    if arguments:
        name = f"{name}@" + "-".join(str(getattr(args, f.lstrip("-").replace("-", "_")))
                                      for f in arguments)
    try:
        params = load_params(args.params)
    except (ParamError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

    processes = start_data_parallel(name, data_parallel)
    try:
        from gradprune.parallel import is_main_process, rank_and_size

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
        stop_data_parallel()


def _report_expected_error(err: BaseException) -> None:
    if os.environ.get("GRADPRUNE_TRACEBACK"):
        traceback.print_exc()
    print(f"error: {err}", file=sys.stderr)


def _run_untracked(stage: Stage, run: Callable[[Params, Stage], dict]) -> None:
    """A data-parallel stage's helper process: its share of the work, nothing written."""
    try:
        run(stage.params, stage)
    except EXPECTED_ERRORS as err:
        _report_expected_error(err)
        sys.exit(1)


def _run_tracked(stage: Stage, run: Callable[[Params, Stage], dict],
                 processes: int | None) -> None:
    """Run the stage inside its nested MLflow run and write its metrics file."""
    name, params = stage.name, stage.params
    for folder in (DATA, METRICS, METRICS / name.split("@")[0], PLOTS):
        remove_stale_temporaries(folder)
    experiment_id = configure_tracking(params)
    import mlflow
    from mlflow.tracking import MlflowClient

    parent_id = _parent_run_for_stage(params, experiment_id)
    stage._mlflow = mlflow
    started = time.perf_counter()
    with mlflow.start_run(run_name=name, parent_run_id=parent_id,
                          experiment_id=experiment_id,
                          tags={"gradprune.stage": name}) as active:
        stage.run_id = active.info.run_id
        flat = {}
        for key in stage_params_keys(name):
            if "." in key:
                flat[key] = params_value(params, key)
            else:
                flat.update(section_dict(params, key))
        mlflow.log_params(flat)
        try:
            metrics = run(params, stage)
        except EXPECTED_ERRORS as err:
            MlflowClient().set_terminated(parent_id, "FAILED")
            mlflow.end_run("FAILED")
            _report_expected_error(err)
            sys.exit(1)
        except BaseException:
            MlflowClient().set_terminated(parent_id, "FAILED")
            raise
        if processes is not None:
            metrics["processes"] = processes
        metrics["seconds"] = round(time.perf_counter() - started, 2)
        metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        path = METRICS / f"{name.replace('@', '/')}.json"
        write_json(path, metrics)
        mlflow.log_metrics({k: float(v) for k, v in _flatten(metrics).items()})
        mlflow.log_artifact(str(path), "metrics")
    MlflowClient().set_terminated(parent_id, "FINISHED")


def _flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            out[key] = v
    return out
