"""Inference speed and memory of the dense and pruned models, and what sparse kernels give.

Unstructured masks leave every weight matrix dense in storage: a dense matmul does the same
work whether an entry is zero or not, so pruned models run exactly as fast as the dense one.
`measure_speed` shows that end to end; `sparse_kernel_speed` measures what torch's CSR kernels
make of one masked weight.

Memory: on CUDA, the peak bytes allocated by torch during a run above those allocated before
it. On CPU torch keeps no such count, so freed heap memory is first handed back to the system
(glibc's malloc_trim, where available), then a background thread samples the process's
resident set size (/proc/self/statm) every millisecond, and the peak is reported as the growth
over the RSS just before the run. Either way it is the run's working memory (activations, KV
cache, temporaries), not the weights, which are reported apart as weight_bytes. A sampled peak
can miss a spike shorter than the interval, and memory the allocator keeps cached from an
earlier run does not show as growth, so on CPU read it as a lower bound.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
import warnings
from typing import Callable

import torch
from torch import nn

from gradprune.progress import progress_bar

ModelOrFactory = nn.Module | Callable[[], nn.Module]


def _release_free_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


class PeakMemory:
    """Peak memory growth during a `with` block (see the module docstring for how)."""

    def __init__(self, device: torch.device, interval_s: float = 0.001):
        self.device, self.interval_s = device, interval_s
        self.peak_bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return self
        gc.collect()
        _release_free_heap()
        self._before = _resident_bytes()
        self._highest = self._before
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        if self._before is not None:
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._highest = max(self._highest, _resident_bytes() or 0)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._before
            return
        if self._before is None:
            return
        self._stop.set()
        self._sampler.join()
        self._highest = max(self._highest, _resident_bytes() or 0)
        self.peak_bytes = self._highest - self._before


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_generation(model: nn.Module, prompt: torch.Tensor, new_tokens: int,
                    bf16: bool) -> dict[str, float]:
    """Seconds for the prefill of `prompt` (batch, length) and for `new_tokens` greedy decode
    steps with the KV cache, and the run's peak memory growth in bytes."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    with PeakMemory(device) as memory, \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        _sync(device)
        started = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        prefilled = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, cache=out.cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        decoded = time.perf_counter()
    return {"prefill_s": prefilled - started, "decode_s": decoded - prefilled,
            "peak_bytes": memory.peak_bytes}


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's unique parameters and buffers."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure_speed(models: dict[str, ModelOrFactory], vocab_size: int, prompt_len: int,
                  new_tokens: int, batch_sizes: tuple[int, ...] = (1, 8), repeats: int = 3,
                  bf16: bool = False, seed: int = 0) -> dict[str, dict]:
    """Prefill and decode tokens/s and peak memory per model and batch size, in this process.

    Factories are called once, up front. Every (model, batch size) gets one untimed warm-up
    run; then `repeats` rounds each run every model in turn, so drift in machine load falls on
    all models alike. Prompts are the same seeded random tokens for every model. Reports the
    median over rounds: {model: {"weight_bytes", "batch_<b>": {"prefill_tokens_per_s",
    "decode_tokens_per_s", "peak_bytes", ...}}}.
    """
    built = {name: m if isinstance(m, nn.Module) else m() for name, m in models.items()}
    for model in built.values():
        model.eval()
    g = torch.Generator().manual_seed(seed)
    prompts = {b: torch.randint(vocab_size, (b, prompt_len), generator=g) for b in batch_sizes}
    runs = {(name, b): [] for name in built for b in batch_sizes}
    for name, model in built.items():
        for b in batch_sizes:
            time_generation(model, prompts[b], min(new_tokens, 2), bf16)
    rounds = [(r, name, b) for r in range(repeats) for name in built for b in batch_sizes]
    for _, name, b in progress_bar(rounds, desc="speed"):
        runs[name, b].append(time_generation(built[name], prompts[b], new_tokens, bf16))
    report = {}
    for name, model in built.items():
        report[name] = {"weight_bytes": weight_bytes(model)}
        for b in batch_sizes:
            prefill = statistics.median(r["prefill_s"] for r in runs[name, b])
            decode = statistics.median(r["decode_s"] for r in runs[name, b])
            peaks = [r["peak_bytes"] for r in runs[name, b] if r["peak_bytes"] is not None]
            report[name][f"batch_{b}"] = {
                "prefill_tokens_per_s": b * prompt_len / prefill,
                "decode_tokens_per_s": b * new_tokens / decode,
                "prefill_s": prefill, "decode_s": decode,
                "peak_bytes": max(peaks) if peaks else None}
    report["settings"] = {"prompt_len": prompt_len, "new_tokens": new_tokens,
                          "batch_sizes": list(batch_sizes), "repeats": repeats, "bf16": bf16,
                          "torch_threads": torch.get_num_threads()}
    return report


def _median_seconds(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.no_grad()
def sparse_kernel_speed(weight: torch.Tensor, tokens: int, repeats: int = 5,
                        seed: int = 0) -> dict[str, float]:
    """Median seconds of y = x @ weight.T for `tokens` rows of x, on CPU in float32:
    with the weight as stored (zeros and all, dense kernel), with a fully non-zero weight of
    the same shape (dense kernel), and with the weight in CSR form (torch.sparse.mm).

    dense_zeros_speedup near 1 is the statement that dense kernels gain nothing from zeros;
    csr_speedup is what torch's sparse kernel gives at this density (often below 1).
    """
    weight = weight.detach().float().cpu()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, weight.shape[1], generator=g)
    filled = torch.randn(weight.shape, generator=g)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = weight.to_sparse_csr()
    x_t = x.T.contiguous()
    masked_s = _median_seconds(lambda: nn.functional.linear(x, weight), repeats)
    filled_s = _median_seconds(lambda: nn.functional.linear(x, filled), repeats)
    csr_s = _median_seconds(lambda: torch.sparse.mm(csr, x_t), repeats)
    return {"density": csr.values().numel() / weight.numel(), "tokens": tokens,
            "dense_masked_s": masked_s, "dense_filled_s": filled_s, "csr_s": csr_s,
            "dense_zeros_speedup": filled_s / masked_s, "csr_speedup": masked_s / csr_s}
