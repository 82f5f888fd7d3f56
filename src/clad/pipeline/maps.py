"""Anomaly maps on disk: the formats of ``clad predict --maps`` and ``read_map``, which reads any of them back.

    npy      float32 ``.npy`` at the image's own size (the default; what clad always wrote)
    float16  float16 ``.npy``: half the size; each value to 2**-11 of itself (3 significant digits)
    png16    16-bit grayscale ``.png`` (zlib level 1): the map's [min, max] in 65,536 steps; min and max are kept
             exactly (as JSON numbers, which round-trip a float32) in the PNG text chunk ``clad-map``, so
             ``read_map`` gives values within (max - min) / 131,070 of the float32 map
    none     no maps

``read_map(path)`` returns the (H, W) float32 map of any of these files.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clad.errors import ImageLoadError, OutputError, SpecError

MAP_FORMATS = ("npy", "float16", "png16", "none")
SUFFIX = {"npy": ".npy", "float16": ".npy", "png16": ".png"}
PNG_KEY = "clad-map"  # the text chunk holding the value range of a png16 map
PNG_LEVELS = 65535
FLOAT16_MAX = float(np.finfo(np.float16).max)


def check_format(fmt: str) -> str:
    if fmt not in MAP_FORMATS:
        raise SpecError(f"--maps {fmt!r}: expected one of {', '.join(MAP_FORMATS)}")
    return fmt


def write_map(stem: Path, amap: np.ndarray, fmt: str) -> Path:
    """Write the (H, W) map ``amap`` as ``<stem><suffix>`` in the format ``fmt`` (not "none"); returns the file."""
    target = stem.with_name(stem.name + SUFFIX[fmt])
    amap = np.asarray(amap, np.float32)
    if fmt == "npy":
        np.save(target, amap)
    elif fmt == "float16":
        if amap.size and float(np.abs(amap).max()) > FLOAT16_MAX:
            raise OutputError(f"{target}: map values reach {float(np.abs(amap).max()):g}, beyond float16's "
                              f"{FLOAT16_MAX:g}; use --maps png16 or npy")
        np.save(target, amap.astype(np.float16))
    else:
        _write_png16(target, amap)
    return target


def quantize16(amap: np.ndarray) -> tuple[np.ndarray, float, float]:
    """A finite (H, W) map -> (uint16 levels of it between its min and max, min, max); ``dequantize16`` undoes it
    to within (max - min) / 131,070. (The station stores its maps this way too.)"""
    amap = np.asarray(amap, np.float32)
    lo, hi = (float(amap.min()), float(amap.max())) if amap.size else (0.0, 0.0)
    span = hi - lo
    if span > 0:  # in float64, so that the steps are those dequantize16 undoes
        return np.rint((amap.astype(np.float64) - lo) * (PNG_LEVELS / span)).astype(np.uint16), lo, hi
    return np.zeros(amap.shape, np.uint16), lo, hi


def dequantize16(q: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The float32 map of ``quantize16``'s levels ``q`` between ``lo`` and ``hi``."""
    return (lo + q.astype(np.float64) * ((hi - lo) / PNG_LEVELS)).astype(np.float32)


def _write_png16(target: Path, amap: np.ndarray) -> None:
    from PIL import Image, PngImagePlugin

    if amap.size and not np.isfinite(amap).all():
        raise OutputError(f"{target}: the map holds NaN or inf, which png16 cannot store; use --maps npy")
    q, lo, hi = quantize16(amap)
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps({"min": lo, "max": hi}))
    Image.fromarray(q).save(target, pnginfo=info, compress_level=1)  # level 6: ~3 % smaller, 3x the time


def read_map(path: str | Path) -> np.ndarray:
    """The (H, W) float32 anomaly map in ``path``: a ``.npy`` (float32 or float16) or a png16 ``.png`` written by
    ``clad predict --maps``. A file that is none of these is an ImageLoadError naming it."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            amap = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ImageLoadError(f"{path}: not a map written by clad ({e})") from e
        if amap.ndim != 2 or amap.dtype not in (np.float32, np.float16):
            raise ImageLoadError(f"{path}: not a map written by clad ({amap.dtype} {amap.shape}, expected a 2-D "
                                 "float32 or float16 array)")
        return amap.astype(np.float32)
    if path.suffix.lower() == ".png":
        return _read_png16(path)
    raise ImageLoadError(f"{path}: not a map written by clad (expected .npy or .png)")


def _read_png16(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            text, mode, q = dict(getattr(img, "text", {})), img.mode, np.asarray(img)
    except Exception as e:  # noqa: BLE001 - PIL's kinds for a bad file
        raise ImageLoadError(f"{path}: cannot read it ({type(e).__name__}: {e})") from e
    try:
        doc = json.loads(text[PNG_KEY])
        lo, hi = float(doc["min"]), float(doc["max"])
    except (KeyError, TypeError, ValueError) as e:
        raise ImageLoadError(f"{path}: not a png16 map written by clad (no valid {PNG_KEY!r} text chunk)") from e
    if not mode.startswith("I;16") or q.ndim != 2:
        raise ImageLoadError(f"{path}: not a png16 map written by clad (mode {mode})")
    return dequantize16(q, lo, hi)
