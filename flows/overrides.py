"""Overrides as the command line takes them: presets (files of dotted keys), `--grid` values,
and their rendering as `dvc exp run -S` arguments (Hydra's override grammar)."""

from __future__ import annotations

import json
import re

from gradprune.config import (
    ParamError,
    apply_overrides,
    parse_value,
    read_params_file,
    split_override,
)


def preset_overrides(path: str) -> dict:
    """A preset: a YAML file of dotted params keys (as `--set` and `dvc exp run -S` take)."""
    overrides = read_params_file(path)
    flat = [key for key in overrides if "." not in key and key != "seed"]
    if flat:
        raise ParamError(f"{path}: {flat[0]}", "a preset sets dotted keys, e.g. masks.sparsity: 0.7")
    return overrides


def dvc_set_arguments(overrides: dict, params_file: str = "params.yaml") -> list[str]:
    """`-S key=value` arguments for `dvc exp run`, checked against params_file first."""
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
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra(v) for v in value) + "]"
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z_][\w./-]*", value) and parse_value(value) == value
        return value if plain else "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return json.dumps(value)  # numbers, true/false, null


def split_values(text: str) -> list[str]:
    """"a,b,[1, 2]" -> ["a", "b", "[1, 2]"]: commas inside brackets, braces or quotes stay."""
    parts, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    return parts + [current]


def parse_grid(items: list[str]) -> dict[str, list]:
    """`--grid key=v1,v2` arguments -> {key: [v1, v2]}, each value parsed as params.yaml would."""
    grid: dict[str, list] = {}
    for item in items:
        key, text = split_override(item)
        if key in grid:
            raise ParamError(key, f"--grid gives it twice; list all its values in one "
                             f"--grid {key}=value1,value2")
        grid[key] = [parse_value(v.strip()) for v in split_values(text)]
    return grid
