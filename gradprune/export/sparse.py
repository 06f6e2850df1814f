"""Sparse checkpoints: a pruned state dict as bitmask plus non-zero values, in one safetensors file.

"Pruned" means value == 0, read off the tensor itself, not off any mask: the bitmask marks the
non-zero entries (NaN included) and only their values are stored. Zeros come in two bit
patterns, and masking leaves -0.0 at every pruned negative weight (w * 0), so the sign of each
zero is stored too, compressed. `load_sparse` therefore gives back every tensor bit for bit,
with its dtype, whatever the masks said.

Values are split into byte planes. The most significant byte of a float holds its sign and
(most of) its exponent; trained weights span few exponents, so that plane is compressed with
zlib. The other planes hold mantissa bits, close to uniform noise, and are stored raw. At 50%
sparsity this brings bf16 under 0.55x its dense bytes, where raw values plus the bitmask
(1/16 of bf16's dense bytes) would already cost 0.5625x.

File layout: a dense tensor is stored under its own name; a sparse one as `<name>::mask`
(bit-packed non-zero entries, `gradprune.pruning.masks.pack_mask` order), `<name>::high` (zlib stream
of the values' top byte plane), `<name>::low` (their remaining byte planes, value-major) and
`<name>::zero_signs` (zlib stream of the packed sign bits of the zeros). One metadata key,
`gradprune.sparse`, holds the dtype and shape of every sparse tensor as sorted JSON: safetensors
writes several metadata keys in a random order, which would break bit-identical files.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch

from gradprune.io import atomic_file
from gradprune.pruning.masks import pack_mask, unpack_mask

METADATA_KEY = "gradprune.sparse"
# A tensor at least this fraction zeros is stored sparse. The bitmask costs 1/8 byte per entry
# and the compressed top byte saves more than that, so at 10% zeros sparse is already smaller.
MIN_ZERO_FRACTION = 0.1
# Level 9 compresses weights no better than 6 (measured on a trained model) and is slower.
ZLIB_LEVEL = 6


def _as_bytes(values: torch.Tensor) -> torch.Tensor:
    """[n, itemsize] uint8. The last column is the top byte on little-endian hosts, the only
    byte order safetensors writes."""
    return values.contiguous().view(torch.uint8).reshape(values.numel(), values.element_size())


def _uint8(data: bytes) -> torch.Tensor:
    # torch.frombuffer refuses an empty buffer.
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _deflate(data: torch.Tensor) -> torch.Tensor:
    return _uint8(zlib.compress(data.numpy().tobytes(), ZLIB_LEVEL))


def _inflate(stored: torch.Tensor) -> torch.Tensor:
    return _uint8(zlib.decompress(stored.numpy().tobytes()))


def encode_sparse(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    flat = tensor.reshape(-1)
    kept = flat != 0
    planes = _as_bytes(flat[kept])
    # The sign of each zero, so -0.0 comes back as -0.0 (multiplying by a mask leaves one at
    # every pruned negative weight); a run of +0.0 signs compresses to almost nothing.
    zero_signs = _as_bytes(flat[~kept])[:, -1] >= 0x80
    return {f"{name}::mask": pack_mask(kept),
            f"{name}::high": _deflate(planes[:, -1]),
            f"{name}::low": planes[:, :-1].contiguous().reshape(-1),
            f"{name}::zero_signs": _deflate(pack_mask(zero_signs))}


def decode_sparse(name: str, stored: dict[str, torch.Tensor], dtype: torch.dtype,
                  shape: tuple[int, ...]) -> torch.Tensor:
    kept = unpack_mask(stored[f"{name}::mask"], shape).reshape(-1)
    count = int(kept.sum())
    values = torch.empty(count, dtype.itemsize, dtype=torch.uint8)
    values[:, -1] = _inflate(stored[f"{name}::high"])
    values[:, :-1] = stored[f"{name}::low"].reshape(count, dtype.itemsize - 1)
    planes = torch.zeros(kept.numel(), dtype.itemsize, dtype=torch.uint8)
    planes[kept] = values
    zero_signs = unpack_mask(_inflate(stored[f"{name}::zero_signs"]), (kept.numel() - count,))
    planes[~kept, -1] = zero_signs.to(torch.uint8) << 7
    return planes.view(dtype).reshape(shape)


def _check_masked(name: str, tensor: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.shape != tensor.shape:
        raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, the tensor has "
                         f"{tuple(tensor.shape)}; the masks belong to another model")
    if (tensor[~mask] != 0).any():
        raise ValueError(f"{name} holds non-zero values where its mask prunes; apply the masks "
                         "before exporting")


def save_sparse(state_dict: dict[str, torch.Tensor], path: str | Path,
                masks: dict[str, torch.Tensor] | None = None,
                min_zero_fraction: float = MIN_ZERO_FRACTION) -> None:
    """Write `state_dict` with each tensor sparse or dense; atomically (temp file, rename).

    `masks` (Linear module name -> bool mask, as `gradprune.pruning.masks` makes them) are checked, not
    stored: a masked weight must be zero wherever its mask prunes, and is always stored sparse.
    Other tensors go sparse when at least `min_zero_fraction` of their entries are zero.
    """
    from safetensors.torch import save_file

    masks = masks or {}
    unknown = sorted(set(masks) - {n.removesuffix(".weight") for n in state_dict})
    if unknown:
        raise ValueError(f"masks for modules not in the state dict: {unknown[:5]}")
    stored, meta = {}, {}
    for name, tensor in sorted(state_dict.items()):
        tensor = tensor.detach().cpu()
        module = name.removesuffix(".weight")
        if module in masks:
            _check_masked(name, tensor, masks[module])
        zero_fraction = int((tensor == 0).sum()) / max(tensor.numel(), 1)
        if module in masks or (tensor.numel() > 0 and zero_fraction >= min_zero_fraction):
            stored.update(encode_sparse(name, tensor))
            meta[name] = {"dtype": str(tensor.dtype).removeprefix("torch."),
                          "shape": list(tensor.shape)}
        else:
            # A fresh contiguous copy: safetensors refuses tensors that share memory, as tied
            # embeddings do in a state dict.
            stored[name] = tensor.clone(memory_format=torch.contiguous_format)
    with atomic_file(path) as tmp:
        save_file(stored, str(tmp), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def load_sparse(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: sparse checkpoint missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            # A safetensors file saved without metadata gives None here, not {}.
            meta = json.loads((f.metadata() or {})[METADATA_KEY])
            stored = {key: f.get_tensor(key) for key in f.keys()}
        dense = {key: t for key, t in stored.items() if "::" not in key}
        sparse = {name: decode_sparse(name, stored, getattr(torch, info["dtype"]),
                                      tuple(info["shape"]))
                  for name, info in meta.items()}
    # RuntimeError: planes or mask too short for the recorded shape; zlib.error: bad stream;
    # AttributeError: an unknown dtype name.
    except (SafetensorError, KeyError, ValueError, OSError, RuntimeError, zlib.error,
            AttributeError) as err:
        raise ValueError(f"{path}: corrupt sparse checkpoint ({err!r})") from None
    return dict(sorted({**dense, **sparse}.items()))


def _stored_bytes(path: Path) -> dict[str, int]:
    """Bytes each tensor occupies in a safetensors file, read from its header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {key: info["data_offsets"][1] - info["data_offsets"][0]
            for key, info in header.items() if key != "__metadata__"}


def _dense_bytes(info: dict) -> int:
    return math.prod(info["shape"]) * getattr(torch, info["dtype"]).itemsize


def sparse_size_report(path: str | Path) -> dict:
    """Bytes of a sparse checkpoint against the dense tensor bytes it stands for: for the whole
    checkpoint (file size, header included) and for the tensors stored sparse alone."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})[METADATA_KEY])
    stored = _stored_bytes(path)
    sparse_dense = sum(_dense_bytes(info) for info in meta.values())
    sparse_stored = sum(n for key, n in stored.items() if "::" in key)
    dense = sparse_dense + sum(n for key, n in stored.items() if "::" not in key)
    file_bytes = path.stat().st_size
    return {"dense_bytes": dense, "file_bytes": file_bytes, "ratio": file_bytes / dense,
            "sparse_tensors": {"count": len(meta), "dense_bytes": sparse_dense,
                               "stored_bytes": sparse_stored,
                               "ratio": sparse_stored / sparse_dense if meta else None}}
