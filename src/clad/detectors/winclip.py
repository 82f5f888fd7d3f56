"""WinCLIP and WinCLIP+ (Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation", CVPR 2023).

- Zero-shot image score: the class embedding of the image against the two prompt-ensemble prototypes
  (normal, anomalous), softmax at temperature 0.07; the score is the anomalous probability.
- Zero-shot map: every k x k window of patches (stride 1, k in ``window_sizes``) is encoded by the image tower from
  its own tokens only and scored the same way. A patch's score at one scale is the harmonic mean of the windows
  covering it; the scales and the image score (the whole image as one window) are combined by harmonic mean.
- WinCLIP+ (``few_shot``): memories of the references' patch embeddings and of their window embeddings per scale. A
  patch's / window's visual score is min over its memory of (1 - cos) / 2; windows go to patches by harmonic mean;
  the scales (patches, then each window size) are averaged. Map = mean(language map, visual map); image score =
  mean(zero-shot score, max of the visual map).
The map is upsampled to the working resolution, smoothed (Gaussian, ``sigma``) and resized to each input's size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clad.data.io import load_batch
from clad.detectors.base import Detector
from clad.detectors.capabilities import from_config
from clad.errors import ConfigError
from clad.ops.knn import knn
from clad.ops.prompts import object_name_for, prompt_ensemble
from clad.ops.smoothing import smooth_maps
from clad.registry import create_backbone

EPS = 1e-12  # floor of scores before 1/x in harmonic means (softmax at T = 0.07 can underflow to 0)


def window_masks(grid: tuple[int, int], size: int, stride: int = 1) -> torch.Tensor:
    """All ``size`` x ``size`` windows sliding over an (h, w) patch grid -> (K, h*w) bool, row-major windows."""
    h, w = grid
    if size > min(h, w):
        raise ValueError(f"window size {size} does not fit the {h}x{w} patch grid")
    cells = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    idx = F.unfold(cells, size, stride=stride)[0].long().T  # (K, size*size) patch indices of each window
    return torch.zeros(idx.shape[0], h * w, dtype=torch.bool).scatter_(1, idx, True)


def harmonic_aggregation(window_scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, K) window scores, (K, N) bool masks -> (B, N): each patch's harmonic mean over the windows covering it.

    A patch that no window covers gets 0.
    """
    cover = masks.to(window_scores)  # (K, N)
    inv = (1.0 / window_scores.clamp_min(EPS)) @ cover  # (B, N) sum of 1/score over covering windows
    n = cover.sum(0)  # (N,)
    return torch.where(n > 0, n / inv.clamp_min(EPS), torch.zeros_like(inv))


def harmonic_mean(maps: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return maps.shape[dim] / (1.0 / maps.clamp_min(EPS)).sum(dim)


def anomaly_probability(emb: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., D) unit embeddings, (2, D) unit (normal, anomalous) prototypes -> (...) softmax probability of anomalous."""
    return (emb @ prototypes.T / temperature).softmax(-1)[..., 1]


def visual_score(emb: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(..., D) unit embeddings, (M, D) unit memory -> (...) min over memory of (1 - cos) / 2."""
    d, _ = knn(emb.reshape(-1, emb.shape[-1]), memory, k=1, indices=False)  # Euclidean: for unit vectors d^2 = 2 - 2 cos
    return (d[:, 0] ** 2 / 4).view(emb.shape[:-1])


@dataclass
class WinCLIPConfig:
    backbone: str = "clip:openai/clip-vit-base-patch16"
    category: str | None = None
    object_name: str | None = None  # None: from ``category`` ("metal_nut" -> "metal nut"), else "object"
    window_sizes: tuple[int, ...] = (2, 3)  # in patches; the paper's small and mid scales
    temperature: float = 0.07
    few_shot: bool = True  # WinCLIP+: use the images given to fit as references; False: fit only encodes prompts
    image_size: int | None = None  # None: the CLIP model's own input size
    sigma: float = 4.0  # Gaussian smoothing of the map, in working-resolution pixels
    seed: int = 0

    def __post_init__(self):
        self.window_sizes = tuple(int(k) for k in self.window_sizes)
        if not str(self.backbone).startswith("clip:"):
            raise ConfigError(f"winclip needs a CLIP backbone 'clip:/path/to/hf_clip_folder', got {self.backbone!r}")
        if not self.window_sizes or min(self.window_sizes) < 1:
            raise ConfigError(f"window_sizes must be positive patch counts, got {self.window_sizes}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


class WinCLIP(Detector):
    """WinCLIP (zero-shot) or WinCLIP+ (few-shot, ``few_shot=True``) on a Hugging Face CLIP model."""

    Config = WinCLIPConfig
    fits_without_references = from_config(lambda c: not c.few_shot)  # zero-shot WinCLIP: ``--shots 0``

    def _backbone(self):
        if getattr(self, "backbone_", None) is None:
            self.backbone_ = create_backbone(self.config.backbone)
            protos = getattr(self, "text_prototypes_", None)
            if protos is not None and protos.shape[1] != self.backbone_.embed_dim:
                raise ConfigError(
                    f"saved prototypes are {protos.shape[1]}-d but {self.config.backbone} embeds in "
                    f"{self.backbone_.embed_dim}-d: not the CLIP model this detector was fitted with"
                )
        return self.backbone_

    def _object_name(self) -> str:
        cfg = self.config
        return cfg.object_name or (object_name_for(cfg.category) if cfg.category else "object")

    def _encode(self, arrays) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """RGB arrays -> (image (B, D), patches (B, N, D), windows per scale [(B, K_s, D)], masks [(K_s, N)])."""
        bb = self._backbone()
        x = bb.preprocess(arrays, self.config.image_size or bb.default_size)
        grid = (x.shape[-2] // bb.patch_size, x.shape[-1] // bb.patch_size)
        masks = [window_masks(grid, k) for k in self.config.window_sizes]
        image, patches, windows = bb.encode_dense(x, masks)
        return image, patches, windows, masks

    @torch.inference_mode()
    def _fit(self, images) -> None:
        bb = self._backbone()
        self.object_name_ = self._object_name()
        self.text_prototypes_ = torch.stack(prompt_ensemble(bb.encode_text, self.object_name_))  # (2, D)
        if not self.config.few_shot:
            return
        arrays, _ = load_batch(images)
        parts = [self._encode(arrays[i : i + 8]) for i in range(0, len(arrays), 8)]
        self.patch_memory_ = torch.cat([p[1].flatten(0, 1) for p in parts])  # (n * N, D)
        n_scales = len(self.config.window_sizes)
        self.window_memory_ = [torch.cat([p[2][s].flatten(0, 1) for p in parts]) for s in range(n_scales)]  # (n*K_s, D)

    def score_maps(self, image, patches, windows, masks) -> dict[str, torch.Tensor]:
        """Scores from embeddings: image_zero_shot (B,), language (B, N), and with references visual (B, N),
        then the combined ``score`` (B,) and ``map`` (B, N)."""
        protos, t = self.text_prototypes_, self.config.temperature
        p_img = anomaly_probability(image, protos, t)  # (B,)
        scales = [p_img[:, None].expand(-1, patches.shape[1])]
        scales += [harmonic_aggregation(anomaly_probability(w, protos, t), m) for w, m in zip(windows, masks)]
        out = {"image_zero_shot": p_img, "language": harmonic_mean(torch.stack(scales))}  # (B,), (B, N)
        out["score"], out["map"] = p_img, out["language"]
        if self.config.few_shot:
            vis = [visual_score(patches, self.patch_memory_)]
            vis += [harmonic_aggregation(visual_score(w, mem), m) for w, mem, m in zip(windows, self.window_memory_, masks)]
            out["visual"] = torch.stack(vis).mean(0)  # (B, N)
            out["score"] = (p_img + out["visual"].amax(1)) / 2
            out["map"] = (out["language"] + out["visual"]) / 2
        return out

    @torch.inference_mode()
    def _predict_batch(self, images):
        arrays, shapes = load_batch(images)
        image, patches, windows, masks = self._encode(arrays)
        out = self.score_maps(image, patches, windows, masks)
        bb = self._backbone()
        size = self.config.image_size or bb.default_size
        gh = gw = size // bb.patch_size
        maps = smooth_maps(out["map"].view(-1, gh, gw), size, self.config.sigma, shapes)
        return out["score"].cpu().numpy().astype(np.float32), maps

    def _get_state(self):
        tensors = {"text_prototypes": self.text_prototypes_}
        if self.config.few_shot:
            tensors["patch_memory"] = self.patch_memory_
            tensors.update({f"window_memory.{k}": m for k, m in zip(self.config.window_sizes, self.window_memory_)})
        return tensors, {"object_name": self.object_name_}

    def _set_state(self, tensors, meta):
        self.text_prototypes_ = tensors["text_prototypes"].float()
        self.object_name_ = meta["object_name"]
        if self.config.few_shot:
            self.patch_memory_ = tensors["patch_memory"].float()
            self.window_memory_ = [tensors[f"window_memory.{k}"].float() for k in self.config.window_sizes]
