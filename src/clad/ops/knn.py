"""Batched, memory-bounded nearest-neighbour search in torch."""
from __future__ import annotations

import numpy as np
import torch

# Largest distance block computed at once (query rows x bank rows), in float32 elements: 1 M = 4 MB, so a block
# is still in cache when its minimum is taken (faster than larger blocks; measured in benchmarks/README.md).
MAX_BLOCK = 1024 * 1024


def row_min(d: torch.Tensor, index: bool = True, gil: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``d.min(1)`` of a 2-d tensor: (values (N,), indices (N,) or None), the first index on a tie.

    Row minima are where torch's CPU kernels are slow: ``torch.min`` is many times slower than ``amin`` or
    numpy's ``argmin`` plus a gather. So the values alone come from ``amin``, and the indices, where wanted, from
    numpy (CPU float tensors without autograd; elsewhere ``torch.min``). numpy's argmin holds the GIL: ``gil=False`` keeps to ``torch.min``, for
    threads that search side by side.
    """
    if not index:
        return d.amin(1), None
    if not gil or d.device.type != "cpu" or d.requires_grad or d.dtype not in (torch.float32, torch.float64) or 0 in d.shape:
        return d.min(1)
    a = d.numpy()
    j = a.argmin(1)
    return torch.from_numpy(a[np.arange(len(j)), j]), torch.from_numpy(j)


def knn(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    max_block: int = MAX_BLOCK,
    indices: bool = True,
    bank_sq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Euclidean k nearest neighbours of each query row in ``bank``.

    query: (N, D), bank: (M, D). Returns (distances (N, k), indices (N, k)), ascending; with ``indices=False``
    and k = 1 the indices are not computed (None), which makes the row minima several times cheaper.
    Works in blocks of both queries and bank rows so memory stays under ``max_block`` floats. ``bank_sq``: the
    squared norms of the bank rows (M,), for a bank searched many times (a pass over a large bank otherwise).
    """
    indices = indices or k > 1
    k = min(k, bank.shape[0])
    n, m = query.shape[0], bank.shape[0]
    # Blocks of at least 1,024 queries; fewer queries take correspondingly more bank rows per block, so that a
    # small query set costs a few large products, not one small product per 1,024 bank rows.
    bank_chunk = min(m, max(k, max_block // max(1, min(n, 1024))))
    q_chunk = max(1, max_block // bank_chunk)
    if bank_sq is None:
        bank_sq = (bank * bank).sum(1)  # (M,)
    out_d = torch.empty(n, k, dtype=query.dtype, device=query.device)
    out_i = torch.empty(n, k, dtype=torch.long, device=query.device) if indices else None
    for qs in range(0, n, q_chunk):
        q = query[qs : qs + q_chunk]
        best_d, best_i = None, None
        for bs in range(0, m, bank_chunk):
            # |b|^2 - 2 q.b: the squared distance less |q|^2, which is the same along a row, so it is added
            # only to the winners.
            d2 = torch.addmm(bank_sq[bs : bs + bank_chunk], q, bank[bs : bs + bank_chunk].T, alpha=-2.0)  # (n, mb)
            if k == 1:
                d, i = row_min(d2, indices)
                d, i = d[:, None], None if i is None else i[:, None] + bs
            else:
                d, i = d2.topk(min(k, d2.shape[1]), dim=1, largest=False)
                i = i + bs
            if best_d is None:
                best_d, best_i = d, i
            elif not indices:
                best_d = torch.minimum(best_d, d)
            elif k == 1:
                better = d < best_d  # on a tie the earlier row stays
                best_d, best_i = torch.where(better, d, best_d), torch.where(better, i, best_i)
            else:
                cat_d, cat_i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
                best_d, sel = cat_d.topk(k, dim=1, largest=False)
                best_i = cat_i.gather(1, sel)
        q_sq = (q * q).sum(1, keepdim=True)  # (n, 1)
        out_d[qs : qs + q_chunk] = best_d.add_(q_sq).clamp_min_(0).sqrt_()
        if indices:
            out_i[qs : qs + q_chunk] = best_i
    return out_d, out_i
