"""``clad demo``: the whole pipeline on a built-in synthetic set, offline, in well under a minute."""
from __future__ import annotations

import json
from pathlib import Path

from clad.data import MVTecAD, make_synthetic_mvtec
from clad.evaluate import environment, evaluate
from clad.pipeline.outputs import uninterrupted
from clad.registry import create_detector


def run_demo(out: Path, detector: str = "patchcore", backbone: str | None = None, seed: int = 0) -> dict:
    """Build a synthetic MVTec-layout set, fit on its normal images, predict its test set, write a report.

    ``out`` gets data/, report/ and metrics.json, built in a staging folder and moved into place at the end, so an
    interrupted or failed demo leaves the previous ones.
    """
    from clad.pipeline import Staging
    from clad.report import write_report

    out = Path(out)
    staging = Staging(out, "demo")
    try:
        work = staging.open()
        data_root = make_synthetic_mvtec(work / "data", category="synthetic_tile", n_train=12, n_test_good=6,
                                         n_test_defect=12, size=192, seed=seed)
        train = MVTecAD(data_root, "synthetic_tile", "train")
        test = MVTecAD(data_root, "synthetic_tile", "test")
        params = {"backbone": backbone} if backbone else {}
        det = create_detector(detector, **params)
        res = evaluate(det, train, test, keep_predictions=True)
        pred = res.pop("_predictions")
        res["environment"] = environment()
        write_report(work / "report", pred["samples"], pred["result"],
                     title=f"clad demo: {det.name} on a synthetic tile set", metrics=res)
        (work / "metrics.json").write_text(json.dumps(res, indent=2, default=str))
        with uninterrupted():
            staging.publish(["data", "report", "metrics.json"])
    finally:
        staging.discard()
    print(f"demo: {det.name} fitted on {res['n_references']} normal images in {res['fit_seconds']:.1f} s; "
          f"{res['n_test']} test images at {res['predict_ms_per_image']:.0f} ms each")
    print(f"demo: image AUROC {res['image_auroc']:.3f}, pixel AUROC {res['pixel_auroc']:.3f}, AUPRO {res['aupro']:.3f}")
    print(f"demo: report -> {out / 'report' / 'index.html'}")
    return res


def fit_demo_model(out: Path, detector: str = "patchcore", backbone: str | None = None, seed: int = 0) -> dict:
    """The demo's synthetic set under ``out/data`` and a detector fitted on its normal images, saved to
    ``out/synthetic_tile`` (kept: a second call reuses both). Returns {"model": folder, "references": the normal
    images' paths, "test": the test images' paths (normal and defective)}."""
    out = Path(out)
    data_root, model = out / "data", out / "synthetic_tile"
    if not (data_root / "synthetic_tile").is_dir():
        make_synthetic_mvtec(data_root, category="synthetic_tile", n_train=12, n_test_good=6, n_test_defect=12,
                             size=192, seed=seed)
    train = MVTecAD(data_root, "synthetic_tile", "train")
    test = MVTecAD(data_root, "synthetic_tile", "test")
    if not (model / "config.json").is_file():
        params = {"backbone": backbone} if backbone else {}
        det = create_detector(detector, **params).fit([train[i].image for i in range(len(train))])
        det.save(model)
        print(f"demo: {det.name} fitted on {len(train)} normal images of a synthetic tile set -> {model}")
    return {"model": model, "references": list(train.paths), "test": list(test.paths)}
