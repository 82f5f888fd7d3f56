"""PatchKNN: the simplest patch-memory detector (PatchCore without coreset), the contract's reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clad.data.io import load_batch
from clad.detectors.base import Detector, bounded
from clad.detectors.capabilities import BackbonePatchFeatures
from clad.ops.features import patch_embeddings
from clad.ops.knn import knn
from clad.ops.smoothing import smooth_maps


@dataclass
class PatchKNNConfig:
    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("stage2", "stage3")
    image_size: int = bounded(256, "[8, inf)")
    max_bank: int = bounded(100_000, "[1, inf)")  # random subsample of the memory bank above this many patches
    sigma: float = bounded(4.0, "[0, inf)")  # Gaussian smoothing of the map, in working-resolution pixels
    seed: int = 0

    def __post_init__(self):
        self.layers = tuple(self.layers)


class PatchKNN(BackbonePatchFeatures, Detector):
    """Distance of each test patch to its nearest normal patch; image score is the largest patch score."""

    Config = PatchKNNConfig
    score_is_map_max = True

    def _embed(self, arrays) -> torch.Tensor:
        bb = self._backbone()
        x = bb.preprocess(arrays, self.config.image_size)
        return patch_embeddings(bb, x, self.config.layers)  # (B, C, h, w)

    def _fit(self, images) -> None:
        arrays, _ = load_batch(images)
        parts = [self._embed(arrays[i : i + 16]) for i in range(0, len(arrays), 16)]
        bank = torch.cat([p.permute(0, 2, 3, 1).reshape(-1, p.shape[1]) for p in parts])  # (N*h*w, C)
        if bank.shape[0] > self.config.max_bank:
            gen = torch.Generator().manual_seed(self.config.seed)
            bank = bank[torch.randperm(bank.shape[0], generator=gen)[: self.config.max_bank]]
        self.memory_bank_ = bank.contiguous()

    @torch.inference_mode()
    def _predict_batch(self, images):
        arrays, shapes = load_batch(images)
        emb = self._embed(arrays)  # (B, C, h, w)
        b, c, h, w = emb.shape
        d, _ = knn(emb.permute(0, 2, 3, 1).reshape(-1, c), self.memory_bank_, k=1, indices=False)
        patch = d[:, 0].view(b, h, w)
        scores = patch.flatten(1).max(1).values
        return scores.numpy(), smooth_maps(patch, self.config.image_size, self.config.sigma, shapes)

    def _get_state(self):
        return {"memory_bank": self.memory_bank_}, {}

    def _set_state(self, tensors, meta):
        self.memory_bank_ = tensors["memory_bank"].float()
