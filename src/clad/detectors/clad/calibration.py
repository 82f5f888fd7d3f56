"""CLAD's calibration after training, from the references and fresh views of them (never test data): sigma of
Eq. 4, CLAD+'s patch memory, the scales of its fusion, and the self-check that sets the language map's weight in
it. (The threshold is every detector's: ``clad.detectors.thresholds``.)"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clad.detectors.patchcore import coreset_size
from clad.detectors.thresholds import jitter
from clad.metrics import image_auroc
from clad.ops.coreset import greedy_coreset
from clad.synthesis import make_anomaly

# The self-check: this many held-out normal views of the references and as many with a synthetic anomaly.
CHECK_VIEWS = 16
# A language map whose self-check AUROC (patch or image) is below this is "near or below chance": fit warns, and
# CLAD+ gives it no weight.
WARN_BELOW = 0.6
LANGUAGE_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)  # CLAD+'s candidate weights of the language map
MIN_GAIN = 0.01  # what the language map must add to the memory alone on the self-check to get any weight


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
    """Held-out normal views of the references, between 8 and 32, their borders reflected (``thresholds.jitter``:
    a black fill would be far from the memory and inflate its scale)."""
    n = max(8, min(len(refs), 32))
    return [jitter(refs[i % len(refs)], rng, size) for i in range(n)]


def check_set(refs: list[np.ndarray], seed: int, size: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The self-check's held-out set: ``CHECK_VIEWS`` normal views of the references (seeded order) and as many
    further views with a synthetic anomaly; returns the images (size, size, 3), their masks (N, size, size) bool and
    their labels (N,) 0/1. Neither training nor the scales see these views."""
    rng = np.random.default_rng([seed, 23])
    order = rng.permutation(len(refs))
    pick = [refs[order[i % len(refs)]] for i in range(CHECK_VIEWS)]
    anomalies = [make_anomaly(jitter(r, rng, size), rng) for r in pick]
    images = [jitter(r, rng, size) for r in pick] + [a.image for a in anomalies]
    masks = np.stack([np.zeros((size, size), bool)] * CHECK_VIEWS + [a.mask for a in anomalies])
    return images, masks, np.repeat([0, 1], CHECK_VIEWS)


def patch_auroc(masks: np.ndarray, maps: torch.Tensor) -> float:
    """AUROC of patch maps (N, h, w) against masks (N, H, W): a patch is defective where at least half of it is,
    normal where none of it is; the others are left out."""
    frac = F.adaptive_avg_pool2d(torch.from_numpy(masks).float()[:, None], maps.shape[-2:])[:, 0]
    keep = (frac == 0) | (frac >= 0.5)
    return float(image_auroc((frac[keep] >= 0.5).numpy().astype(np.int64), maps[keep].numpy()))


def check(lang: torch.Tensor, mem: torch.Tensor, pooled: torch.Tensor, masks: np.ndarray, labels: np.ndarray,
          scale_lang: torch.Tensor, scale_mem: torch.Tensor, image_score) -> dict:
    """The self-check's figures from the held-out set's patch maps (N, h, w) of both halves and the language
    half's pooled image scores (N,): each half's patch and image AUROC (image: ``image_score`` of the map, the
    smoothed map's maximum), the language half's pooled one, and for each of ``LANGUAGE_WEIGHTS`` the mean of the
    fused map's patch and image AUROC (as predict fuses: each map divided by its scale)."""
    def figures(patch):
        return {"patch": _finite(patch_auroc(masks, patch)), "image": _finite(image_auroc(labels, image_score(patch)))}

    out = {"language": {**figures(lang), "pooled": _finite(image_auroc(labels, pooled))}, "memory": figures(mem),
           "fusion": {}}
    for w in LANGUAGE_WEIGHTS:
        fused = [v for v in figures((1 - w) * mem / scale_mem + w * lang / scale_lang).values() if v is not None]
        out["fusion"][f"{w:.1f}"] = sum(fused) / len(fused)
    return out


def _finite(auroc) -> float | None:
    """An AUROC as a float, None where undefined (no defective patch fully covered, on tiny images)."""
    return None if np.isnan(auroc) else float(auroc)


def language_is_weak(report: dict) -> bool:
    """Whether the self-check puts the language map near or below chance (either AUROC under ``WARN_BELOW``)."""
    return min(v for v in (report["language"]["patch"], report["language"]["image"]) if v is not None) < WARN_BELOW


def choose_language_weight(report: dict) -> float:
    """CLAD+'s language weight from the self-check (no test labels): 0 when the language map is weak; else the
    smallest candidate whose fused score is within half a point of the best, if it beats the memory alone (weight
    0) by ``MIN_GAIN``, and 0 otherwise. So the language half earns its weight on held-out views, or gets none."""
    if language_is_weak(report):
        return 0.0
    fusion = {float(k): v for k, v in report["fusion"].items()}
    best = max(fusion.values())
    w = min(k for k, v in fusion.items() if v >= best - 0.005)
    return w if fusion[w] >= fusion[0.0] + MIN_GAIN else 0.0


def scale(values: torch.Tensor) -> torch.Tensor:
    """A map's scale for the fusion: the 99th percentile of its values on normal views."""
    return torch.quantile(values.flatten(), 0.99).clamp_min(1e-6)

