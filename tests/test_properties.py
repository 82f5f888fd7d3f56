"""Property tests (hypothesis): the image loader, the metrics and the saved-model round trip."""
from __future__ import annotations

import dataclasses
import io
import math
import typing
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

import clad
from clad import metrics
from clad.data.io import load_image
from clad.detectors.base import parse_interval
from clad.errors import ImageLoadError
from conftest import texture
from test_metrics import _sklearn_f1_max

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------------------------------------- image loader

_MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16", "LA", "PA", "RGBX"]
_FORMATS = ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM", "TGA", "ICO", "JPEG2000"]


def _writable() -> list[tuple[str, str]]:
    """(mode, format) pairs this PIL can write."""
    pairs = []
    probe = Image.new("RGB", (3, 2), (10, 200, 30))
    for mode in _MODES:
        try:
            img = probe.convert(mode)
        except ValueError:
            continue
        for fmt in _FORMATS:
            try:
                img.save(io.BytesIO(), format=fmt)
            except (OSError, ValueError, KeyError):
                continue
            pairs.append((mode, fmt))
    return pairs


WRITABLE = _writable()


def _encoded(pixels: np.ndarray, mode: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def test_every_mode_and_format_pil_writes_loads(tmp_path):
    assert len(WRITABLE) > 40  # the probe itself works
    for mode, fmt in WRITABLE:
        path = tmp_path / f"{mode.replace(';', '_')}.{fmt.lower()}"
        path.write_bytes(_encoded(texture((7, 9), 0), mode, fmt))
        assert load_image(path).shape == (7, 9, 3), (mode, fmt)


@FAST
@given(pair=st.sampled_from(WRITABLE), pixels=arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24),
                                                                           st.just(3))))
def test_any_image_pil_writes_loads_as_rgb_uint8(tmp_path, pair, pixels):
    mode, fmt = pair
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(_encoded(pixels, mode, fmt))
    with Image.open(path) as img:
        width, height = img.size  # ICO and JPEG2000 may store another size than was written
    a = load_image(path)
    assert a.dtype == np.uint8 and a.shape == (height, width, 3)


def _load_bytes(tmp_path, data: bytes) -> None:
    path = tmp_path / "fuzz.png"
    path.write_bytes(data)
    try:
        a = load_image(path)
    except ImageLoadError as e:
        assert str(path) in str(e)
    else:
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and a.shape[0] * a.shape[1] > 0


@FAST
@given(data=st.binary(max_size=512))
def test_garbage_bytes_load_or_raise_image_load_error(tmp_path, data):
    _load_bytes(tmp_path, data)


@FAST
@given(pair=st.sampled_from(WRITABLE), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8))
def test_damaged_image_bytes_load_or_raise_image_load_error(tmp_path, pair, cut, flips):
    data = bytearray(_encoded(texture((16, 16), 0), *pair))
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns about some damaged files before failing or loading them
        _load_bytes(tmp_path, bytes(data[: max(1, int(cut * len(data)))]))


# --------------------------------------------------------------------------------------------------- metrics

_labels = st.lists(st.booleans(), min_size=2, max_size=40).filter(lambda y: 0 < sum(y) < len(y))


@st.composite
def _scored(draw, ties: bool = True):
    """(labels (B,) with both classes, scores (B,)): small integers (many ties) or floats."""
    y = np.array(draw(_labels))
    elem = st.integers(-5, 5) if ties and draw(st.booleans()) else st.floats(-1e3, 1e3, allow_nan=False)
    s = np.array(draw(st.lists(elem, min_size=len(y), max_size=len(y))), np.float64)
    return y, s


@FAST
@given(_scored())
def test_image_metrics_agree_with_sklearn(ys):
    y, s = ys
    assert metrics.image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert metrics.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert metrics.f1_max(y, s)[0] == pytest.approx(_sklearn_f1_max(y, s), abs=1e-12)


_MONOTONE = {
    "affine": lambda s: 3.0 * s + 7.0,
    "cube": lambda s: s**3 + s,
    "arctan": lambda s: np.arctan(s / 5.0),
    "rank": lambda s: np.unique(s, return_inverse=True)[1].astype(float),
}


@FAST
@given(ys=_scored(), name=st.sampled_from(sorted(_MONOTONE)))
def test_image_metrics_are_invariant_to_monotone_transforms(ys, name):
    y, s = ys
    s = np.round(s)  # integers: the transforms keep distinct values distinct and ties tied
    t = _MONOTONE[name](s)
    assert metrics.image_auroc(y, t) == pytest.approx(metrics.image_auroc(y, s), abs=1e-12)
    assert metrics.average_precision(y, t) == pytest.approx(metrics.average_precision(y, s), abs=1e-12)
    assert metrics.f1_max(y, t)[0] == pytest.approx(metrics.f1_max(y, s)[0], abs=1e-12)
    assert metrics.image_auroc(y, -s) == pytest.approx(1.0 - metrics.image_auroc(y, s), abs=1e-12)


@FAST
@given(y=st.lists(st.booleans(), min_size=1, max_size=30), data=st.data())
def test_image_metrics_are_bounded_or_nan(y, data):
    s = data.draw(st.lists(st.floats(-1e6, 1e6), min_size=len(y), max_size=len(y)))
    auroc, ap, (f1, _) = metrics.image_auroc(y, s), metrics.average_precision(y, s), metrics.f1_max(y, s)
    both = 0 < sum(y) < len(y)
    assert (0.0 <= auroc <= 1.0) if both else math.isnan(auroc)
    assert (0.0 < ap <= 1.0) if any(y) else math.isnan(ap)
    assert (0.0 < f1 <= 1.0) if any(y) else math.isnan(f1)


@st.composite
def _pixel_set(draw):
    """masks and float32 maps of 1-3 images of their own sizes, with some anomalous and some normal pixels."""
    n = draw(st.integers(1, 3))
    masks, maps = [], []
    for _ in range(n):
        shape = (draw(st.integers(2, 8)), draw(st.integers(2, 8)))
        masks.append(draw(arrays(np.bool_, shape)))
        maps.append(draw(arrays(np.float32, shape, elements=st.integers(0, 6).map(float))))
    masks[0].flat[0], masks[-1].flat[-1] = True, False  # both classes, on distinct pixels (>= 4 per image)
    return masks, maps


@FAST
@given(_pixel_set(), st.floats(0.01, 1.0))
def test_pixel_metrics_bounds_and_sklearn(pixels, fpr_limit):
    masks, maps = pixels
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in maps])
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert 0.0 <= metrics.aupro(masks, maps, fpr_limit) <= 1.0 + 1e-12
    perfect = [m.astype(np.float32) for m in masks]
    assert metrics.aupro(masks, perfect, fpr_limit) == pytest.approx(1.0)
    shifted = [np.arctan(a) * 2 + 1 for a in maps]  # monotone: same curve
    assert metrics.aupro(masks, shifted, fpr_limit) == pytest.approx(metrics.aupro(masks, maps, fpr_limit), abs=1e-9)


# ------------------------------------------------------------------------------------------ config round trip

# Fields left at their defaults (names that must match the backbone) and the largest value drawn for the rest,
# so that each example fits in a blink.
_KEEP = {"backbone", "layers", "grid_layer", "global_layer"}
_CAP = {"image_size": 32, "batch_size": 4, "max_bank": 5000, "neighbourhood": 5, "n_features": 64, "sigma": 6.0,
        "eps": 10.0, "n_probe": 4, "probe_min": 64, "workers": 3, "zoom": 2.0}
# Fields whose valid values are a list, not a range.
_CHOICES = {"resize": ("squeeze", "keep"), "tile": (None, 128, 256), "coreset_of": ("bank", "references")}


def _field_strategy(f, tp):
    """Valid values of a config field, from its annotation and its ``range`` metadata."""
    if f.name in _CHOICES:
        return st.sampled_from(_CHOICES[f.name])
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return st.none() | _field_strategy(f, inner)
    lo, hi, lo_open, _ = parse_interval(f.metadata.get("range", "[0, inf)"))
    hi = min(hi, _CAP.get(f.name, 2**31 - 1 if f.name == "seed" else lo + 8))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(int(math.floor(lo)) + lo_open, int(hi))
    if tp is float:
        return st.floats(lo, hi, exclude_min=lo_open) | st.integers(int(math.ceil(lo + lo_open)), int(hi))
    raise NotImplementedError(f"no strategy for {f.name}: {tp}")


@st.composite
def _detector_params(draw, name: str) -> dict:
    cls = clad.registry.detector_class(name)
    hints = typing.get_type_hints(cls.Config)
    params = {"backbone": "tiny_cnn"}
    for f in dataclasses.fields(cls.Config):
        if f.name not in _KEEP and draw(st.booleans()):
            params[f.name] = draw(_field_strategy(f, hints[f.name]))
    if params.get("resize", "squeeze") == "squeeze":  # zoom and tile apply to resize=keep only
        params.pop("zoom", None), params.pop("tile", None)
    return params


@pytest.mark.parametrize("name", ["patch_knn", "patchcore", "padim", "spade"])
def test_config_round_trip(tmp_path_factory, name):
    refs, tests = [texture((24, 32), s) for s in range(2)], [texture((20, 28), 5)]

    @settings(max_examples=4, deadline=None)
    @given(params=_detector_params(name), threshold=st.none() | st.floats(-1e3, 1e3))
    def round_trip(params, threshold):
        det = clad.create_detector(name, **params).fit(refs).set_threshold(threshold)
        before = det.predict(tests)
        loaded = clad.load_detector(det.save(tmp_path_factory.mktemp("m")))
        assert loaded.config == det.config and loaded.threshold_ == det.threshold_
        after = loaded.predict(tests)
        np.testing.assert_array_equal(before.scores, after.scores)
        np.testing.assert_array_equal(before.anomaly_maps[0], after.anomaly_maps[0])

    round_trip()
