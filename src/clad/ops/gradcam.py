"""Grad-CAM (paper Eq. 5): ReLU(sum_k alpha_k A_k), alpha_k the spatial mean of d score / d A_k."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def grad_cam(score: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps of a per-image scalar ``score`` (B,) w.r.t. ``activations`` (B, K, h, w) -> (B, h, w).

    ``activations`` must be part of the graph that produced ``score`` (requires_grad or produced from
    parameters that do). The maps are not normalised: scores stay comparable across images.
    """
    grads = torch.autograd.grad(score.sum(), activations, retain_graph=False)[0]  # (B, K, h, w)
    alpha = grads.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    return F.relu((alpha * activations).sum(1))
