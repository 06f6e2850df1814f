"""params.yaml read into the schema: YAML 1.2 parsing (as DVC reads it), type coercion into the
schema's dataclasses, and dotted-key overrides (`masks.sparsity=0.7`), the one parser and setter
that `--set`, presets and the flows use."""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

from gradprune.config.schema import ParamError, Params


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ParamError(key, f"got {value!r}; allowed: {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ParamError(key, "must not be null")
        (inner,) = [o for o in options if o is not type(None)]
        return _convert(value, inner, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamError(key, f"must be a mapping, got {value!r}")
        (key_type, inner) = typing.get_args(hint)
        return {_convert(k, key_type, f"{key}"): _convert(v, inner, f"{key}.{k}")
                for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ParamError(key, f"must be a list, got {value!r}")
        (inner, _) = typing.get_args(hint)
        return tuple(_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamError(key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(key, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no decimal point) as a string; accept what float() accepts.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(key, f"must be a number, got {value!r}")
        # .inf and .nan are YAML floats; no knob means them, and they fail only mid-compute.
        if not math.isfinite(value):
            raise ParamError(key, f"must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamError(key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported params type {hint!r} for {key}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamError(prefix or "<top>", f"must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ParamError(where, f"unknown key; allowed keys here: {', '.join(names)}")
    kwargs = {name: _convert(raw[name], hints[name], f"{prefix}.{name}" if prefix else name)
              for name in names if name in raw}
    return cls(**kwargs)


def _require_sections(raw: dict) -> None:
    """Every section of params.yaml must be there: a stage started directly on a file that
    lacks one would otherwise run on built-in defaults that no file records."""
    if not isinstance(raw, dict):
        return  # _build names the problem
    names = [f.name for f in dataclasses.fields(Params)]
    missing = [name for name in names if raw.get(name) is None]
    if missing:
        raise ParamError(missing[0], f"missing section{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)}; every section is required ({', '.join(names)}): "
                         "copy it from the repository's params.yaml")


def params_from_dict(raw: dict, *, complete: bool = False) -> Params:
    """Validated params from a raw mapping. `complete`: the mapping is a params file, so every
    section must be in it; otherwise (a notebook, a test) missing sections take the defaults."""
    if complete:
        _require_sections(raw)
    params = _build(Params, raw, "")
    params.check()
    return params


def _yaml12(text: str):
    """YAML 1.2, as DVC reads params.yaml: `2:4` is a string there (YAML 1.1 makes it the
    base-60 integer 124) and `1e-3` a float (a string in 1.1)."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def parse_value(text: str):
    """An override's value, parsed as params.yaml would parse it."""
    return _yaml12(text)


def read_params_file(path: str | Path) -> dict:
    from ruamel.yaml import YAMLError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: params file not found (run from the repository root, "
                                "or pass --params PATH)")
    try:
        raw = _yaml12(path.read_text())
    except YAMLError as err:
        raise ParamError(str(path), f"not valid YAML: {err}") from None
    if not raw:
        raise ParamError(str(path), "is empty; every section (seed, data, model, ...) is "
                         "required: copy the repository's params.yaml")
    return raw


def load_params(path: str | Path = "params.yaml") -> Params:
    return params_from_dict(read_params_file(path), complete=True)


def split_override(item: str) -> tuple[str, str]:
    """`key.path=text` -> (key.path, text), the text not yet parsed."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip() or not text.strip():
        raise ParamError(item, "an override is written key.path=value, e.g. masks.sparsity=0.7")
    return key.strip(), text


def parse_override(item: str) -> tuple[str, Any]:
    """`key.path=value` -> (key.path, value parsed as params.yaml would parse it)."""
    key, text = split_override(item)
    return key, parse_value(text)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    return dict(parse_override(item) for item in items)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested mapping, making the sections on the way."""
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamError(dotted, f"{part} is not a section")
    node[leaf] = value


def apply_overrides(raw: dict, overrides: dict[str, Any] | list[str]) -> dict:
    """Set dotted keys ("masks.sparsity=0.7" or {"masks.sparsity": 0.7}) in a raw params dict.

    String values are parsed as YAML, as `dvc exp run -S` does, so "0.7" becomes a float.
    The result is validated so an override naming an unknown key fails like a bad file.
    """
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    result = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        set_dotted(result, dotted, value)
    params_from_dict(result, complete=True)
    return result
