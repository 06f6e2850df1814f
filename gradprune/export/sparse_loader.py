"""Read a gradprune sparse checkpoint (`*.sparse.safetensors`) with torch and safetensors only.

This file is self-contained on purpose: `gradprune export` copies it beside the sparse file, so
a user without gradprune can load the weights. The format is described in docs/EXPORTS.md;
gradprune.export.sparse writes it and its tests check this loader gives every tensor back bit
for bit.

    python sparse_loader.py model.sparse.safetensors hf_folder   # write a dense HF folder's weights
    from sparse_loader import load_sparse; state = load_sparse("model.sparse.safetensors")
"""

from __future__ import annotations

import json
import sys
import zlib

import torch
from safetensors import safe_open

METADATA_KEY = "gradprune.sparse"


def _bytes_tensor(data: bytes) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _inflate(stored: torch.Tensor) -> torch.Tensor:
    return _bytes_tensor(zlib.decompress(stored.numpy().tobytes()))


def _unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Bits, most significant first in each byte (numpy.packbits order), as bools."""
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
    return ((packed.view(-1, 1) >> shifts) & 1).reshape(-1)[:count].bool()


def _decode(name: str, stored: dict, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    numel = 1
    for d in shape:
        numel *= d
    kept = _unpack_bits(stored[f"{name}::mask"], numel)
    count = int(kept.sum())
    size = dtype.itemsize
    values = torch.empty(count, size, dtype=torch.uint8)
    values[:, -1] = _inflate(stored[f"{name}::high"])  # top byte: sign and exponent
    values[:, :-1] = stored[f"{name}::low"].reshape(count, size - 1)
    planes = torch.zeros(numel, size, dtype=torch.uint8)
    planes[kept] = values
    signs = _unpack_bits(_inflate(stored[f"{name}::zero_signs"]), numel - count)
    planes[~kept, -1] = signs.to(torch.uint8) << 7  # -0.0 where a pruned weight was negative
    return planes.view(dtype).reshape(shape)


def load_sparse(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, dense, with its stored dtype and shape."""
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {})[METADATA_KEY])
        stored = {key: f.get_tensor(key) for key in f.keys()}
    state = {key: t for key, t in stored.items() if "::" not in key}
    for name, info in meta.items():
        state[name] = _decode(name, stored, getattr(torch, info["dtype"]), info["shape"])
    return dict(sorted(state.items()))


if __name__ == "__main__":
    from safetensors.torch import save_file

    source, target = sys.argv[1], sys.argv[2]
    weights = load_sparse(source)
    save_file(weights, f"{target}/model.safetensors", metadata={"format": "pt"})
    print(f"{len(weights)} tensors -> {target}/model.safetensors")
