"""PatchKNN: the simplest patch-memory detector (PatchCore without coreset), the contract's reference.

Teaching (``add_references``) appends the new patches to the memory, which past ``max_bank`` stays a uniform sample
of every patch seen (reservoir sampling).
"""
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
    can_add_references = True

    def _embed(self, arrays) -> torch.Tensor:
        bb = self._backbone()
        x = bb.preprocess(arrays, self.config.image_size)
        return patch_embeddings(bb, x, self.config.layers)  # (B, C, h, w)

    def _patches(self, images) -> torch.Tensor:
        """Every patch of ``images``: (N*h*w, C)."""
        arrays, _ = load_batch(images)
        parts = [self._embed(arrays[i : i + 16]) for i in range(0, len(arrays), 16)]
        return torch.cat([p.permute(0, 2, 3, 1).reshape(-1, p.shape[1]) for p in parts])

    def _fit(self, images) -> None:
        bank = self._patches(images)  # (N*h*w, C)
        self.bank_size_ = len(bank)
        if bank.shape[0] > self.config.max_bank:
            gen = torch.Generator().manual_seed(self.config.seed)
            bank = bank[torch.randperm(bank.shape[0], generator=gen)[: self.config.max_bank]]
        self.memory_bank_ = bank.contiguous()

    def _add_references(self, arrays) -> None:
        """The new patches are appended; past ``max_bank`` the memory stays a uniform sample of all the patches
        seen (reservoir sampling, the draws seeded by the seed and the patches seen before)."""
        new = self._patches(arrays)  # (K, C)
        seen, cap = self.bank_size_, self.config.max_bank
        room = max(0, min(len(new), cap - len(self.memory_bank_)))
        bank = torch.cat([self.memory_bank_, new[:room]])
        if room < len(new):  # the t-th patch seen takes slot j ~ U{0..t} when j < cap
            t = np.arange(seen + room, seen + len(new))
            slot = np.random.default_rng([self.config.seed, seen]).integers(t + 1)
            took = np.flatnonzero(slot < cap)
            last = len(took) - 1 - np.unique(slot[took][::-1], return_index=True)[1]  # a later patch wins a slot
            rows = torch.from_numpy(room + took[last])
            bank[torch.from_numpy(slot[took[last]])] = new[rows]
        self.memory_bank_ = bank.contiguous()
        self.bank_size_ = seen + len(new)

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
        return {"memory_bank": self.memory_bank_}, {"bank_size": self.bank_size_}

    def _set_state(self, tensors, meta):
        self.memory_bank_ = tensors["memory_bank"].float()
        self.bank_size_ = meta.get("bank_size")  # patches seen, for teaching (absent before it)
