"""Robust image and mask reading: any mode and bit depth in, RGB uint8 (or bool mask) out."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from clad.errors import ImageLoadError
from clad.types import ImageLike

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")  # PIL's names of the formats of IMAGE_SUFFIXES
# Refuse decompression bombs with a clear error instead of PIL's warning; 16k x 16k is far above any camera here.
MAX_PIXELS = 16384 * 16384
# A side longer than JPEG's and WebP's limit is no camera image: a few bytes of TIFF header can declare 5 x 8.7M.
MAX_SIDE = 65535


def is_image_file(path: Path) -> bool:
    """A visible file with an image extension; a symbolic link that leads nowhere counts (so that reading it fails
    with its reason instead of the file going missing without a word)."""
    return ((path.is_file() or path.is_symlink()) and path.suffix.lower() in IMAGE_SUFFIXES
            and not path.name.startswith("."))


def _open(path: Path) -> Image.Image:
    if not path.exists():
        if path.is_symlink():
            raise ImageLoadError(f"{path}: dangling symbolic link or link loop (to {os.readlink(path)})")
        raise ImageLoadError(f"{path}: no such file")
    if not path.is_file() and not path.is_dir():
        raise ImageLoadError(f"{path}: not a regular file")  # a FIFO or device would block or never end
    if path.is_dir():
        raise ImageLoadError(f"{path}: is a folder, not an image")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"{path}: empty file")
    return _decode(path, str(path))


def _decode(source, label: str, formats: Sequence[str] | None = None) -> Image.Image:
    """Open and fully decode ``source`` (a path or a binary file object) with PIL; errors name ``label``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source, formats=formats)
            try:
                if img.width * img.height > MAX_PIXELS or max(img.size) > MAX_SIDE:
                    raise ImageLoadError(f"{label}: image too large ({img.width}x{img.height} pixels)")
                img.load()  # decode now, so truncated data fails here and names the file
            except BaseException:
                img.close()  # don't leak the file handle of a bad image
                raise
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"{label}: image too large ({e})") from e
    except Image.UnidentifiedImageError as e:
        if not formats:
            raise ImageLoadError(f"{label}: cannot read image ({type(e).__name__}: {e})") from e
        raise ImageLoadError(f"{label}: not an image in a supported format ({', '.join(formats)})") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for corrupt data
        raise ImageLoadError(f"{label}: cannot read image ({type(e).__name__}: {e})") from e
    return img


def _deep_gray_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit grayscale (H, W) -> uint8 on a fixed scale, so every image of a set maps its values alike.

    Stretching each image to its own min/max would make the same surface look different in a reference and in a
    test image (e.g. a bright defect darkens everything else); that is only the fallback for unknown ranges.
    """
    a[~np.isfinite(a)] = 0.0  # NaN / inf pixels of float images count as black; in place: large images are common
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and 255 < hi <= 65535):
        a /= 257.0  # full 16-bit range -> 0..255
    elif mode == "F" and lo >= 0 and hi <= 1.0:
        a *= 255.0
    elif lo < 0 or hi > 255:
        if hi > lo:
            a -= lo
            a *= 255.0 / (hi - lo)
        else:
            a[:] = 0.0
    return np.clip(np.round(a, out=a), 0, 255, out=a).astype(np.uint8)


def _to_rgb(img: Image.Image) -> np.ndarray:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # float32 holds 16-bit values exactly (and x / 257 is never within float32's error of a rounding tie)
        a = _deep_gray_to_uint8(np.array(img, dtype=np.float32 if img.mode.startswith("I;16") else np.float64),
                                img.mode)
        return np.repeat(a[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB, whatever its mode, bit depth or EXIF orientation.

    Raises ImageLoadError naming the file when it is missing, empty, truncated, corrupt or too large.
    """
    path = Path(path)
    return _checked_rgb(_open(path), path)


def _checked_rgb(img: Image.Image, name) -> np.ndarray:
    """An opened image as (H, W, 3) uint8 RGB, or an ImageLoadError naming ``name``."""
    try:
        arr = _to_rgb(img)
    except Exception as e:
        raise ImageLoadError(f"{name}: cannot convert image mode {img.mode!r} to RGB ({e})") from e
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageLoadError(f"{name}: image has zero size")
    return arr


def decode_image(data: bytes, name: str = "upload") -> tuple[np.ndarray, str]:
    """Decode image bytes (e.g. an upload) as (H, W, 3) uint8 RGB, as ``load_image`` decodes a file; returns the
    array and the format's name ("PNG", "JPEG", ...). Only ``UPLOAD_FORMATS`` are tried, so bytes from outside are
    never handed to PIL's other decoders (some run external programs). Raises ImageLoadError naming ``name``."""
    if not data:
        raise ImageLoadError(f"{name}: empty file")
    img = _decode(io.BytesIO(data), name, UPLOAD_FORMATS)
    return _checked_rgb(img, name), img.format


def load_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask as (H, W) bool, defective where the value is > 0.

    When ``shape`` (H, W) is given, a mask of another size is an error naming both sizes.
    """
    path = Path(path)
    img = ImageOps.exif_transpose(_open(path))
    a = np.asarray(img)
    if a.ndim == 3:
        a = a[..., :3].max(axis=2) if a.shape[2] >= 3 else a[..., 0]
    mask = a > 0
    if shape is not None and mask.shape != tuple(shape):
        raise ImageLoadError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]}"
        )
    return mask


def as_rgb(image: ImageLike) -> np.ndarray:
    """Any accepted image input -> (H, W, 3) uint8 RGB array."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ImageLoadError(f"image array has shape {a.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.dtype != np.uint8:
        if a.dtype == bool:
            a = a * 255.0
        elif np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0
        elif a.dtype == np.uint16:
            a = a / 257.0
        a = np.clip(np.round(np.nan_to_num(a)), 0, 255).astype(np.uint8)
    if a.shape[2] == 4:
        # composite on black, as load_image does for an RGBA file, so a path and its array give the same pixels
        alpha = a[..., 3:].astype(np.float32) / 255.0
        a = np.round(a[..., :3] * alpha).astype(np.uint8)
    return np.ascontiguousarray(a)


def load_batch(images: Sequence[ImageLike]) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Decode images once: their (H, W, 3) uint8 RGB arrays and their (H, W)."""
    arrays = [as_rgb(im) for im in images]
    return arrays, [a.shape[:2] for a in arrays]
