"""SPADE (Cohen & Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences", 2020).

fit: keep every normal image's global feature (the deepest stage, average-pooled) and its multi-scale feature map.
predict: image level, the K normal images nearest in global features give the image score, the mean squared
distance to them (Eq. 1 of the paper); pixel level, each test position's score is the mean squared distance to
its ``k`` nearest positions among those K images' feature maps (the "feature pyramid correspondence"). The map
is upsampled to the working size, Gaussian-smoothed and resized to each image's own resolution.

Choices:
- pixel features: ``stage1`` + ``stage2`` + ``stage3`` on the grid of ``grid_layer`` (default ``stage2``: stride
  8, 32 x 32 at 256 px; ``"stage1"`` is the paper's stride 4, 16x the search cost). Global: ``stage4`` pooled.
- memory: the gallery of one test image is K x P rows; it is gathered and searched ``_GALLERY_ROWS`` rows at a time,
  so neither the gather nor the distance blocks grow with K.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from clad.data.io import load_batch
from clad.detectors.base import Detector, bounded
from clad.detectors.capabilities import BackbonePatchFeatures
from clad.detectors.padim import on_grid
from clad.ops.knn import knn
from clad.ops.smoothing import smooth_maps

_GALLERY_ROWS = 64 * 1024  # gallery rows gathered at once for one test image (64k x 176 floats = 45 MB)


@dataclass
class SPADEConfig:
    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("stage1", "stage2", "stage3")  # pixel-level features
    grid_layer: str = "stage2"  # the grid the pixel-level features are compared on
    global_layer: str = "stage4"  # average-pooled for the image-level k-NN
    image_size: int = bounded(256, "[8, inf)")
    n_neighbour_images: int = bounded(50, "[1, inf)")  # K (fewer when fewer normal images were given)
    k: int = bounded(1, "[1, inf)")  # pixel-level neighbours (kappa)
    sigma: float = bounded(4.0, "[0, inf)")  # Gaussian smoothing of the map, in working-resolution pixels
    batch_size: int = bounded(16, "[1, inf)")
    seed: int = 0

    def __post_init__(self):
        self.layers = tuple(self.layers)


class SPADE(BackbonePatchFeatures, Detector):
    """Image-level k-NN on global features, then pixel-level k-NN against the nearest images' feature maps."""

    Config = SPADEConfig

    @torch.inference_mode()
    def _embed(self, arrays) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """RGB arrays -> (global features (B, G), pixel features (B, P, C), grid (h, w)) with P = h * w."""
        cfg = self.config
        bb = self._backbone()
        names = tuple(dict.fromkeys(cfg.layers + (cfg.global_layer,)))
        feats = bb(bb.preprocess(arrays, cfg.image_size), names)
        pixel = on_grid(feats, cfg.layers, cfg.grid_layer)  # (B, C, h, w)
        grid = tuple(pixel.shape[-2:])
        glob = feats[cfg.global_layer].mean(dim=(2, 3)).cpu()  # (B, G)
        return glob, pixel.flatten(2).transpose(1, 2).contiguous().cpu(), grid

    def _fit(self, images) -> None:
        cfg = self.config
        glob, pix = [], []
        for start in range(0, len(images), cfg.batch_size):
            arrays, _ = load_batch(images[start : start + cfg.batch_size])
            g, p, self.grid_ = self._embed(arrays)
            glob.append(g)
            pix.append(p)
        self.global_ = torch.cat(glob)  # (N, G)
        self.pixel_ = torch.cat(pix)  # (N, P, C)

    @torch.inference_mode()
    def _predict_batch(self, images):
        cfg = self.config
        arrays, shapes = load_batch(images)
        g, p, grid = self._embed(arrays)  # (B, G), (B, P, C)
        n_img = min(cfg.n_neighbour_images, len(self.global_))
        d, nearest = knn(g, self.global_, k=n_img)  # (B, K)
        scores = (d * d).mean(1)
        patch = torch.stack([self._pixel_scores(p[b], nearest[b]) for b in range(len(arrays))])  # (B, P)
        return scores.numpy(), smooth_maps(patch.view(-1, *grid), cfg.image_size, cfg.sigma, shapes)

    def _pixel_scores(self, query: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Mean squared distance of each query row (P, C) to its k nearest rows in the maps of ``images`` (K,)."""
        n_pos = self.pixel_.shape[1]
        step = max(1, _GALLERY_ROWS // n_pos)  # images per gathered chunk
        k = min(self.config.k, len(images) * n_pos)
        best = torch.empty(len(query), 0)
        for lo in range(0, len(images), step):
            gallery = self.pixel_[images[lo : lo + step]].reshape(-1, self.pixel_.shape[2])  # (chunk * P, C)
            d, _ = knn(query, gallery, k=k)  # (P, k)
            best = torch.cat([best, d], 1).topk(min(k, best.shape[1] + d.shape[1]), dim=1, largest=False).values
        return (best * best).mean(1)

    def _get_state(self):
        return {"global": self.global_, "pixel": self.pixel_}, {"grid": list(self.grid_)}

    def _set_state(self, tensors, meta):
        self.global_ = tensors["global"].float()
        self.pixel_ = tensors["pixel"].float()
        self.grid_ = tuple(meta["grid"])
        if self.pixel_.shape[1] != self.grid_[0] * self.grid_[1]:
            raise ValueError(f"pixel features have {self.pixel_.shape[1]} positions, grid {self.grid_} needs more")
