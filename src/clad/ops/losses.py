"""CLAD's training losses: the margin contrastive loss (paper Eq. 3) and its supervised ablation."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(
    z_v: torch.Tensor,
    z_t: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    beta: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 3 of the paper, with descriptions as the text side.

    z_v: (N, D) visual embeddings (images or patches); z_t: (C, D) description embeddings; targets: (N,) index of
    each item's own description. Loss = mean_i [||z_v^i - z_t^{y_i}||^2 - alpha]_+
                                       + mean_i sum_{j != y_i} max(0, beta - ||z_v^i - z_t^j||^2).
    ``weights`` (N,) turns both means into weighted means (None = the plain means of Eq. 3).
    """
    d2 = torch.cdist(z_v, z_t).pow(2)  # (N, C)
    pos = d2.gather(1, targets[:, None])[:, 0]
    neg_mask = torch.ones_like(d2, dtype=torch.bool).scatter_(1, targets[:, None], False)
    per_item = F.relu(pos - alpha) + (F.relu(beta - d2) * neg_mask).sum(1)
    if weights is None:
        return per_item.mean()
    return (per_item * weights).sum() / weights.sum().clamp_min(1e-12)


def supervised_loss(
    z_v: torch.Tensor, z_t: torch.Tensor, targets: torch.Tensor, temperature: float = 0.07, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The "without contrastive loss" ablation: plain cross-entropy over the descriptions (cosine logits)."""
    logits = F.normalize(z_v, dim=-1) @ F.normalize(z_t, dim=-1).T / temperature
    per_item = F.cross_entropy(logits, targets, reduction="none")
    if weights is None:
        return per_item.mean()
    return (per_item * weights).sum() / weights.sum().clamp_min(1e-12)
