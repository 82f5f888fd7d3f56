"""Image corruptions for robustness benchmarks (in the style of MVTec-C / ImageNet-C), applied to test images only.

Seven corruptions, each at severities 1-3 (severity 0, or the name ``none``, is the identity): ``gaussian_noise``,
``blur``, ``brightness``, ``contrast``, ``jpeg``, ``rotate``, ``translate``. Every random choice (the noise, the sign
of a shift, the direction of a rotation or translation) comes from a seed, so a corrupted set is the same on every
run. The geometric ones move the defect mask with the image (nearest interpolation; the part of the mask that the
move uncovers is normal) and fill the image's uncovered border by reflection. Sizes are relative to the image's
shorter side, so a severity means the same on a 900 px bottle and a 250 px tile.
"""
from __future__ import annotations

import io
import zlib
from dataclasses import replace
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

from clad.errors import SpecError

# the parameter of each corruption at severities 1, 2, 3
LEVELS: dict[str, tuple[float, float, float]] = {
    "gaussian_noise": (0.03, 0.06, 0.10),  # noise std, fraction of 255
    "blur": (0.003, 0.006, 0.010),  # Gaussian std, fraction of the shorter side
    "brightness": (0.08, 0.16, 0.25),  # added or subtracted (random sign), fraction of 255
    "contrast": (0.8, 0.65, 0.5),  # factor around the image's mean grey
    "jpeg": (40, 20, 10),  # JPEG quality
    "rotate": (2.0, 5.0, 10.0),  # degrees, random direction
    "translate": (0.02, 0.04, 0.08),  # shift, fraction of the shorter side, random direction
}
CORRUPTIONS: tuple[str, ...] = tuple(LEVELS)
SEVERITIES = (1, 2, 3)


def parse_corruptions(text: str) -> list[tuple[str, int]]:
    """``gaussian_noise:1,2,3,blur,jpeg:2`` or ``all`` -> [(name, severity), ...]; a bare name means severities
    1-3, and the severities after ``name:`` go on until the next name. An unknown name or severity is an error."""
    out: list[tuple[str, int]] = []
    name = None
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item == "all":
            out += [(c, s) for c in CORRUPTIONS for s in SEVERITIES]
            name = None
            continue
        head, colon, level = item.partition(":")
        if head.isdigit() and not colon:
            if name is None:
                raise SpecError(f"--corruptions: severity {item!r} follows no corruption name")
            head, level = name, item
        elif head not in LEVELS:
            raise SpecError(f"--corruptions: unknown corruption {head!r}; known: {', '.join(CORRUPTIONS)}, all")
        name = head
        if not level:
            out += [(head, s) for s in SEVERITIES]
            continue
        if not level.isdigit() or int(level) not in SEVERITIES:
            raise SpecError(f"--corruptions: severity {level!r} of {head!r} is not one of {SEVERITIES}")
        out.append((head, int(level)))
    return list(dict.fromkeys(out))


def corrupt(image: np.ndarray, mask: np.ndarray | None = None, name: str = "none", severity: int = 0,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """``image`` ((H, W, 3) uint8) and its ``mask`` ((H, W) bool, or None) under one corruption at ``severity``.

    Returns new arrays of the same shapes and dtypes (the inputs themselves for ``none`` / severity 0). The mask
    changes only under the geometric corruptions.
    """
    if name == "none" or severity == 0:
        return image, mask
    if name not in LEVELS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity of {name!r} must be 0 or one of {SEVERITIES}, got {severity!r}")
    level = LEVELS[name][severity - 1]
    rng = np.random.default_rng(seed)
    short = min(image.shape[:2])
    if name == "gaussian_noise":
        return _clip(image + rng.normal(0.0, level * 255.0, image.shape)), mask
    if name == "brightness":
        return _clip(image + rng.choice((-1.0, 1.0)) * level * 255.0), mask
    if name == "contrast":
        grey = image.astype(np.float32).mean()
        return _clip((image - grey) * level + grey), mask
    if name == "blur":
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(level * short))), mask
    if name == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=int(level))
        return np.asarray(Image.open(buf).convert("RGB")), mask
    if name == "rotate":
        return _move(image, mask, angle=float(rng.choice((-1.0, 1.0))) * level, shift=(0.0, 0.0))
    direction = rng.uniform(0.0, 2.0 * np.pi)  # translate
    return _move(image, mask, angle=0.0, shift=(level * short * np.cos(direction), level * short * np.sin(direction)))


def corrupt_samples(samples: Sequence, name: str, severity: int, seed: int = 0) -> list:
    """``Sample``s (or anything with ``image``, ``mask`` and ``path``) corrupted one by one; each image's seed is
    drawn from ``seed`` and its path, so a sample is corrupted the same way whatever the order of the list."""
    return [replace(s, **dict(zip(("image", "mask"), corrupt(s.image, s.mask, name, severity,
                                                           _image_seed(seed, name, severity, s.path)))))
            for s in samples]


def _image_seed(seed: int, name: str, severity: int, path: str) -> int:
    return zlib.crc32(f"{seed}|{name}|{severity}|{path}".encode())


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _move(image: np.ndarray, mask: np.ndarray | None, angle: float, shift: tuple[float, float]):
    """Rotate by ``angle`` degrees (counter-clockwise) about the centre and shift by (dx, dy) pixels; the image's
    uncovered border is its reflection (padded before the move, cropped after), the mask's is normal."""
    h, w = image.shape[:2]
    pad = int(np.ceil(0.25 * max(h, w) + np.hypot(*shift)))
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    moved = Image.fromarray(padded).rotate(angle, resample=Image.BILINEAR, translate=shift)
    out = np.asarray(moved)[pad:pad + h, pad:pad + w].copy()
    if mask is None:
        return out, None
    m = Image.fromarray(mask.astype(np.uint8) * 255).rotate(angle, resample=Image.NEAREST, translate=shift,
                                                           fillcolor=0)
    return out, np.asarray(m) > 127


# The reference jitter's fixed distribution (it does not know any test corruption): each variant draws each of
# these independently, applied with probability 1/2, at a strength uniform in the range.
JITTER = {
    "brightness": (-0.2, 0.2),  # added, fraction of 255
    "contrast": (0.6, 1.2),  # factor around the mean grey
    "blur": (0.0, 0.01),  # Gaussian std, fraction of the shorter side
    "gaussian_noise": (0.0, 0.1),  # noise std, fraction of 255
}


def jittered_copies(images: Sequence[np.ndarray], copies: int, seed: int, first: int = 0) -> list[np.ndarray]:
    """``copies`` photometric variants of each (H, W, 3) uint8 image (brightness, contrast, blur, noise drawn from
    ``JITTER``), image-major. Image ``i`` of the list is reference ``first + i``: its draws depend on ``seed`` and
    that number only, so a detector taught its references a few at a time jitters each as one fit on all of them
    would. For detectors that add the copies to their normal references."""
    out = []
    for i, image in enumerate(images):
        rng = np.random.default_rng((seed, first + i))
        for _ in range(copies):
            x = image.astype(np.float32)
            short = min(image.shape[:2])
            if rng.random() < 0.5:
                x = x + rng.uniform(*JITTER["brightness"]) * 255.0
            if rng.random() < 0.5:
                grey = x.mean()
                x = (x - grey) * rng.uniform(*JITTER["contrast"]) + grey
            x = _clip(x)
            if rng.random() < 0.5:
                radius = rng.uniform(*JITTER["blur"]) * short
                x = np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius)))
            if rng.random() < 0.5:
                x = _clip(x + rng.normal(0.0, rng.uniform(*JITTER["gaussian_noise"]) * 255.0, x.shape))
            out.append(x)
    return out
