"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework", ICPR 2020).

fit: every position of a feature grid gets a multivariate Gaussian (mean, covariance) of a seeded random subset
of channels, estimated from the normal images. predict: the Mahalanobis distance of each test position to its
Gaussian is the anomaly map (upsampled, Gaussian-smoothed); the image score is the map's maximum.

Choices:
- features: ``stage1`` + ``stage2`` + ``stage3`` (24 + 40 + 112 = 176 channels for efficientnet_lite0) on the
  grid of ``grid_layer`` (default ``stage2``: stride 8, 32 x 32 at 256 px). Finer layers are average-pooled down
  to it, coarser ones upsampled bilinearly. The paper uses the stride-4 grid; stride 8 needs 4x less memory
  (1024 positions x 100 x 100 precision = 41 MB instead of 164 MB) and time; ``grid_layer="stage1"`` is the paper.
- ``n_features`` (100) channels are drawn once from ``seed`` (the paper's random dimensionality reduction).
- covariance: Ledoit-Wolf shrinkage toward a scaled identity, per position, then + ``eps`` I:
  ``cov = (1 - a) S + a (tr S / d) I + eps I`` with S the maximum-likelihood covariance and ``a`` the Ledoit-Wolf
  intensity (as sklearn.covariance.ledoit_wolf); with one image S = 0 and cov = eps I (a scaled Euclidean
  distance), so the covariance is always positive definite. ``eps`` is in feature units: the paper's 0.01 suits
  its ResNet features, but efficientnet_lite0 features have positions (dark background) whose variance is below
  0.01, where it lets noise dominate the map; ``eps=1`` is the default (benchmarks/README.md, "PaDiM's eps").
- memory: the fit accumulates per-position moments batch by batch in float64 (never all the features at once);
  the inverse is computed once per position (Cholesky, in chunks) and stored as the precision matrix.
- teaching (``add_references``): the moments are kept and saved (float32, the d x d sums as their upper triangle:
  21 MB at the defaults, beside the precision's 41 MB), the new images' added to them and the Gaussians computed
  again: the same as a fit on all the references, up to float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from clad.data.corruptions import jittered_copies
from clad.data.io import load_batch
from clad.detectors.base import Detector, bounded
from clad.detectors.capabilities import BackbonePatchFeatures
from clad.ops.coreset import single_thread
from clad.ops.smoothing import smooth_maps, smooth_working

_POSITION_CHUNK = 256  # positions whose d x d matrices are processed at once


@dataclass
class PaDiMConfig:
    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("stage1", "stage2", "stage3")
    grid_layer: str = "stage2"  # the layer whose grid the Gaussians live on
    image_size: int = bounded(256, "[8, inf)")
    n_features: int = bounded(100, "[1, inf)")  # random channel subset (capped at the number of channels)
    # added to the covariance diagonal (the paper's 0.01 is too small for these features)
    eps: float = bounded(1.0, "[1e-06, inf)")  # smaller is lost to float32 rounding beside the features
    sigma: float = bounded(4.0, "[0, inf)")  # Gaussian smoothing of the map, in working-resolution pixels
    # photometric variants of each reference (clad.data.corruptions.jittered_copies) added to the Gaussians' samples;
    # 0: none. On by default (benchmarks/README.md, "Corruption robustness")
    reference_jitter: int = bounded(1, "[0, inf)", omit_from_key_when={"reference_jitter": 0})
    # score each position by its distance minus the median of its image's, so that a change of the whole image
    # (noise, blur, lighting) that moves every score alike moves none. Measured worse (benchmarks/README.md,
    # "Corruption robustness"): clean AUROC falls on magnetic tile and the drop grows on bottle; kept off.
    median_baseline: bool = field(default=False, metadata={"omit_from_key_when": {"median_baseline": False}})
    batch_size: int = bounded(16, "[1, inf)")
    seed: int = 0

    def __post_init__(self):
        self.layers = tuple(self.layers)


def shrunk_covariance(n: int, s1: torch.Tensor, s2: torch.Tensor, s_aa: torch.Tensor, s_ax: torch.Tensor,
                      s_a: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrunk covariances from per-position moments of shifted features y = x - x_ref (float64).

    n: samples; s1 = sum y (P, d); s2 = sum y y^T (P, d, d); s_aa = sum |y|^4 (P,); s_ax = sum |y|^2 y (P, d);
    s_a = sum |y|^2 (P,). Returns (P, d, d) = (1 - a) S + a mu I, S = ML covariance, mu = tr(S) / d.
    """
    d = s1.shape[1]
    m = s1 / n  # (P, d) mean of y
    cov = s2 / n - m[:, :, None] * m[:, None, :]  # (P, d, d) S
    # sum_k |y_k - m|^4, expanded in the moments: |y - m|^2 = |y|^2 - 2 y.m + |m|^2, and sum y = n m.
    c = (m * m).sum(1)  # (P,) |m|^2
    fourth = (s_aa + 4 * (torch.bmm(m[:, None], s2)[:, 0] * m).sum(1) + n * c * c
              - 4 * (s_ax * m).sum(1) + 2 * c * s_a - 4 * c * (s1 * m).sum(1))
    mu = torch.diagonal(cov, dim1=1, dim2=2).sum(1) / d  # (P,)
    cov_sq = (cov * cov).sum((1, 2))
    delta = (cov_sq - d * mu * mu) / d  # |S - mu I|_F^2 / d
    beta = (fourth / n - cov_sq).clamp_min(0) / (d * n)
    a = torch.where(delta > 0, torch.minimum(beta, delta) / delta.clamp_min(1e-300), torch.zeros_like(delta))
    eye = torch.eye(d, dtype=cov.dtype)
    return (1 - a)[:, None, None] * cov + (a * mu)[:, None, None] * eye


def on_grid(feats: dict[str, torch.Tensor], layers, grid_layer: str) -> torch.Tensor:
    """Named feature maps -> the maps of ``layers`` on the grid of ``grid_layer``, concatenated (B, C, h, w).

    Finer maps are average-pooled into the grid cells, coarser ones upsampled bilinearly.
    """
    if grid_layer not in layers:
        raise ValueError(f"grid_layer {grid_layer!r} must be one of layers {tuple(layers)}")
    grid = feats[grid_layer].shape[-2:]
    maps = []
    for name in layers:
        f = feats[name]
        if f.shape[-1] > grid[-1]:
            f = F.adaptive_avg_pool2d(f, grid)
        elif f.shape[-2:] != grid:
            f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
        maps.append(f)
    return torch.cat(maps, dim=1)


class PaDiM(BackbonePatchFeatures, Detector):
    """Per-position Gaussian of normal patch features; anomaly map = Mahalanobis distance; image score = max."""

    Config = PaDiMConfig
    score_is_map_max = True
    can_add_references = True

    @torch.inference_mode()
    def _grid_features(self, arrays) -> torch.Tensor:
        """RGB arrays -> all channels of ``layers`` on the grid of ``grid_layer`` (B, C, h, w)."""
        cfg = self.config
        bb = self._backbone()
        return on_grid(bb(bb.preprocess(arrays, cfg.image_size), cfg.layers), cfg.layers, cfg.grid_layer).cpu()

    def _embed(self, arrays) -> torch.Tensor:
        """RGB arrays -> the selected channels at every grid position (B, P, d), P = h * w."""
        return self._grid_features(arrays)[:, self.channels_].flatten(2).transpose(1, 2)

    def _fit(self, images) -> None:
        self._gaussians(self._accumulate(None, images, 0))

    def _add_references(self, arrays) -> None:
        """The new images' features are added to the moments, and the Gaussians computed from them again: the
        same as a fit on all the references, up to float rounding (the moments are kept in float32)."""
        self._gaussians(self._accumulate(self.moments_.unpacked(), arrays, self.n_references_))

    def _accumulate(self, moments: "_Moments | None", images, first: int) -> "_Moments":
        """``moments`` with the selected channels of ``images`` added (references ``first``, ``first + 1``, ...,
        with their jittered copies), batch by batch. None: a fit, which draws the channels and shifts the moments
        by the first image's features, so that float64 moments stay well conditioned."""
        cfg = self.config
        for start in range(0, len(images), cfg.batch_size):
            arrays, _ = load_batch(images[start : start + cfg.batch_size])
            arrays += jittered_copies(arrays, cfg.reference_jitter, cfg.seed, first + start)
            f = self._grid_features(arrays)  # (B, C, h, w)
            if moments is None:
                gen = torch.Generator().manual_seed(cfg.seed)
                self.channels_ = torch.randperm(f.shape[1], generator=gen)[: cfg.n_features].sort().values
                self.grid_ = tuple(f.shape[-2:])
            x = f[:, self.channels_].flatten(2).transpose(1, 2).double()  # (B, P, d)
            if moments is None:
                moments = _Moments.zeros(x[0].clone())
            moments.add(x)
        return moments

    def _gaussians(self, moments: "_Moments") -> None:
        """``mean_`` (P, d) and ``precision_`` (P, d, d) from the moments, which are kept (packed, float32) for
        teaching."""
        cfg = self.config
        self.mean_ = (moments.ref + moments.s1 / moments.n).float()  # (P, d)
        precision = []
        with single_thread():  # batches of small factorisations: threads only add synchronisation
            for lo in range(0, len(moments.s1), _POSITION_CHUNK):
                sl = slice(lo, lo + _POSITION_CHUNK)
                cov = shrunk_covariance(moments.n, moments.s1[sl], moments.s2[sl], moments.s_aa[sl],
                                        moments.s_ax[sl], moments.s_a[sl])
                cov += cfg.eps * torch.eye(cov.shape[-1], dtype=cov.dtype)
                precision.append(torch.cholesky_inverse(torch.linalg.cholesky(cov)).float())  # (chunk, d, d)
        self.precision_ = torch.cat(precision)  # (P, d, d)
        self.moments_ = moments.packed()

    @torch.inference_mode()
    def _predict_batch(self, images):
        arrays, shapes = load_batch(images)
        x = self._embed(arrays)  # (B, P, d)
        dist = torch.empty(x.shape[:2])
        with single_thread():  # one small matrix product per position
            for lo in range(0, x.shape[1], _POSITION_CHUNK):
                sl = slice(lo, lo + _POSITION_CHUNK)
                diff = (x[:, sl] - self.mean_[sl]).transpose(0, 1)  # (p, B, d)
                m2 = (torch.bmm(diff, self.precision_[sl]) * diff).sum(2)  # (p, B) squared Mahalanobis
                dist[:, sl] = m2.clamp_min(0).sqrt().T
        cfg = self.config
        if cfg.median_baseline:
            dist = dist - dist.median(1, keepdim=True).values  # (B, P)
        patch = dist.view(len(arrays), *self.grid_)  # (B, h, w)
        # The image score is the maximum of the smoothed map at the working size, as in the paper's code.
        scores = smooth_working(patch, cfg.image_size, cfg.sigma).flatten(1).max(1).values.numpy()
        return scores, smooth_maps(patch, cfg.image_size, cfg.sigma, shapes)

    def _get_state(self):
        tensors = {"mean": self.mean_, "precision": self.precision_, "channels": self.channels_}
        tensors.update({f"moments.{k}": v for k, v in self.moments_.tensors().items()})
        return tensors, {"grid": list(self.grid_), "moments_n": self.moments_.n}

    def _set_state(self, tensors, meta):
        self.mean_ = tensors["mean"].float()
        self.precision_ = tensors["precision"].float()
        self.channels_ = tensors["channels"].long()
        self.grid_ = tuple(meta["grid"])
        if self.precision_.shape[0] != self.grid_[0] * self.grid_[1]:
            raise ValueError(f"precision has {self.precision_.shape[0]} positions, grid {self.grid_} needs {self.grid_[0] * self.grid_[1]}")
        moments = {k.removeprefix("moments."): v for k, v in tensors.items() if k.startswith("moments.")}
        # absent from models saved before teaching
        self.moments_ = _Moments.from_tensors(meta["moments_n"], moments, self.mean_.shape) if moments else None


class _Moments:
    """Sums over the references of the shifted features y = x - ref at each position, all that the Gaussians
    need (``shrunk_covariance``): n, s1 = sum y (P, d), s2 = sum y y^T (P, d, d), s_aa = sum |y|^4 (P,),
    s_ax = sum |y|^2 y (P, d), s_a = sum |y|^2 (P,). Accumulated in float64; kept between fits ``packed``: float32,
    s2 as its upper triangle (P, d (d + 1) / 2)."""

    NAMES = ("ref", "s1", "s2", "s_aa", "s_ax", "s_a")

    def __init__(self, n: int, **sums: torch.Tensor):
        self.n = n
        for name in self.NAMES:
            setattr(self, name, sums[name])

    @classmethod
    def zeros(cls, ref: torch.Tensor) -> "_Moments":
        """No samples yet, shifted by ``ref`` (P, d) float64."""
        p, d = ref.shape
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        return cls(0, ref=ref, s1=z(p, d), s2=z(p, d, d), s_aa=z(p), s_ax=z(p, d), s_a=z(p))

    def add(self, x: torch.Tensor) -> None:
        """Add the features x (B, P, d) float64."""
        with single_thread():  # one small product per position: threads only add synchronisation
            y = x - self.ref  # (B, P, d)
            a = (y * y).sum(2)  # (B, P)
            self.n += y.shape[0]
            self.s1 += y.sum(0)
            yt = y.permute(1, 2, 0)  # (P, d, B)
            self.s2 += torch.bmm(yt, yt.transpose(1, 2))  # (P, d, d)
            self.s_aa += (a * a).sum(0)
            self.s_ax += (a[:, :, None] * y).sum(0)
            self.s_a += a.sum(0)

    def packed(self) -> "_Moments":
        iu = torch.triu_indices(self.s1.shape[1], self.s1.shape[1])
        sums = {k: getattr(self, k).float() for k in self.NAMES}
        return _Moments(self.n, **{**sums, "s2": self.s2[:, iu[0], iu[1]].float()})

    def unpacked(self) -> "_Moments":
        """A float64 copy, s2 whole (P, d, d): of a ``packed`` one."""
        d = self.s1.shape[1]
        iu = torch.triu_indices(d, d)
        s2 = torch.zeros(len(self.s1), d, d, dtype=torch.float64)
        s2[:, iu[0], iu[1]] = self.s2.double()
        s2[:, iu[1], iu[0]] = self.s2.double()
        return _Moments(self.n, **{k: getattr(self, k).double() for k in self.NAMES if k != "s2"}, s2=s2)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.NAMES}

    @classmethod
    def from_tensors(cls, n: int, tensors: dict[str, torch.Tensor], mean_shape) -> "_Moments":
        """The packed moments of a saved model, checked against its means (P, d)."""
        p, d = mean_shape
        shapes = {"ref": (p, d), "s1": (p, d), "s2": (p, d * (d + 1) // 2), "s_aa": (p,), "s_ax": (p, d), "s_a": (p,)}
        if type(n) is not int or n < 1:
            raise ValueError(f"moments_n must be an int >= 1, got {n!r}")
        for name, shape in shapes.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"moments.{name} is {tuple(tensors[name].shape)}, the means need {shape}")
        return cls(n, **{k: tensors[k].float() for k in cls.NAMES})
