"""CLAD's calibration after training, from the references and fresh views of them (never test data): sigma of
Eq. 4, CLAD+'s patch memory and the scales of its fusion. (The threshold is every detector's:
``clad.detectors.thresholds``.)"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clad.detectors.clad.training import augment
from clad.detectors.patchcore import coreset_size
from clad.ops.coreset import greedy_coreset


def memory_size(n: int, ratio: float, lo: int, hi: int) -> int:
    """How many of ``n`` reference patches the memory keeps: ceil(ratio * n), at least ``lo`` (all when fewer),
    at most ``hi``."""
    return min(hi, max(min(n, lo), coreset_size(n, ratio)))


def sigmas(z: torch.Tensor, normal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4's sigma for patches and for images: the mean squared distance of the references' patch embeddings
    z (B, D, h, w), and of their image embeddings, to the normal class embedding (D,)."""
    d2 = ((z - normal[None, :, None, None]) ** 2).sum(1)
    z_img = F.normalize(z.mean(dim=(2, 3)), dim=-1)
    d2_img = ((z_img - normal) ** 2).sum(1)
    return torch.tensor(float(d2.mean().clamp_min(1e-6))), torch.tensor(float(d2_img.mean().clamp_min(1e-6)))


def memory_bank(feat: torch.Tensor, ratio: float, lo: int, hi: int, seed: int) -> torch.Tensor:
    """The references' frozen patch features (B, C, h, w) -> the memory (M, C): all of them, or with more than
    ``memory_size`` a greedy k-center coreset (PatchCore's selection)."""
    bank = feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1])
    keep = memory_size(len(bank), ratio, lo, hi)
    if keep < len(bank):
        bank = bank[greedy_coreset(bank, keep, seed=seed)]
    return bank.contiguous()


def views(refs: list[np.ndarray], rng: np.random.Generator, size: int) -> list[np.ndarray]:
    """Held-out normal views of the references, between 8 and 32."""
    n = max(8, min(len(refs), 32))
    return [augment(refs[i % len(refs)], rng, size) for i in range(n)]


def scale(values: torch.Tensor) -> torch.Tensor:
    """A map's scale for the fusion: the 99th percentile of its values on normal views."""
    return torch.quantile(values.flatten(), 0.99).clamp_min(1e-6)

