"""The ``clad`` command: fit, predict, eval, demo (and bench, report as they land)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from clad.metrics_catalog import eval_rows
from clad.specs import parse_shot

DEFAULT_DETECTOR = "patchcore"


def _build_detector(args, category: str | None = None):
    """The detector named by ``--detector`` with ``--param``, ``--backbone``, ``--seed`` and ``--aux``."""
    from clad.registry import create_detector
    from clad.specs import detector_params, parse_params

    params = parse_params(args.param)
    if getattr(args, "backbone", None):
        params["backbone"] = args.backbone
    params = detector_params(args.detector, params, seed=args.seed, category=category, aux=getattr(args, "aux", None))
    return create_detector(args.detector, **params)


def _add_detector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detector", default=DEFAULT_DETECTOR, help=f"registry name (default {DEFAULT_DETECTOR}); see `clad list`")
    p.add_argument("--backbone", help="backbone spec, e.g. efficientnet_lite0, tiny_cnn, clip:/path/to/hf_clip_folder")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="detector parameter (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed for the choice of references and the detector (default 0)")
    p.add_argument("--aux", metavar="SPEC", help="CLAD: labelled defects of other categories to train on too, "
                   "e.g. mvtec:ROOT (the evaluated --category is always left out)")


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help="mvtec:ROOT, visa:ROOT or folder:GOOD_DIR[,DEFECT_DIR[,MASK_DIR]]")
    p.add_argument("--category", help="dataset category (e.g. bottle); not needed for folder:")
    p.add_argument("--shots", default="all", help="number of normal references from train/good, or 'all' (default)")


# -- fit ------------------------------------------------------------------------------------------------------
def cmd_fit(args) -> int:
    from clad.data import open_dataset
    from clad.evaluate import load_split

    train = open_dataset(args.data, args.category, "train", n_shots=parse_shot(args.shots), seed=args.seed)
    samples, failures = load_split(train, desc="loading references")
    for f in failures:
        print(f"skipped {f['path']}: {f['error']}", file=sys.stderr)
    det = _build_detector(args, args.category)
    t0 = time.perf_counter()
    det.fit([s.image for s in samples])
    if args.threshold is not None:
        det.set_threshold(args.threshold)
    out = det.save(args.out)
    print(f"fitted {det.name} on {len(samples)} reference image(s) in {time.perf_counter() - t0:.1f} s -> {out}")
    print(f"  threshold {det.threshold_:.6g} (from the {det.threshold_source_}; normalised scores put it at 0.5)")
    return 0


# -- predict --------------------------------------------------------------------------------------------------
def cmd_predict(args) -> int:
    from clad.detectors.base import load_detector
    from clad.pipeline import (ErrorLog, ErrorsCSV, ExplanationsJSON, HTMLReport, MapsNpy, Pipeline, PredictionsCSV,
                               open_source)

    det = load_detector(args.model)
    if args.threshold is not None:
        det.set_threshold(args.threshold)
    source = open_source(args.input)
    out = Path(args.out)
    sinks = [PredictionsCSV(out / "predictions.csv", labels=det.threshold_ is not None), ErrorsCSV(out / "errors.csv"),
             ErrorLog(), MapsNpy(out / "maps")]
    if args.explain:
        sinks.append(ExplanationsJSON(out / "explanations.json"))
    report = None
    if args.report:
        report = HTMLReport(args.report, title=f"clad predict: {det.name} on {args.input}", threshold=det.threshold_)
        sinks.append(report)
    summary = Pipeline(det, sinks, batch_size=args.batch_size, explainer=_explainer(det, args), progress=True).run(source)
    print(f"{summary.n_scored} image(s) scored, {summary.n_skipped} skipped -> {out / 'predictions.csv'}, maps in {out / 'maps'}")
    if args.explain:
        print(f"explanations -> {out / 'explanations.json'}")
    if report is not None and report.page is not None:
        print(f"report -> {report.page}")
    return 0 if summary.n_scored else 1


def _explainer(det, args):
    """The Explainer of ``predict --explain / --report`` (None when neither is asked for)."""
    if not (args.explain or args.report):
        return None
    from clad.explain import Catalogue, Explainer

    catalogue = Catalogue.from_folder(args.catalogue) if args.catalogue else None
    return Explainer(det, catalogue=catalogue, pixel_threshold=args.pixel_threshold).fit()


# -- eval -----------------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from clad.data import open_dataset
    from clad.evaluate import environment, evaluate

    shots = parse_shot(args.shots)
    train = open_dataset(args.data, args.category, "train", n_shots=shots, seed=args.seed)
    test = open_dataset(args.data, args.category, "test")
    det = _build_detector(args, args.category)
    res = evaluate(det, train, test, batch_size=args.batch_size, pixel_eval_size=args.pixel_eval_size,
                   keep_predictions=args.explain)
    pred = res.pop("_predictions", None)
    res.update(data=args.data, category=args.category, shots=shots or "all", seed=args.seed, environment=environment())
    name = f"{args.category or 'folder'} | {det.name} | shots={shots or 'all'} seed={args.seed}"
    print(name)
    for label, key in eval_rows():  # every figure declared in clad.metrics_catalog
        v = res.get(key)
        print(f"  {label:<22} {v:.4f}" if isinstance(v, float) else f"  {label:<22} {v}")
    print(f"  IoU threshold          {res.get('iou_threshold', float('nan')):.4g} ({res.get('iou_threshold_source')})")
    if args.explain:
        from clad.explain import Catalogue
        from clad.explain.quality import evaluate_naming, format_naming, held_out_normals

        normals = held_out_normals(open_dataset(args.data, args.category, "train"), train, seed=args.seed)
        res["explain"] = evaluate_naming(
            det, pred["samples"], pred["result"], catalogue_shots=args.catalogue_shots, seed=args.seed,
            catalogue=Catalogue.from_folder(args.catalogue) if args.catalogue else None, normal_images=normals or None)
        print("  defect type named by the explanations:\n" + format_naming(res["explain"]))
    for f in res["failures"]:
        print(f"  skipped {f['path']}: {f['error']}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2, default=_json_default))
        print(f"  written {args.out}")
    return 0


def cmd_report(args) -> int:
    from clad.data import open_dataset
    from clad.evaluate import EvalSink, fit_references
    from clad.explain import Catalogue, Explainer
    from clad.explain.quality import held_out_normals
    from clad.pipeline import HTMLReport, Pipeline, from_dataset

    shots = parse_shot(args.shots)
    train = open_dataset(args.data, args.category, "train", n_shots=shots, seed=args.seed)
    test = open_dataset(args.data, args.category, "test")
    det = _build_detector(args, args.category)
    refs, fit_s, _ = fit_references(det, train)
    normals = held_out_normals(open_dataset(args.data, args.category, "train"), train, seed=args.seed)
    types = sorted({t for t, y in zip(test.defect_types, test.labels) if y}) or None
    catalogue = Catalogue.from_folder(args.catalogue) if args.catalogue else None
    explainer = Explainer(det, catalogue=catalogue, defect_types=types).fit(refs, normals or None)
    title = f"{args.category or 'folder'} | {det.name} | shots={shots or 'all'} seed={args.seed}"
    scored = EvalSink(args.pixel_eval_size)
    report = HTMLReport(args.out, title=title, threshold=det.threshold_, references=refs, metrics=lambda: dict(
        scored.metrics, fit_seconds=fit_s, predict_ms_per_image=scored.predict_ms_per_image))
    Pipeline(det, [scored, report], batch_size=args.batch_size, explainer=explainer, progress=True).run(from_dataset(test))
    print(f"report -> {report.page}")
    return 0


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


# -- demo -----------------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from clad.demo import run_demo

    run_demo(Path(args.out), detector=args.detector, backbone=args.backbone)
    return 0


def cmd_list(args) -> int:
    from clad.registry import list_backbones, list_detectors

    print("detectors:", ", ".join(list_detectors()))
    print("backbones:", ", ".join(list_backbones()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clad", description="Industrial visual anomaly detection and localization.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit a detector on normal reference images and save it")
    _add_data_args(p)
    _add_detector_args(p)
    p.add_argument("--threshold", type=float, help="decision threshold on the score, saved with the model")
    p.add_argument("--out", required=True, help="folder to save the model in (config.json + model.safetensors)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("predict", help="score images with a saved model; write scores and anomaly maps")
    p.add_argument("--model", required=True, help="folder written by `clad fit`")
    p.add_argument("--input", required=True, help="an image, a folder of images (searched recursively) or a CSV file with a path column")
    p.add_argument("--out", required=True, help="output folder: predictions.csv, errors.csv, maps/**/*.npy")
    p.add_argument("--threshold", type=float, help="label images whose score is above this")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--explain", action="store_true", help="also write explanations.json (regions, defect types, a sentence per image)")
    p.add_argument("--report", metavar="DIR", help="also write an HTML report (index.html + PNGs) to DIR")
    p.add_argument("--catalogue", metavar="DIR", help="defect catalogue for the explanations: DIR/<type>/<image> + mask")
    p.add_argument("--pixel-threshold", type=float, help="map threshold for explained regions (default: the model's "
                   "threshold when its score is the map maximum, else the 99.5th percentile of each batch's maps)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval", help="fit on references and measure on a labelled test split")
    _add_data_args(p)
    _add_detector_args(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--pixel-eval-size", type=int, default=256, help="longer side for pixel metrics (0 = native)")
    p.add_argument("--out", help="write every figure with its settings to this JSON file")
    p.add_argument("--explain", action="store_true", help="also measure how often explanations name the right defect type")
    p.add_argument("--catalogue", metavar="DIR", help="defect catalogue for --explain: DIR/<type>/<image> + mask")
    p.add_argument("--catalogue-shots", type=int, metavar="N", help="--explain: take N seeded examples per defect type "
                   "out of the test set as the catalogue and measure naming on the rest")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="fit on references, predict and explain a labelled test split, write an HTML report")
    _add_data_args(p)
    _add_detector_args(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--pixel-eval-size", type=int, default=256, help="longer side for pixel metrics (0 = native)")
    p.add_argument("--catalogue", metavar="DIR", help="defect catalogue for the explanations: DIR/<type>/<image> + mask")
    p.add_argument("--out", required=True, help="report folder (index.html + PNGs)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="run the whole pipeline on a built-in synthetic set, offline")
    p.add_argument("--out", default="clad_demo", help="report folder (default ./clad_demo)")
    p.add_argument("--detector", default=DEFAULT_DETECTOR)
    p.add_argument("--backbone", default=None, help="default: the detector's own (efficientnet_lite0)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("list", help="list the registered detectors and backbones")
    p.set_defaults(func=cmd_list)

    from clad.bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from clad.errors import CladError

    args = build_parser().parse_args(argv)
    if getattr(args, "pixel_eval_size", None) == 0:
        args.pixel_eval_size = None
    try:
        return args.func(args)
    except (CladError, KeyError) as e:
        print(f"clad: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
