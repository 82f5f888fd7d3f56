"""Pinned scores and maps of every registered detector on the contract's synthetic data.

Refactors must not move a number: each detector is fitted and run as in ``test_contract.py`` (tiny models), and
the built-in patch detectors once more on the real default backbone (EfficientNet-Lite0), and compared to the
values stored in ``pins/pins.npz`` to float tolerance. Regenerate only for an intended change of results:
``python tests/test_pins.py`` (and say why in the commit).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import clad
from conftest import plant_square, texture

PINS = Path(__file__).parent / "pins" / "pins.npz"
# (case name, detector, parameters; "{clip}" is replaced by the tiny CLIP folder)
CASES = [
    ("patchcore", "patchcore", {"backbone": "tiny_cnn", "image_size": 64}),
    ("padim", "padim", {"backbone": "tiny_cnn", "image_size": 64}),
    ("spade", "spade", {"backbone": "tiny_cnn", "image_size": 64}),
    ("patch_knn", "patch_knn", {"backbone": "tiny_cnn", "image_size": 64}),
    ("winclip", "winclip", {"backbone": "clip:{clip}"}),
    ("clad", "clad", {"backbone": "tiny_cnn", "image_size": 64, "text_encoder": "clip:{clip}", "epochs": 2}),
    ("clad_plus", "clad_plus", {"backbone": "tiny_cnn", "image_size": 64, "text_encoder": "clip:{clip}", "epochs": 2}),
    ("patchcore_lite0", "patchcore", {}),
    ("padim_lite0", "padim", {}),
    ("spade_lite0", "spade", {}),
    ("patch_knn_lite0", "patch_knn", {}),
]


def _images():
    refs = [texture((64, 64), s) for s in range(3)]
    odd, _ = plant_square(texture((48, 80), 9), 10, 30, 12)
    tests = [texture((64, 64), 7), odd, texture((70, 50), 8)]
    return refs, tests


def _run(detector: str, params: dict, clip_dir: Path):
    params = {k: (v.format(clip=clip_dir) if isinstance(v, str) else v) for k, v in params.items()}
    refs, tests = _images()
    res = clad.create_detector(detector, **params).fit(refs).predict(tests)
    return res.scores, res.anomaly_maps


def test_every_detector_is_pinned():
    pinned = {name.split("/")[0] for name in np.load(PINS).files}
    assert set(clad.list_detectors()) <= pinned, "a registered detector has no pinned values: regenerate the pins"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_scores_and_maps_are_pinned(case, tiny_clip_dir):
    name, detector, params = case
    pins = np.load(PINS)
    scores, maps = _run(detector, params, tiny_clip_dir)
    np.testing.assert_allclose(scores, pins[f"{name}/scores"], rtol=1e-4, atol=1e-6)
    for i, m in enumerate(maps):
        ref = pins[f"{name}/map{i}"]
        assert m.shape == ref.shape
        np.testing.assert_allclose(m, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max() + 1e-12))


if __name__ == "__main__":  # regenerate
    import tempfile

    from clad.backbones.clip import build_random_clip

    sys.path.insert(0, str(Path(__file__).parent))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        clip_dir = build_random_clip(Path(tmp) / "tiny_clip")
        for name, detector, params in CASES:
            scores, maps = _run(detector, params, clip_dir)
            out[f"{name}/scores"] = np.asarray(scores, np.float32)
            for i, m in enumerate(maps):
                out[f"{name}/map{i}"] = np.asarray(m, np.float32)
            print(name, scores)
    PINS.parent.mkdir(exist_ok=True)
    np.savez_compressed(PINS, **out)
    print(f"wrote {PINS}")
