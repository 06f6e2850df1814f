"""The stage graph, read from dvc.yaml: the one and only description of the DAG."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import yaml


def _paths(entries) -> list[str]:
    """Paths of a dvc.yaml deps/outs/metrics/plots list (entries are str or {path: opts})."""
    paths = []
    for entry in entries or []:
        paths.extend(entry if isinstance(entry, dict) else [entry])
    return [str(PurePosixPath(p)) for p in paths]


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def stage_graph(dvc_file: str | Path = "dvc.yaml") -> dict[str, list[str]]:
    """{stage: [stages it depends on]}: B depends on A when a dep of B is, or lies inside,
    an output of A (outs, metrics and plots all count)."""
    dvc_file = Path(dvc_file)
    if not dvc_file.is_file():
        raise FileNotFoundError(f"{dvc_file}: no dvc.yaml here; run from the repository root")
    stages = yaml.safe_load(dvc_file.read_text()).get("stages") or {}
    produced = {name: _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots"))
                for name, s in stages.items()}
    graph = {}
    for name, stage in stages.items():
        deps = _paths(stage.get("deps"))
        graph[name] = sorted(other for other, outs in produced.items() if other != name and any(
            _within(dep, out) or _within(out, dep) for dep in deps for out in outs))
    return graph


def topological_order(graph: dict[str, list[str]], targets: list[str] | None = None) -> list[str]:
    """Stages so that each comes after everything it depends on (dvc.yaml order among equals):
    every stage, or only `targets` and what they depend on, as `dvc repro <target>` runs."""
    unknown = [t for t in targets or [] if t not in graph]
    if unknown:
        raise ValueError(f"unknown stage {', '.join(map(repr, unknown))}: dvc.yaml has "
                         f"{', '.join(graph)}")
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"dvc.yaml: stage {name!r} is part of a dependency cycle")
        visiting.add(name)
        for upstream in graph[name]:
            visit(upstream)
        visiting.discard(name)
        order.append(name)

    for name in graph:
        visit(name)
    if not targets:
        return order
    needed: set[str] = set()
    pending = list(targets)
    while pending:
        name = pending.pop()
        if name not in needed:
            needed.add(name)
            pending.extend(graph[name])
    return [name for name in order if name in needed]
