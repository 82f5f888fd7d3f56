"""The ``clad`` command: fit, predict, export, eval, report, demo, list and bench.

One error contract for every command: a mistake in what the user gave (an argument, a file, a folder) is one
line ``clad: error: ...`` and exit code 2; a run stopped by Ctrl-C or SIGTERM keeps what it finished, says what,
and exits 130; anything else is a bug: its traceback, a line saying so, exit code 1. Every command that writes
holds its output (``clad.pipeline.outputs.output_lock``) and replaces the previous outputs only when it ends.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from clad.cluster import add_engine_args
from clad.metrics_catalog import eval_rows
from clad.specs import argument_type, parse_int, parse_number, parse_shot, shots_text

DEFAULT_DETECTOR = "patchcore"
EXIT_BUG, EXIT_USER, EXIT_INTERRUPTED = 1, 2, 130
POSITIVE = argument_type(parse_int, 1)
NATURAL = argument_type(parse_int, 0)
NUMBER = argument_type(parse_number)


def _non_negative(text) -> float:
    from clad.errors import SpecError

    value = parse_number(text)
    if value < 0:
        raise SpecError(f"expected a number >= 0, got {text!r}")
    return value


def _port(text) -> int:
    from clad.errors import SpecError

    value = parse_int(text, 0)
    if value > 65535:
        raise SpecError(f"expected a port number 0-65535, got {text!r}")
    return value


NON_NEGATIVE = argument_type(_non_negative)
PORT = argument_type(_port)


def _build_detector(args, category: str | None = None):
    """The detector named by ``--detector`` with ``--param``, ``--backbone``, ``--seed`` and ``--aux``."""
    from clad.errors import CladError, ConfigError
    from clad.registry import create_detector
    from clad.specs import detector_params, parse_params

    params = parse_params(args.param)
    if getattr(args, "backbone", None):
        params["backbone"] = args.backbone
    shots = parse_shot(args.shots) if getattr(args, "shots", None) is not None else None
    params = detector_params(args.detector, params, seed=args.seed, category=category, aux=getattr(args, "aux", None),
                             shots=shots)
    try:
        return create_detector(args.detector, **params)
    except (TypeError, ValueError) as e:  # building only stores and checks the parameters: theirs is the mistake
        if isinstance(e, CladError):
            raise
        raise ConfigError(f"--detector {args.detector} with {params}: {e}") from e


def _add_detector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detector", default=DEFAULT_DETECTOR, help=f"registry name (default {DEFAULT_DETECTOR}); see `clad list`")
    p.add_argument("--backbone", help="backbone spec: efficientnet_lite0 (default), efficientnet_lite1, "
                   "efficientnet_lite2, tiny_cnn, clip:/path/to/hf_clip_folder")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="detector parameter (repeatable)")
    p.add_argument("--seed", type=NATURAL, default=0, help="seed for the choice of references and the detector (default 0)")
    p.add_argument("--aux", metavar="SPEC", help="CLAD: labelled defects of other categories to train on too, "
                   "e.g. mvtec:ROOT (the evaluated --category is always left out)")


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help="mvtec:ROOT, visa:ROOT or folder:GOOD_DIR[,DEFECT_DIR[,MASK_DIR]]")
    p.add_argument("--category", help="dataset category (e.g. bottle); not needed for folder:")
    p.add_argument("--shots", default="all", help="number of normal references from train/good, 'all' (default), "
                   "or 0: none (zero-shot winclip)")


# -- fit ------------------------------------------------------------------------------------------------------
def cmd_fit(args) -> int:
    from clad.data import open_dataset
    from clad.evaluate import load_split
    from clad.pipeline import output_lock

    with output_lock(args.out, "folder"):
        train = open_dataset(args.data, args.category, "train", n_shots=parse_shot(args.shots), seed=args.seed)
        det = _build_detector(args, args.category)
        samples, failures = load_split(train, desc="loading references")
        for f in failures:
            print(f"skipped {f['path']}: {f['error']}", file=sys.stderr)
        if not samples and (failures or not det.fits_without_references):
            from clad.errors import DatasetError

            raise DatasetError(f"{args.data}: no reference image could be read ({len(failures)} skipped)")
        t0 = time.perf_counter()
        det.fit([s.image for s in samples])
        if args.threshold is not None:
            det.set_threshold(args.threshold)
        out = det.save(args.out)
    print(f"fitted {det.name} on {len(samples)} reference image(s) in {time.perf_counter() - t0:.1f} s -> {out}")
    for key, value in det.fit_report().items():
        print(f"  {key}: {json.dumps(value)}")
    if det.threshold_ is not None:
        print(f"  threshold {det.threshold_:.6g} (from the {det.threshold_source_}; normalised scores put it at 0.5)")
    return 0


# -- predict --------------------------------------------------------------------------------------------------
def cmd_predict(args) -> int:
    from clad.errors import DatasetError, SpecError
    from clad.pipeline import (ErrorLog, ErrorsCSV, ExplanationsJSON, HTMLReport, MapsNpy, Pipeline, PredictionsCSV,
                               PredictionsParquet, RunFolder, open_source, parquet_available)

    if args.resume and args.report:
        raise SpecError("--resume cannot add to an HTML report (it needs every image at once); leave out --report")
    ray = _ray_engine(args)
    det, digest = _load_for_runtime(args)
    if args.threshold is not None:
        det.set_threshold(args.threshold)
    threshold = None if det.threshold_ is None else float(det.threshold_)
    source = open_source(args.input)
    identity = {"model_sha256": digest, "input": os.path.abspath(args.input),
                "threshold": threshold, "explain": bool(args.explain), "pixel_threshold": args.pixel_threshold,
                "catalogue": args.catalogue and os.path.abspath(args.catalogue), "maps": args.maps}
    if args.runtime != "torch":  # only then: runs recorded before --runtime existed still resume
        identity["runtime"] = args.runtime
    info = {"model": os.path.abspath(args.model), "detector": det.name, "engine": args.engine}
    with RunFolder(args.out, identity, info, resume=args.resume, defaults={"maps": "npy"}) as run, \
            _hold_report(args.report, run.folder):
        out = run.folder
        if run.interrupted_before and not args.resume:
            print(f"note: {out} holds an interrupted run; this run replaces it when it ends (--resume would go on "
                  "with it instead)", file=sys.stderr)
        ours = [out] + ([Path(os.path.abspath(args.report))] if args.report else [])
        todo = [e for e in run.todo(source) if not any(_inside(e.path, o) for o in ours)]
        sinks = [MapsNpy(out / "maps", merge=args.resume, format=args.maps), ErrorsCSV(out / "errors.csv"),
                 ErrorLog()]
        if args.explain:
            sinks.append(ExplanationsJSON(out / "explanations.json", append=args.resume))
        report = None
        if args.report:
            report = HTMLReport(args.report, title=f"clad predict: {det.name} on {args.input}", threshold=threshold)
            sinks.append(report)
        record = run.record()
        sinks.append(PredictionsCSV(out / "predictions.csv", labels=threshold is not None, append=args.resume))
        parquet = parquet_available()
        if parquet:  # after the CSV: written from it at close
            sinks.append(PredictionsParquet(out / "predictions.parquet", out / "predictions.csv"))
        sinks.append(record)
        try:
            if ray is None:
                pipeline = Pipeline(det, sinks, batch_size=args.batch_size, explainer=_explainer(det, args),
                                    progress=True)
                summary = pipeline.run(todo)
            else:
                from clad.cluster.data import model_files, score_on_ray

                stream = score_on_ray(ray, model_files(args.model, args.runtime), args.runtime, todo,
                                      batch_size=args.batch_size, threshold=args.threshold)
                summary = Pipeline(None, sinks, progress=True).deliver(stream, total=len(todo))
        except KeyboardInterrupt as e:
            doc = record.doc
            e.kept = (f"{doc['scored']} image(s) scored are kept in {Path(args.out) / 'predictions.csv'} with their maps; "
                      "the same command with --resume finishes the run") if doc else "nothing was kept"
            raise
    doc, out = record.doc, Path(args.out)  # shown as the user wrote it
    # this run's counts first; with --resume, the whole run's (run.json) after them
    flagged = f" ({summary.n_flagged} flagged above the threshold {threshold:g})" if threshold is not None else ""
    before = ""
    if args.resume:
        before = f", {len(run.done)} done before (the whole run: {doc['scored']} scored"
        before += f", {doc['flagged']} flagged)" if threshold is not None else ")"
    skipped = f"{summary.n_skipped} skipped" + (f" (reasons in {out / 'errors.csv'})" if summary.n_skipped else "")
    maps = "no maps" if args.maps == "none" else f"maps ({args.maps}) in {out / 'maps'}"
    print(f"predict: {summary.n_scored} image(s) scored{flagged}, {skipped}{before}, in {summary.seconds:.1f} s "
          f"-> {out / 'predictions.csv'}, {maps}")
    if not parquet:
        print("note: predictions.parquet not written: it needs pyarrow (pip install pyarrow)", file=sys.stderr)
    if args.explain:
        print(f"explanations -> {out / 'explanations.json'}")
    if report is not None and report.page is not None:
        print(f"report -> {report.page}")
    if not doc["scored"]:
        raise DatasetError(f"{args.input}: no image could be scored; the reasons are in {out / 'errors.csv'}")
    return 0


def _ray_engine(args):
    """The ``ray`` module connected to the cluster of ``--engine ray`` (None for the local engine)."""
    from clad.errors import SpecError

    if args.engine != "ray":
        if args.address is not None or args.num_cpus is not None:
            raise SpecError("--address and --num-cpus choose the Ray cluster of --engine ray; add --engine ray")
        return None
    if args.explain or args.report:
        raise SpecError("--explain and --report need the local engine (they use the decoded images and the "
                        "detector's features in this process); leave them out, or use --engine local")
    from clad.cluster import connect

    return connect(args.address, args.num_cpus)


def _load_for_runtime(args):
    """The model of ``predict --model`` for ``--runtime``, and its digest (the identity of a run)."""
    from clad.errors import ConfigError, SpecError

    model = Path(args.model)
    if args.runtime == "onnxruntime":
        if args.explain or args.report:
            raise SpecError("--explain and --report need the torch runtime (explanations use the detector's own "
                            "features); leave them out, or use --runtime torch with the model folder")
        if model.is_dir():
            raise ConfigError(f"--model {model}: a model folder; --runtime onnxruntime runs the file that "
                              f"`clad export --model {model} --format onnx --out FILE` writes")
        from clad.export import OnnxDetector

        det = OnnxDetector(model)
        return det, det.digest
    from clad.detectors.base import load_detector
    from clad.pipeline import folder_digest

    if model.is_file():
        raise ConfigError(f"--model {model}: a file; the torch runtime loads a model folder written by `clad fit` "
                          "(a file written by `clad export` runs with --runtime onnxruntime)")
    return load_detector(model), folder_digest(model)


# -- export ---------------------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from clad.detectors.base import load_detector
    from clad.errors import ConfigError
    from clad.export import export_onnx, export_problem
    from clad.export.exporter import require
    from clad.pipeline import folder_digest, output_lock

    require("onnx", "clad export --format onnx")
    det = load_detector(args.model)
    problem = export_problem(det)
    if problem:
        raise ConfigError(f"{args.model}: {problem}")
    with output_lock(args.out, "file"):
        t0 = time.perf_counter()
        path = export_onnx(det, args.out, source=folder_digest(args.model))
    data = path.with_name(f"{path.name}.data")
    size = path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    print(f"exported {det.name} to {args.out} ({size / 1e6:.1f} MB{', tensors in ' + data.name if data.is_file() else ''})"
          f" in {time.perf_counter() - t0:.1f} s; run it with: clad predict --model {args.out} --runtime onnxruntime "
          "--input IMAGES --out DIR")
    return 0


def _inside(path: str, folder: Path) -> bool:
    """Whether ``path`` lies under ``folder`` (a run's own outputs are never read as its input)."""
    return os.path.abspath(path).startswith(str(folder).rstrip(os.sep) + os.sep)


def _hold_report(report: str | None, out: Path):
    """The lock of predict's --report folder (none when it is --out itself, already held)."""
    from clad.pipeline import output_lock

    if report is None or Path(os.path.abspath(report)) == out:
        return contextlib.nullcontext()
    return output_lock(report, "folder", "--report")


def _explainer(det, args):
    """The Explainer of ``predict --explain / --report`` (None when neither is asked for)."""
    if not (args.explain or args.report):
        return None
    from clad.explain import Catalogue, Explainer

    catalogue = Catalogue.from_folder(args.catalogue) if args.catalogue else None
    return Explainer(det, catalogue=catalogue, pixel_threshold=args.pixel_threshold).fit()


# -- eval -----------------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from clad.pipeline import output_lock

    with output_lock(args.out, "file") if args.out else contextlib.nullcontext():
        return _eval(args)


def _eval(args) -> int:
    from clad.data import open_dataset
    from clad.evaluate import environment, evaluate
    from clad.pipeline import atomic_write

    shots = parse_shot(args.shots)
    train = open_dataset(args.data, args.category, "train", n_shots=shots, seed=args.seed)
    test = open_dataset(args.data, args.category, "test")
    det = _build_detector(args, args.category)
    res = evaluate(det, train, test, batch_size=args.batch_size, pixel_eval_size=args.pixel_eval_size,
                   keep_predictions=args.explain)
    pred = res.pop("_predictions", None)
    if not res["n_test"]:
        from clad.errors import DatasetError

        for f in res["failures"]:
            print(f"  skipped {f['path']}: {f['error']}", file=sys.stderr)
        raise DatasetError(f"{args.data}: no test image could be read, so there is nothing to measure")
    res.update(data=args.data, category=args.category, shots=shots_text(shots), seed=args.seed, environment=environment())
    name = f"{args.category or 'folder'} | {det.name} | shots={shots_text(shots)} seed={args.seed}"
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
        if args.out:
            res["explain"]["coverage_plot"] = _coverage_plot(res["explain"], args.out)
    for f in res["failures"]:
        print(f"  skipped {f['path']}: {f['error']}", file=sys.stderr)
    if args.out:
        atomic_write(args.out, json.dumps(res, indent=2, default=_json_default))
        print(f"  written {args.out}")
    return 0


def _coverage_plot(naming: dict, out: str) -> str | None:
    """OUT's name with .coverage.png: the naming accuracy by coverage of each ranking (``clad eval --explain``)."""
    from pathlib import Path

    from clad.report import plot_coverage

    curves = {label: naming[key]["coverage_curve"] for key, label in (("descriptions", "descriptions"), ("catalogue", "+ catalogue"))
              if naming.get(key)}
    if not curves:
        return None
    main = naming.get("catalogue") or naming["descriptions"]
    at = main["at_threshold"] if main["at_threshold"]["threshold"] is not None else None
    path = plot_coverage(Path(out).with_suffix(".coverage.png"), curves, main["chance_top1"], at)
    print(f"  written {path}")
    return str(path)


def cmd_report(args) -> int:
    from clad.pipeline import output_lock

    with output_lock(args.out, "folder"):
        return _report(args)


def _report(args) -> int:
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
    title = f"{args.category or 'folder'} | {det.name} | shots={shots_text(shots)} seed={args.seed}"
    scored = EvalSink(args.pixel_eval_size)
    report = HTMLReport(args.out, title=title, threshold=det.threshold_, references=refs, metrics=lambda: dict(
        scored.metrics, fit_seconds=fit_s, predict_ms_per_image=scored.predict_ms_per_image))
    Pipeline(det, [scored, report], batch_size=args.batch_size, explainer=explainer, progress=True).run(from_dataset(test))
    if report.page is None:
        from clad.errors import DatasetError

        raise DatasetError(f"{args.data}: no test image could be read, so there is no report")
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
    from clad.pipeline import output_lock

    with output_lock(args.out, "folder"):
        run_demo(Path(args.out), detector=args.detector, backbone=args.backbone)
    return 0


def cmd_list(args) -> int:
    from clad.registry import datasets, list_backbones, list_detectors, list_text_encoders

    print("detectors:", ", ".join(list_detectors()))
    print("backbones:", ", ".join(list_backbones()))
    print("text encoders:", ", ".join(list_text_encoders()))
    print("dataset schemes (--data SCHEME:LOCATION):", ", ".join(datasets.names()))
    return 0


# -- serve ----------------------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from clad.serve import check_dependencies

    check_dependencies()
    from clad.serve.server import prepare_demo, run, settings_for
    from clad.errors import SpecError

    if args.engine != "ray" and (args.replicas is not None or args.address or args.num_cpus is not None):
        raise SpecError("--replicas, --address and --num-cpus go with --engine ray")
    args.replicas = 1 if args.replicas is None else args.replicas

    models, seed = list(args.models), []
    if args.demo:
        demo = prepare_demo(args.demo_dir)
        models = [demo["model"]] + models
        seed = demo["test"]
    data_dir = args.data_dir or (os.path.join(args.demo_dir, "station") if args.demo else None)
    settings = settings_for(models, data_dir=data_dir, db=args.db, store_images=args.store_images,
                            api_key_file=args.api_key_file, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                            queue=args.queue, max_body_mb=args.max_body_mb, retention_days=args.retention_days,
                            cors_origins=args.cors_origin or [], seed_images=seed)
    try:
        if args.engine == "ray":
            from clad.cluster.serve import run as run_replicas

            run_replicas(settings, replicas=args.replicas, host=args.host, port=args.port, address=args.address,
                         num_cpus=args.num_cpus)
        else:
            run(settings, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)
    except KeyboardInterrupt as e:
        from clad.serve.db import safe_url

        e.kept = f"the history is in {safe_url(settings.db_url)}"
        raise
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error of every clad mistake (the usage stays in ``--help``)."""

    def error(self, message: str):
        self.exit(EXIT_USER, f"clad: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clad", description="Industrial visual anomaly detection and localization.",
                     epilog="Exit codes: 0 done, 2 a mistake in the arguments or files (one line 'clad: error: ...'), "
                            "130 interrupted (Ctrl-C or SIGTERM; what was finished is kept), 1 a bug (a traceback).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit a detector on normal reference images and save it")
    _add_data_args(p)
    _add_detector_args(p)
    p.add_argument("--threshold", type=NUMBER, help="decision threshold on the score, saved with the model")
    p.add_argument("--out", required=True, help="folder to save the model in (config.json + model.safetensors)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser(
        "predict", help="score images with a saved model; write scores and anomaly maps",
        description="Score images with a saved model. Symbolic links are followed (a folder is never listed twice, "
                    "so link loops end); hidden files and folders and the outputs' own folders are not read; every "
                    "other file that cannot be scored (unsupported format, dangling link, link loop, unreadable) is "
                    "skipped and listed with its reason in errors.csv. Outputs replace the previous ones only when "
                    "the run ends; one run at a time writes into an --out folder.")
    p.add_argument("--model", required=True, help="folder written by `clad fit`")
    p.add_argument("--input", required=True, help="an image, a folder of images (searched recursively) or a CSV file with a path column")
    p.add_argument("--out", required=True, help="output folder: predictions.csv and .parquet, errors.csv, maps/<input path>.npy, "
                   "run.json (the model, settings and counts of the run)")
    p.add_argument("--resume", action="store_true", help="go on with the interrupted run in --out (same model, input "
                   "and settings): images already in its predictions.csv are not scored again")
    p.add_argument("--threshold", type=NUMBER, help="label images whose score is above this")
    p.add_argument("--batch-size", type=POSITIVE, default=16)
    p.add_argument("--explain", action="store_true", help="also write explanations.json (regions, defect types, a sentence per image)")
    p.add_argument("--report", metavar="DIR", help="also write an HTML report (index.html + PNGs) to DIR")
    p.add_argument("--catalogue", metavar="DIR", help="defect catalogue for the explanations: DIR/<type>/<image> + mask")
    p.add_argument("--pixel-threshold", type=NUMBER, help="map threshold for explained regions (default: the model's "
                   "threshold when its score is the map maximum, else the 99.5th percentile of each batch's maps)")
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                   help="torch (default: --model is a folder written by `clad fit`) or onnxruntime (--model is a file "
                        "written by `clad export`; needs pip install onnxruntime)")
    p.add_argument("--maps", choices=("npy", "float16", "png16", "none"), default="npy",
                   help="anomaly maps: npy (default, float32 .npy at the image's size), float16 (.npy, half the size), "
                        "png16 (16-bit PNG with its value range, smallest), none; clad.pipeline.read_map reads each")
    add_engine_args(p, "this process", "Ray Data on a Ray cluster; the input must be readable at the same path on "
                    "every node")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a saved model to ONNX (the backbone and the scoring in one graph)",
                       description="Export a saved model to one ONNX graph: input uint8 (B, 3, S, S) RGB images resized "
                                   "to the model's image_size; outputs image scores (B,), maps (B, S, S) and patch maps "
                                   "(B, h, w). For patchcore, patch_knn, padim, clad and clad_plus.")
    p.add_argument("--model", required=True, help="folder written by `clad fit`")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="onnx (the only one so far)")
    p.add_argument("--out", required=True, help="the file to write, e.g. model.onnx (tensors over 1 GB go to FILE.data)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="fit on references and measure on a labelled test split")
    _add_data_args(p)
    _add_detector_args(p)
    p.add_argument("--batch-size", type=POSITIVE, default=16)
    p.add_argument("--pixel-eval-size", type=NATURAL, default=256, help="longer side for pixel metrics (0 = native)")
    p.add_argument("--out", help="write every figure with its settings to this JSON file")
    p.add_argument("--explain", action="store_true", help="also measure how often explanations name the right defect type")
    p.add_argument("--catalogue", metavar="DIR", help="defect catalogue for --explain: DIR/<type>/<image> + mask")
    p.add_argument("--catalogue-shots", type=POSITIVE, metavar="N", help="--explain: take N seeded examples per defect "
                   "type out of the test set as the catalogue and measure naming on the rest")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="fit on references, predict and explain a labelled test split, write an HTML report")
    _add_data_args(p)
    _add_detector_args(p)
    p.add_argument("--batch-size", type=POSITIVE, default=16)
    p.add_argument("--pixel-eval-size", type=NATURAL, default=256, help="longer side for pixel metrics (0 = native)")
    p.add_argument("--catalogue", metavar="DIR", help="defect catalogue for the explanations: DIR/<type>/<image> + mask")
    p.add_argument("--out", required=True, help="report folder (index.html + PNGs)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="run the whole pipeline on a built-in synthetic set, offline")
    p.add_argument("--out", default="clad_demo", help="report folder (default ./clad_demo)")
    p.add_argument("--detector", default=DEFAULT_DETECTOR)
    p.add_argument("--backbone", default=None, help="default: the detector's own (efficientnet_lite0)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "serve", help="the inspection station: an HTTP service and web app over saved models, with a history",
        description="Serve saved models over HTTP (API at /api/v1, its docs at /docs, the web app at /, Prometheus "
                    "metrics at /metrics) with a durable history of every inspection. Each model's name is its "
                    "folder's name; its versions (threshold changes, taught references) are kept in MODEL_DIR/"
                    ".versions and normal images for the closest normal patch in MODEL_DIR/.references. By default "
                    "the station's data (the SQLite history station.db, stored images and anomaly maps) lives in "
                    "clad_station/ beside the first MODEL_DIR. Needs the app extra: pip install -e \".[app]\".")
    p.add_argument("models", nargs="*", metavar="MODEL_DIR", help="folders written by `clad fit`")
    p.add_argument("--demo", action="store_true", help="fit the demo model (as `clad demo`) into --demo-dir and "
                   "serve it, with its test images inspected once so the station shows something at once")
    p.add_argument("--demo-dir", default="clad_demo_station", help="--demo's folder (default ./clad_demo_station; "
                   "reused when it holds the model already)")
    p.add_argument("--data-dir", help="the station's folder: history, images, maps (default: clad_station/ beside "
                   "the first MODEL_DIR; with --demo, DEMO_DIR/station)")
    p.add_argument("--db", metavar="URL", help="SQLAlchemy database URL (default sqlite:///DATA_DIR/station.db)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=PORT, default=8000, help="default 8000; 0: a free port, printed at start")
    p.add_argument("--api-key-file", metavar="FILE", help="file whose first line is the key (16+ characters) that "
                   "every write request (POST) must send as the header X-API-Key")
    p.add_argument("--store-images", metavar="DIR|none", help="where uploaded images are stored, named by their "
                   "sha256 (default DATA_DIR/images); 'none' stores none (no overlay, teaching or rating then)")
    p.add_argument("--max-batch", type=POSITIVE, default=16, help="most images per forward pass (default 16)")
    p.add_argument("--max-wait-ms", type=NON_NEGATIVE, default=10.0,
                   help="longest wait for a batch to fill, in ms (default 10)")
    p.add_argument("--queue", type=POSITIVE, default=64, help="most images waiting; more get 503 (default 64)")
    p.add_argument("--max-body-mb", type=NON_NEGATIVE, default=20.0,
                   help="largest request body, in MiB; larger get 413 (default 20)")
    p.add_argument("--retention-days", type=NON_NEGATIVE, metavar="N",
                   help="delete inspections (rows, images, maps) older than N days, at start and hourly "
                        "(default: keep all)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="allow browser pages from ORIGIN to call the API (repeatable; default: none)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    add_engine_args(p, "this process, uvicorn", "--replicas stations on Ray Serve behind one URL, each batching its "
                    "own requests, sharing the history (PostgreSQL across machines) and the data folder",
                    lambda q: q.add_argument("--replicas", type=POSITIVE, metavar="N",
                                             help="--engine ray: how many stations (default 1)"))
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("list", help="list the registered detectors and backbones")
    p.set_defaults(func=cmd_list)

    from clad.bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    return parser


# An error from the system that is the user's to fix (a full disk, a read-only or forbidden folder), not a bug.
USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def main(argv: list[str] | None = None) -> int:
    from clad.errors import CladError
    from clad.pipeline import stop_on_signals

    args = build_parser().parse_args(argv)
    if getattr(args, "pixel_eval_size", None) == 0:
        args.pixel_eval_size = None
    try:
        with stop_on_signals():
            return args.func(args)
    except CladError as e:
        return _error(e)
    except OSError as e:
        if e.errno not in USER_OS_ERRORS:
            return _bug()
        return _error(e)
    except KeyboardInterrupt as e:
        how = str(e) or "SIGINT"
        print(f"clad: interrupted ({how}); {getattr(e, 'kept', None) or 'nothing was written'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - a bug: say so, with its traceback
        return _bug()


def _error(e: BaseException) -> int:
    text = " ".join(str(e).split("\n")).strip() or type(e).__name__
    print(f"clad: error: {text}", file=sys.stderr)
    return EXIT_USER


def _bug() -> int:
    traceback.print_exc()
    print("clad: internal error (a bug): please report it to the clad maintainers with this traceback and the "
          "command that gave it", file=sys.stderr)
    return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
