"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with Optimal Brain Surgeon updates.

Pruning a Linear layer W (rows x columns) is posed as keeping its outputs on calibration inputs
X: minimise ||W X - W' X||^2 with H = X^T X. Columns are visited left to right; zeroing
column j's pruned weights leaves an error that OBS spreads over the columns not yet visited,
through row j of the upper Cholesky factor U of H^-1 (U_jj^2 = [H_F^-1]_jj, F the columns from
j on). Inside a block of `block_size` columns each error updates the block's later columns at
once; the columns after the block receive the block's errors in one matrix product. The mask is
chosen block by block from the current (already updated) weights by the OBS saliency
w^2 / U_jj^2, over all rows of the block jointly, so rows and columns end up with different
sparsities ("adaptive mask selection"); with N:M, per row within each group of m columns when
the group is reached.

Unlike the reference, which prunes one more weight than asked per block and lets ties add more,
the count here is exact: block b prunes round(s * rows * end_b) - round(s * rows * start_b)
weights, so the layer prunes exactly round(s * rows * columns), ties broken by position.
"""

from __future__ import annotations

import torch

from gradprune.pruning.masks import keep_top, masks_for_n_m


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None, *,
                    n: int = 0, m: int = 0, block_size: int = 128,
                    damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The reconstructed weight (weight's dtype, exactly 0 where pruned) and the keep mask.

    hessian: X^T X over calibration inputs, columns x columns, any positive scale.
    sparsity: fraction pruned, in [0, 1); with n:m it must be None or 1 - n/m.
    n, m: keep n of every m consecutive input weights (0, 0 = unstructured).
    damp: added to H's diagonal as a fraction of its mean, so the inverse exists.
    Inputs that never fire (H_jj = 0) cannot affect the output: their weights are zeroed and,
    scoring 0, pruned first; if they outnumber the pruned count, some kept weights are 0.
    """
    rows, columns = weight.shape
    if hessian.shape != (columns, columns):
        raise ValueError(f"hessian of shape {tuple(hessian.shape)} does not match a weight with "
                         f"{columns} input columns")
    structured = n != 0 or m != 0
    if structured:
        if not 0 < n < m or columns % m or block_size % m:
            raise ValueError(f"n:m = {n}:{m} needs 0 < n < m, with m dividing the {columns} "
                             f"input columns and block_size={block_size}")
        if sparsity is not None and abs(sparsity - (m - n) / m) > 1e-9:
            raise ValueError(f"sparsity {sparsity} contradicts the {n}:{m} pattern")
    elif sparsity is None or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not damp > 0 or block_size < 1:
        raise ValueError(f"damp must be > 0 and block_size >= 1, got {damp}, {block_size}")

    h = hessian.detach().to(device=weight.device, dtype=torch.float32, copy=True)
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    h.diagonal().add_(damp * h.diagonal().mean())
    factor, info = torch.linalg.cholesky_ex(h)
    if info:
        raise ValueError(f"damped hessian is not positive definite (damp={damp}); raise damp or "
                         "use more calibration tokens")
    u = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)

    # Columns are stored as rows (w_t is columns x rows): every OBS step then updates
    # contiguous memory, which on CPU is several times faster than strided column updates.
    w_t = weight.detach().float().T.contiguous()
    w_t[dead] = 0
    keep = torch.ones(rows, columns, dtype=torch.bool, device=weight.device)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w_t[start:end]
        u_block = u[start:end, start:end]
        diag = u_block.diagonal()
        errors = torch.zeros_like(block)
        if not structured:
            n_prune = round(sparsity * rows * end) - round(sparsity * rows * start)
            saliency = (block.square() / diag.square().unsqueeze(1)).T.contiguous()
            keep[:, start:end] = keep_top({"block": saliency}, n_prune)["block"]
        keep_t = keep[:, start:end].T.contiguous()
        for j in range(end - start):
            if structured and j % m == 0:
                saliency = (block[j:j + m].square() / diag[j:j + m].square().unsqueeze(1)).T
                group = masks_for_n_m({"group": saliency.contiguous()}, n, m)["group"]
                keep[:, start + j:start + j + m] = group
                keep_t[j:j + m] = group.T
            kept = block[j] * keep_t[j]
            errors[j] = (block[j] - kept) / diag[j]
            block[j:].addr_(u_block[j, j:], errors[j], alpha=-1)
            # The update already leaves `kept` in column j up to rounding; store it exactly.
            block[j] = kept
        w_t[end:] -= u[start:end, end:].T @ errors
    return w_t.T.to(weight.dtype).contiguous(), keep


def sparsegpt_prune_layers(weights: dict[str, torch.Tensor],
                           stats: dict[str, dict[str, torch.Tensor]], targets: dict[str, float], *,
                           n: int = 0, m: int = 0, block_size: int = 128, damp: float = 0.01,
                           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """sparsegpt_prune per weight name with its own target (see masks.sparsity_targets).

    A target of 0 leaves the weight untouched and dense (how exclusions arrive). With n:m every
    other weight gets the N:M pattern, whatever its target.
    """
    new_weights, masks = {}, {}
    for name, weight in weights.items():
        if targets[name] == 0:
            new_weights[name] = weight
            masks[name] = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
            continue
        if "hessian" not in stats[name]:
            raise ValueError(f"statistics for {name} hold no hessian; rerun the gradients stage "
                             "with hessian collection on")
        new_weights[name], masks[name] = sparsegpt_prune(
            weight, stats[name]["hessian"], None if n or m else targets[name],
            n=n, m=m, block_size=block_size, damp=damp)
    return new_weights, masks
