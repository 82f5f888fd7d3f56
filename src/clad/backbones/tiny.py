"""A tiny random-initialised CNN with the same feature contract, for fast tests."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from clad.backbones.base import Backbone, FeatureInfo


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyCNN(Backbone):
    """Stem at stride 2, then four stages at strides 4, 8, 16, 32 with 8, 16, 32, 64 channels."""

    def __init__(self, seed: int = 0, width: int = 8):
        super().__init__()
        self.spec = "tiny_cnn"
        gen = torch.Generator().manual_seed(seed)
        chans = [width, width * 2, width * 4, width * 8]
        self.stem = _block(3, width)
        self.stages = nn.ModuleList(_block(cin, cout) for cin, cout in zip([width] + chans[:-1], chans))
        with torch.no_grad():
            # Every parameter comes from the seeded generator, never the global RNG.
            for pname, p in self.named_parameters():
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5)
                else:  # batch-norm scales near 1, biases near 0
                    base = 1.0 if pname.endswith("weight") and ".1." in pname else 0.0
                    p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
        self.feature_info = [FeatureInfo(f"stage{i + 1}", c, 2 ** (i + 2)) for i, c in enumerate(chans)]
        self.default_size = 64
        self.eval()

    def forward(self, x: torch.Tensor, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        names = [f.name for f in self.feature_info]
        layers = list(layers or names)
        last = max(names.index(n) for n in layers)
        out = {}
        h = self.stem(x)
        for i, stage in enumerate(self.stages[: last + 1]):
            h = stage(h)
            if names[i] in layers:
                out[names[i]] = h
        return out

    def run_stage(self, stage: str, h: torch.Tensor, blocks=None) -> torch.Tensor:
        for block in blocks if blocks is not None else self.blocks_of_stage(stage):
            h = block(h)
        return h

    def blocks_of_stage(self, stage: str) -> list[nn.Module]:
        return [self.stages[int(stage[-1]) - 1]]


def tiny_cnn(seed: int = 0, width: int = 8) -> TinyCNN:
    return TinyCNN(seed=seed, width=width)
