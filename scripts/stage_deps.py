"""The code each dvc.yaml stage runs: the closure of project modules its command imports.

    python scripts/stage_deps.py           # list what dvc.yaml is missing or lists in excess
    python scripts/stage_deps.py --write   # set every stage's code deps to its closure

Every import counts, also one inside a function, and every package __init__ on the way: an edit
to any module a stage imports must make `dvc status` name that stage. tasks/tracking.py alone is
left out: it logs to MLflow and changes no output, so editing it must not rerun the pipeline.
tests/test_structure.py fails when dvc.yaml and this closure disagree.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gradprune", "tasks", "flows")
NOT_DEPS = ("tasks/tracking.py",)


def module_file(module: str, root: Path = ROOT) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(path: Path, root: Path = ROOT) -> set[Path]:
    """The project files `path` imports, with the __init__ of each package on the way."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] not in PACKAGES:
                continue
            for i in range(1, len(parts) + 1):
                file = module_file(".".join(parts[:i]), root)
                if file is not None and file != path:
                    found.add(file)
    return found


def import_graph(root: Path = ROOT) -> dict[Path, set[Path]]:
    return {f: imported_files(f, root) for pkg in PACKAGES for f in sorted((root / pkg).rglob("*.py"))}


def closure(start: Path, root: Path = ROOT) -> list[str]:
    """Repository-relative paths of `start` and everything it imports, tracking excluded."""
    seen, todo = set(), [start]
    while todo:
        file = todo.pop()
        rel = file.relative_to(root).as_posix()
        if file in seen or rel in NOT_DEPS:
            continue
        seen.add(file)
        todo.extend(imported_files(file, root))
    return sorted(f.relative_to(root).as_posix() for f in seen)


def stage_module(cmd: str) -> str:
    """`python -m tasks.compare --criterion ...` -> tasks.compare."""
    words = cmd.split()
    return words[words.index("-m") + 1]


def is_code(dep: str) -> bool:
    return dep.endswith(".py") and dep.split("/")[0] in PACKAGES


def expected_code_deps(spec: dict, root: Path = ROOT) -> dict[str, list[str]]:
    return {name: closure(module_file(stage_module(stage["cmd"]), root), root)
            for name, stage in spec["stages"].items()}


def differences(root: Path = ROOT) -> list[str]:
    import yaml

    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    problems = []
    for name, wanted in expected_code_deps(spec, root).items():
        listed = [d for d in spec["stages"][name].get("deps", []) if is_code(d)]
        problems += [f"stage {name} imports {f} but dvc.yaml does not list it as a dep"
                     for f in wanted if f not in listed]
        problems += [f"stage {name} lists {f} as a dep but does not import it"
                     for f in listed if f not in wanted]
    return problems


def write(root: Path = ROOT) -> None:
    """Rewrite each stage's code deps in place (data deps and every comment kept)."""
    import yaml

    path = root / "dvc.yaml"
    wanted = expected_code_deps(yaml.safe_load(path.read_text()), root)
    out, stage, in_deps = [], None, False
    for line in path.read_text().splitlines():
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage = line.strip()[:-1]
        if line == "    deps:" and stage in wanted:
            out.append(line)
            out += [f"      - {f}" for f in wanted[stage]]
            in_deps = True
            continue
        if in_deps and line.startswith("      - "):
            if is_code(line.split("- ", 1)[1].strip()):
                continue
        else:
            in_deps = False
        out.append(line)
    path.write_text("\n".join(out) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps")
    args = parser.parse_args()
    if args.write:
        write()
    problems = differences()
    print("\n".join(problems) or "dvc.yaml lists exactly the code every stage imports")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
