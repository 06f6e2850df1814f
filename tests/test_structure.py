"""The shape of the code: stage deps that cannot go stale, imports that point down the layers
and never go round in a cycle, one home per concern."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import stage_deps  # noqa: E402

ORCHESTRATION = {"prefect", "mlflow", "dvc"}


def top_level_imports(path: Path) -> set[str]:
    """Every module name `path` imports, at any depth of the file (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def leaf_edges() -> dict[str, set[str]]:
    """module file -> the files of the modules it names (not the packages on the way), so a
    package __init__ that re-exports its modules is no cycle."""
    graph = {}
    for pkg in stage_deps.PACKAGES:
        for file in (ROOT / pkg).rglob("*.py"):
            targets = set()
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                for name in names:
                    found = stage_deps.module_file(name)
                    if found is not None and found != file:
                        targets.add(found.relative_to(ROOT).as_posix())
                        break
            graph[file.relative_to(ROOT).as_posix()] = targets
    return graph


def test_every_stage_lists_exactly_the_code_it_imports():
    assert stage_deps.differences() == []


def test_a_missing_dep_is_named_with_its_stage(tmp_path):
    for pkg in ("gradprune", "tasks", "flows"):
        subprocess.run(["cp", "-r", str(ROOT / pkg), str(tmp_path / pkg)], check=True)
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    spec["stages"]["finetune"]["deps"].remove("gradprune/pruning/masks.py")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec))
    problems = stage_deps.differences(tmp_path)
    assert "stage finetune imports gradprune/pruning/masks.py but dvc.yaml does not list it " \
           "as a dep" in problems


def test_no_import_cycles():
    graph = leaf_edges()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_layers_point_down():
    """gradprune never imports tasks, flows or an orchestration package; tasks never import
    flows; flows take only tracking and artifacts (gradprune check) from tasks; no stage
    imports another stage."""
    stages = {f"tasks.{s}" for s in ("prepare", "train", "gradients", "masks", "compare",
                                     "finetune", "average", "evaluate")}
    for file in (ROOT / "gradprune").rglob("*.py"):
        bad = {n for n in top_level_imports(file)
               if n.split(".")[0] in ORCHESTRATION | {"tasks", "flows"}}
        assert not bad, f"{file.relative_to(ROOT)} imports {bad}"
    for file in (ROOT / "tasks").rglob("*.py"):
        names = top_level_imports(file)
        assert not {n for n in names if n.split(".")[0] == "flows"}, file
        assert not (names & stages), f"{file.relative_to(ROOT)} imports a stage: {names & stages}"
    for file in (ROOT / "flows").rglob("*.py"):
        from_tasks = {n for n in top_level_imports(file) if n.split(".")[0] == "tasks"}
        assert from_tasks <= {"tasks.tracking", "tasks.artifacts"}, \
            f"{file.relative_to(ROOT)} imports {from_tasks}"


def test_reading_params_imports_no_torch():
    code = ("import sys, gradprune.config as c; c.load_params('params.yaml'); "
            "print(sorted(m for m in ('torch', 'transformers', 'mlflow', 'prefect') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_one_home_for_each_list_of_allowed_values():
    from gradprune.config import choices
    from gradprune.config.schema import MaskParams
    from gradprune.evaluation import zeroshot
    from gradprune.pruning import criteria, masks

    assert criteria.CRITERIA is choices.CRITERIA
    assert masks.SCOPES is choices.SCOPES
    assert zeroshot.TASKS is choices.ZEROSHOT_TASKS
    import typing
    assert typing.get_args(typing.get_type_hints(MaskParams)["criterion"]) == choices.CRITERIA


def test_one_atomic_writer():
    """Only gradprune.io renames temporaries into place (its leftover cleaner knows their
    names); everything else writes through it."""
    offenders = []
    for pkg in stage_deps.PACKAGES:
        for file in (ROOT / pkg).rglob("*.py"):
            if file.relative_to(ROOT).as_posix() == "gradprune/io.py":
                continue
            if "os.replace(" in file.read_text() or ".tmp\"" in file.read_text():
                offenders.append(file.relative_to(ROOT).as_posix())
    assert offenders == []
