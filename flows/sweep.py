"""A parameter sweep as a Prefect flow: every point of a grid one DVC experiment.

    gradprune sweep --grid masks.criterion=gradient,magnitude --grid masks.sparsity=0.5,0.7 --jobs 2

1. Every point is validated against params.yaml before anything runs; a bad key or value stops
   the sweep naming it.
2. The stages no grid key reaches (for a masks.* grid: prepare, train, gradients) run once, here
   in the workspace through `dvc repro --single-item`, so DVC's cache and run-cache hold them.
3. The points are queued (`dvc exp run --queue -S ... --name <sweep>-<i>`, one at a time: queueing
   stashes the workspace) and run by `dvc queue start --jobs N`, at most N at once, each in its
   own temporary copy of the repository. There DVC restores the shared stages from its
   run-cache ("Stage 'gradients' is cached - skipping run") and runs only what the point changes.
   A point whose queue worker died (killed, out of memory) stays "Running" in `dvc queue status`
   forever in DVC 3.67; the sweep sees that its experiment process is gone or orphaned, kills
   what is left of it, requeues the point under its name and restarts the queue (`reruns` in
   the table, `rerun_points` in the result).
4. The points' metrics, read with `dvc exp show --json`, make one table (Parquet, CSV, Markdown)
   and one plot in sweeps/<sweep>/; `dvc exp show` lists the points.

MLflow: the sweep is a parent run; the shared stages are nested under it, and each point's own
parent run (one per DVC experiment, tagged gradprune.experiment) is nested under it once the
point has finished.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.dag import stage_graph, topological_order
from flows.overrides import dvc_set_arguments
from flows.pipeline import run_stage, stage_environment
from gradprune.config import ParamError, apply_overrides, load_params, read_params_file
from gradprune.io import atomic_dir, write_json
from tasks.tracking import PARENT_ENV, create_parent_run, finish_parent_run, stage_params_keys

SWEEPS = Path("sweeps")
# Shown in the table and the plot: (column, metrics file, dotted path in it).
RESULT_COLUMNS = [
    ("sparsity", "metrics/evaluate.json", "models.averaged.sparsity"),
    ("ppl_dense", "metrics/evaluate.json", "models.dense.perplexity_test"),
    ("ppl_pruned", "metrics/evaluate.json", "models.pruned.perplexity_test"),
    ("ppl_finetuned", "metrics/evaluate.json", "models.finetuned_last.perplexity_test"),
    ("ppl_averaged", "metrics/evaluate.json", "models.averaged.perplexity_test"),
    ("acc_averaged", "metrics/evaluate.json", "models.averaged.average_acc"),
    ("finetune_best_val_loss", "metrics/finetune.json", "best_val_loss"),
]
PLOTTED = "ppl_averaged"
POLL_SECONDS = 5
# A DVC experiment name is a git ref component.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the last key varying fastest."""
    if not grid:
        raise ParamError("grid", "is empty; give at least one key=value1,value2")
    for key, values in grid.items():
        if not values:
            raise ParamError(key, "has no values in the grid")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ParamError(key, f"repeats a value in the grid: {values}")
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def check_points(params_file: Path, points: list[dict[str, Any]]) -> None:
    """Every point must make a valid params.yaml; ParamError names the key otherwise."""
    raw = read_params_file(params_file)
    for point in points:
        apply_overrides(raw, point)


def _touches(declared: str, key: str) -> bool:
    """Whether a dvc.yaml params entry (a section or dotted key) covers a grid key."""
    return declared == key or key.startswith(declared + ".") or declared.startswith(key + ".")


def shared_stages(dvc_file: Path, keys: list[str]) -> list[str]:
    """Stages, in order, that no grid key reaches, neither through their own params nor through
    a stage upstream: they are the same at every point."""
    graph = stage_graph(dvc_file)
    varied: set[str] = set()
    for stage in topological_order(graph):
        if any(_touches(declared, key) for declared in stage_params_keys(stage, dvc_file)
               for key in keys) or varied.intersection(graph[stage]):
            varied.add(stage)
    return [s for s in topological_order(graph) if s not in varied]


def _dvc(args: list[str], root: Path, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise RuntimeError(f"dvc {' '.join(args)} failed (exit {done.returncode}):\n"
                           f"{output[-4000:]}")
    return done.stdout


def _queue_status(root: Path) -> list[dict]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.experiments.celery_queue.status()


def _queue_point(point: dict[str, Any], name: str, root: Path, env: dict[str, str]) -> None:
    sets = dvc_set_arguments(point, str(root / "params.yaml"))
    _dvc(["exp", "run", "--queue", "--name", name, *sets], root, env)


@task(name="queue points")
def queue_points(points: list[dict[str, Any]], names: list[str], root: str,
                 env: dict[str, str]) -> None:
    busy = [e["name"] or e["rev"][:7] for e in _queue_status(Path(root))
            if e["status"] in ("Queued", "Running")]
    if busy:
        raise RuntimeError(f"the DVC experiment queue already holds {', '.join(busy)}; let them "
                           "finish or remove them (`dvc queue status`, `dvc queue remove "
                           "--queued`) before sweeping")
    for point, name in zip(points, names):
        _queue_point(point, name, Path(root), env)


# A point must look lost on this many polls in a row: a worker records its experiment
# process's exit a moment after the process ends.
LOST_POLLS = 2
MAX_RERUNS = 2


def _running(pid: int | None):
    """The psutil.Process of a living (not zombie) pid, else None."""
    import psutil

    if pid is None:
        return None
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process
    except psutil.NoSuchProcess:
        return None


def _is_queue_worker(process) -> bool:
    import psutil

    try:
        return process is not None and "queue-worker" in process.cmdline()
    except psutil.Error:
        return False


def _queue_snapshot(root: Path) -> tuple[list[dict], dict[str, int | None], bool]:
    """`dvc queue status` as a list, the experiment process (`dvc exp exec-run`) pid of every
    Running point whose queue worker is gone ({name: pid or None}), and whether any queue
    worker of this repository lives.

    DVC 3.67 marks a point Running from the moment a worker takes it until that worker
    records the result; a worker killed in between leaves it Running for ever, with its
    experiment process orphaned (still running, results never collected) or dead. A worker
    runs each experiment process as its own child, so an experiment process whose parent is
    no queue worker, or that died without a recorded exit, has lost its worker."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        queue = repo.experiments.celery_queue
        status = queue.status()
        workers = [_running(int(pidfile.read_text() or 0))
                   for pidfile in Path(queue.wdir).glob("dvc-exp-worker-*.pid")]
        any_worker = any(_is_queue_worker(w) for w in workers)
        lost: dict[str, int | None] = {}
        for entry in status:
            if entry["status"] != "Running":
                continue
            try:
                info = queue.proc[entry["rev"]]
            except KeyError:  # the worker is still setting the experiment up
                if not any_worker:
                    lost[entry["name"]] = None
                continue
            if info.returncode is not None:  # ended and recorded: the worker collects it
                continue
            process = _running(info.pid)
            if process is None or not _is_queue_worker(_running(process.ppid())):
                lost[entry["name"]] = info.pid if process is not None else None
    return status, lost, any_worker


def _remove_lost_point(name: str, orphan_pid: int | None, root: Path,
                       env: dict[str, str]) -> bool:
    """Kill what the dead worker left running of the point, mark it failed, remove it from
    the queue and delete its temporary copy of the repository; False if the point has ended
    meanwhile (then its status is final and it stays)."""
    import psutil

    orphan = _running(orphan_pid)
    if orphan is not None:
        tree = [orphan, *orphan.children(recursive=True)]
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(tree, timeout=30)
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        queue = repo.experiments.celery_queue
        infofile = next((Path(queue.get_infofile_path(e.stash_rev))
                         for e in queue.iter_active() if e.name == name), None)
    if infofile is None:
        return False
    # The experiment process is gone: `dvc queue kill` marks the task failed.
    _dvc(["queue", "kill", name], root, env)
    _dvc(["queue", "remove", name], root, env)
    if infofile.exists():
        copy = Path(json.loads(infofile.read_text())["root_dir"])
        if copy.parent == root / ".dvc" / "tmp" / "exps":
            shutil.rmtree(copy, ignore_errors=True)
    return True


@task(name="run points")
def run_points(points: list[dict[str, Any]], names: list[str], jobs: int, root: str,
               env: dict[str, str]) -> dict[str, dict]:
    """Start the queue with `jobs` workers and wait for every point, rerunning (at most
    MAX_RERUNS times each) those whose worker died; returns per point its status, how often
    it was rerun, the stages that ran in it and those DVC restored from its cache (from its
    log)."""
    logger = get_run_logger()
    base = Path(root)
    _dvc(["queue", "start", "--jobs", str(jobs)], base, env)
    pending = set(names)
    status: dict[str, str] = {}
    reruns = dict.fromkeys(names, 0)
    suspect: dict[str, int] = {}  # polls in a row a point (or the queue: "") has looked lost
    while pending:
        time.sleep(POLL_SECONDS)
        entries, lost, any_worker = _queue_snapshot(base)
        for entry in entries:
            # Anything but Queued and Running is final: Success or Failed.
            if entry["name"] in pending and entry["status"] not in ("Queued", "Running"):
                pending.discard(entry["name"])
                status[entry["name"]] = entry["status"]
                logger.info("point %s: %s (%d left)", entry["name"], entry["status"],
                            len(pending))
        lost = {n: pid for n, pid in lost.items() if n in pending}
        # Points queued while no worker lives (every worker died) also need the queue started.
        queued = any(e["name"] in pending and e["status"] == "Queued" for e in entries)
        suspect = {n: suspect.get(n, 0) + 1 for n in [*lost, *([""] if queued and not
                                                                 any_worker else [])]}
        confirmed = [n for n in lost if suspect[n] >= LOST_POLLS]
        for name in confirmed:
            suspect.pop(name)
            if not _remove_lost_point(name, lost[name], base, env):
                continue
            if reruns[name] >= MAX_RERUNS:
                pending.discard(name)
                status[name] = "Lost"
                logger.error("point %s: its queue worker died again; given up after %d "
                             "reruns", name, reruns[name])
                continue
            reruns[name] += 1
            _queue_point(points[names.index(name)], name, base, env)
            logger.warning("point %s: its queue worker died while it ran; requeued it (rerun "
                           "%d of at most %d)", name, reruns[name], MAX_RERUNS)
        if confirmed or suspect.get("", 0) >= LOST_POLLS:
            suspect.pop("", None)
            logger.warning("restarting the DVC queue (`dvc queue start --jobs %d`)", jobs)
            _dvc(["queue", "start", "--jobs", str(jobs)], base, env)
    # Workers idle on after the queue empties; stop them so nothing outlives the sweep.
    _dvc(["queue", "stop"], base, env)
    outcome = {}
    for name in names:
        log = "" if status[name] == "Lost" else _dvc(["queue", "logs", name], base, env)
        outcome[name] = {"status": status[name], "reruns": reruns[name],
                         "ran": re.findall(r"^Running stage '([^']+)'", log, re.M),
                         "restored": re.findall(r"^Stage '([^']+)' is cached", log, re.M),
                         "log_tail": log[-3000:] if status[name] == "Failed" else ""}
    return outcome


def _dotted(tree: dict, path: str):
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def experiment_results(root: Path, env: dict[str, str]) -> dict[str, dict]:
    """{experiment name: {"params": params.yaml, "metrics": {file: metrics}}} from
    `dvc exp show --json`."""
    shown = json.loads(_dvc(["exp", "show", "--json"], root, env))
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                data = rev.get("data") or {}
                if rev.get("name"):
                    found[rev["name"]] = {
                        "params": (data.get("params") or {}).get("params.yaml", {}).get("data", {}),
                        "metrics": {f: (m or {}).get("data", {})
                                    for f, m in (data.get("metrics") or {}).items()}}
    return found


def result_rows(points: list[dict[str, Any]], names: list[str], outcome: dict[str, dict],
                results: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for point, name in zip(points, names):
        metrics = results.get(name, {}).get("metrics", {})
        row = {"experiment": name, **point, "status": outcome[name]["status"],
               "reruns": outcome[name]["reruns"]}
        for column, file, path in RESULT_COLUMNS:
            row[column] = _dotted(metrics.get(file, {}), path)
        row["stages_ran"] = ", ".join(outcome[name]["ran"])
        row["stages_restored"] = ", ".join(outcome[name]["restored"])
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])

    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_results(rows: list[dict[str, Any]], keys: list[str], path: Path) -> None:
    """PLOTTED against the first grid key with numeric values (else the first key), one line
    per combination of the other keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def numeric(key):
        return all(isinstance(r[key], (int, float)) and not isinstance(r[key], bool)
                   for r in rows)

    x_key = next((k for k in keys if numeric(k)), keys[0])
    series_keys = [k for k in keys if k != x_key]
    fig, ax = plt.subplots(figsize=(6, 4))
    for combo in dict.fromkeys(tuple(r[k] for k in series_keys) for r in rows):
        line = [r for r in rows if tuple(r[k] for k in series_keys) == combo
                and r[PLOTTED] is not None]
        label = ", ".join(f"{k}={v}" for k, v in zip(series_keys, combo)) or PLOTTED
        xs = [r[x_key] if numeric(x_key) else str(r[x_key]) for r in line]
        ax.plot(xs, [r[PLOTTED] for r in line], marker="o", label=label)
    ax.set_xlabel(x_key)
    ax.set_ylabel("test perplexity (averaged model)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@task(name="collect results")
def collect_results(sweep_name: str, grid: dict[str, list], points: list[dict[str, Any]],
                    names: list[str], outcome: dict[str, dict], root: str,
                    env: dict[str, str]) -> Path:
    """sweeps/<name>/: results.parquet, results.csv, results.md, perplexity.png, sweep.json."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = result_rows(points, names, outcome, experiment_results(Path(root), env))
    with atomic_dir(Path(root) / SWEEPS / sweep_name) as out:
        # Grid values may mix types across points (e.g. 0.5 and null): Parquet gets them as text.
        table = {c: [r[c] for r in rows] for c in rows[0]}
        for key in grid:
            if len({type(v) for v in table[key]}) > 1:
                table[key] = [json.dumps(v) for v in table[key]]
        pq.write_table(pa.table(table), out / "results.parquet")
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (out / "results.md").write_text(markdown_table(rows))
        plot_results(rows, list(grid), out / "perplexity.png")
        write_json(out / "sweep.json", {"name": sweep_name, "grid": grid, "points": rows})
    return Path(root) / SWEEPS / sweep_name


def link_point_runs(sweep_run_id: str, sweep_name: str, names: list[str]) -> int:
    """Nest each point's MLflow parent run (tagged with its experiment name) under the sweep's
    run; returns how many were found."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment_id = client.get_run(sweep_run_id).info.experiment_id
    linked = 0
    for name in names:
        for run in client.search_runs([experiment_id],
                                      filter_string=f"tags.`gradprune.experiment` = '{name}'"):
            if run.info.run_id != sweep_run_id and "gradprune.stage" not in run.data.tags:
                client.set_tag(run.info.run_id, "mlflow.parentRunId", sweep_run_id)
                client.set_tag(run.info.run_id, "gradprune.sweep", sweep_name)
                linked += 1
    return linked


@flow(name="gradprune-sweep", log_prints=True)
def sweep(grid: dict[str, list], jobs: int = 2, name: str | None = None,
          repo: str = ".") -> dict[str, Any]:
    """Run every point of `grid` ({"masks.sparsity": [0.5, 0.7], ...}) as a DVC experiment, at
    most `jobs` at once; returns the results folder, the shared stages ({stage: "ran" |
    "skipped"}) and the table's rows."""
    root = Path(repo).resolve()
    points = grid_points(grid)
    check_points(root / "params.yaml", points)
    if jobs < 1:
        raise ParamError("jobs", f"must be at least 1, got {jobs}")
    sweep_name = name or time.strftime("sweep-%Y%m%d-%H%M%S")
    if not NAME.fullmatch(sweep_name):
        raise ParamError("name", f"{sweep_name!r} is no valid experiment name; use letters, "
                         "digits, '-', '_' and '.'")
    names = [f"{sweep_name}-{i}" for i in range(len(points))]
    shared = shared_stages(root / "dvc.yaml", list(grid))
    params = load_params(root / "params.yaml")
    sweep_run = create_parent_run(params, launcher="prefect-sweep", root=root,
                                  overrides={f"grid.{k}": v for k, v in grid.items()},
                                  title=f"sweep {sweep_name}")
    env = stage_environment(sweep_run)
    # The points find their own parent runs; only the shared stages belong to the sweep's.
    point_env = {k: v for k, v in env.items() if k != PARENT_ENV}
    try:
        shared_outcome = {stage: run_stage(stage, sweep_run, str(root)) for stage in shared}
        queue_points(points, names, str(root), point_env)
        outcome = run_points(points, names, jobs, str(root), point_env)
        folder = collect_results(sweep_name, grid, points, names, outcome, str(root), point_env)
        link_point_runs(sweep_run, sweep_name, names)
        failed = [n for n in names if outcome[n]["status"] != "Success"]
        if failed:
            raise RuntimeError(f"sweep {sweep_name}: points {', '.join(failed)} failed; their "
                               f"logs: `dvc queue logs NAME`. Last lines of {failed[0]}:\n"
                               f"{outcome[failed[0]]['log_tail']}")
    except BaseException:
        finish_parent_run(sweep_run, params, root, "FAILED")
        raise
    from mlflow.tracking import MlflowClient

    MlflowClient().log_artifacts(sweep_run, str(folder), "sweep")
    finish_parent_run(sweep_run, params, root, "FINISHED")
    rows = json.loads((folder / "sweep.json").read_text())["points"]
    return {"name": sweep_name, "results": str(folder), "shared_stages": shared_outcome,
            "rerun_points": [n for n in names if outcome[n]["reruns"]], "points": rows}
