"""Gaussian smoothing and resizing of anomaly maps."""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from clad.ops.coreset import single_thread


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(4.0 * sigma)))  # truncate at 4 sigma, as scipy.ndimage does
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps with reflect padding."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma).to(maps)
    r = k.numel() // 2
    x = maps[:, None]  # (B, 1, H, W)
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
    return x[:, 0]


def resize_map(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (B, h, w) map stack to (B, H, W)."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def maps_to_images(maps: torch.Tensor, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """(B, h, w) working-resolution maps -> one float32 array per image at its own (H, W)."""
    return [resize_map(m[None], hw)[0].float().cpu().numpy() for m, hw in zip(maps, shapes)]


@functools.lru_cache(maxsize=64)
def _axis_operator(n_in: int, size: int, sigma: float, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix that does, along one axis: bilinear upsampling n_in -> size, Gaussian blur, bilinear
    resize size -> n_out, exactly as ``F.interpolate`` and ``gaussian_blur`` do (reflect padding, 4-sigma radius)."""
    x = torch.eye(n_in)[:, None, :]  # (n_in, 1, n_in): one impulse per input cell
    x = F.interpolate(x, size=size, mode="linear", align_corners=False)
    if sigma > 0:
        k = gaussian_kernel1d(sigma)
        r = k.numel() // 2
        x = F.conv1d(F.pad(x, (r, r), mode="reflect" if size > r else "replicate"), k.view(1, 1, -1))
    if n_out != size:
        x = F.interpolate(x, size=n_out, mode="linear", align_corners=False)
    return x[:, 0].T.contiguous()  # (n_out, n_in)


def smooth_maps(patch: torch.Tensor, size: int | tuple[int, int], sigma: float, shapes) -> list[np.ndarray]:
    """Patch scores (B, h, w) -> one map per image at its own (H, W): upsampled to the working size (size x size,
    or a (height, width)), Gaussian-blurred with ``sigma``, resized to (H, W).

    The same numbers as ``maps_to_images(gaussian_blur(interpolate(patch)), shapes)``, but the three linear,
    separable steps are folded into two small matrices per axis, so a map costs two matrix products.
    """
    h, w = patch.shape[-2:]
    size_h, size_w = (size, size) if isinstance(size, int) else size
    out = []
    with single_thread():
        for p, (H, W) in zip(patch.float().cpu(), shapes):
            a_h, a_w = _axis_operator(h, size_h, float(sigma), H), _axis_operator(w, size_w, float(sigma), W)
            out.append((a_h @ p @ a_w.T).numpy())  # (H, W)
    return out


def smooth_working(patch: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Patch scores (B, h, w) -> (B, size, size): upsampled and Gaussian-blurred, as ``gaussian_blur(resize_map)``,
    by two small matrix products per map (see ``smooth_maps``)."""
    h, w = patch.shape[-2:]
    a_h, a_w = _axis_operator(h, size, float(sigma), size), _axis_operator(w, size, float(sigma), size)
    return a_h @ patch.float().cpu() @ a_w.T
