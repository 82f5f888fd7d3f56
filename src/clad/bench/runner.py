"""Running the grid: each run fitted and evaluated once, its record cached in ``runs/``, the outputs written.

A finished run is one JSON file ``DIR/runs/<category>-<detector>-shots<n>-seed<r>-<key>.json`` (``Run.filename``);
a rerun skips the runs it finds there, so an interrupted bench goes on where it stopped. A run that raises is
recorded with its error and traceback tail, and retried by the next invocation. Ctrl-C or SIGTERM (under
``clad.pipeline.outputs.stop_on_signals``) stops between two writes: every finished run stays cached, the run in
progress leaves nothing, and the tables are written from the finished ones. Detectors of one (dataset,
category, shots, seed) that differ only in inference parameters share one fit (``fit_signature`` / ``adopt``).
"""
from __future__ import annotations

import dataclasses
import time
import traceback
from pathlib import Path
from typing import Sequence

from clad.bench.aggregate import fmt_value
from clad.bench.files import plain, read_json, write_json
from clad.bench.measure import MeasuredDetector, PeakMemory, backbone_time, machine
from clad.bench.plan import Run, plan_runs, resolve_categories
from clad.bench.render import write_outputs
from clad.pipeline.outputs import uninterrupted
from clad.specs import dataset_name, parse_data_specs, parse_detector_specs, parse_shots, shots_text, with_aux

RUN_FORMAT = "clad-bench-run"


class _TestSplits:
    """The decoded test split of the current (dataset, category); runs are ordered so it is reused."""

    def __init__(self):
        self.key, self.samples, self.failures = None, None, None

    def get(self, dataset: str, category: str | None):
        from clad.data import open_dataset
        from clad.evaluate import load_split

        if self.key != (dataset, category):
            self.key, self.samples = None, None  # drop the previous category before decoding the next
            samples, failures = load_split(open_dataset(dataset, category, "test"), progress=False)
            self.key, self.samples, self.failures = (dataset, category), samples, failures
        return self.samples, self.failures


class _SharedFits:
    """The fitted detectors of the current (dataset, category, shots, seed), by ``Detector.fit_signature``.

    Only one (dataset, category, shots, seed) is kept: ``plan_runs`` puts the detectors of one next to each other.
    """

    def __init__(self):
        self.where, self.fits = None, {}

    def find(self, run: Run, detector) -> dict | None:
        where = (run.dataset, run.category, run.shots, run.seed)
        if where != self.where:
            self.where, self.fits = where, {}
        return self.fits.get(detector.fit_signature())

    def add(self, detector, fit_seconds: float, label: str) -> None:
        self.fits[detector.fit_signature()] = {"detector": detector, "fit_seconds": fit_seconds, "label": label}


def execute_run(run: Run, tests: _TestSplits, backbone_times: dict, bt_dir: Path | None, batch_size: int = 16,
                pixel_eval_size: int | None = 256, shared_fits: _SharedFits | None = None) -> dict:
    """Fit and evaluate one run; returns its record (status "ok"), or raises.

    shared_fits: the fits of this (dataset, category, shots, seed) so far; a detector that only differs from one
    of them in inference parameters (e.g. ``clad_plus`` after ``clad``) takes its fit, and its record gives that
    fit's time with ``fit_shared_with`` naming the run that paid for it.
    """
    from clad.data import open_dataset
    from clad.evaluate import evaluate
    from clad.registry import create_detector

    test_samples, test_failures = tests.get(run.dataset, run.category)
    if run.corruption is not None:  # the test split only; the references stay clean
        from clad.data.corruptions import corrupt_samples

        test_samples = corrupt_samples(test_samples, *run.corruption, seed=run.seed)
    train = open_dataset(run.dataset, run.category, "train", n_shots=run.shots, seed=run.seed)
    detector = create_detector(run.detector.name, **run.detector_params())
    source = None if shared_fits is None else shared_fits.find(run, detector)
    with PeakMemory() as meter:
        res = evaluate(MeasuredDetector(detector, meter), train, test_samples, batch_size=batch_size,
                       pixel_eval_size=pixel_eval_size, progress=False, keep_predictions=True,
                       fitted_from=None if source is None else source["detector"])
    if shared_fits is not None and source is None:
        shared_fits.add(detector, res["fit_seconds"], run.detector.label)
    pred = res.pop("_predictions")
    memory = meter.result()
    images = [s.image for s in pred["samples"]]
    params = res.pop("params")
    bb_spec, size = params.get("backbone"), params.get("image_size")
    bt = backbone_time(run, bb_spec, size, images, batch_size, backbone_times, bt_dir) if bb_spec else None
    bb_ms = (bt or {}).get("ms_per_image")
    figures = {k: res.pop(k) for k in list(res) if isinstance(res[k], (int, float)) and not isinstance(res[k], bool)}
    if source is not None:
        figures["fit_seconds"] = source["fit_seconds"]
    figures.update(
        backbone_ms_per_image=bb_ms,
        predict_over_backbone=figures["predict_ms_per_image"] / bb_ms if bb_ms else None,
        peak_rss_growth_mb=memory["peak_rss_growth_mb"],
        cuda_peak_mb=memory["cuda_peak_mb"],
    )
    return {
        "metrics": figures,
        "detector_params": params,
        "backbone": bb_spec,
        "image_size": (bt or {}).get("image_size", size),
        "backbone_timing": bt,
        "memory": memory,
        "iou_threshold_source": res.get("iou_threshold_source"),
        "fit_shared_with": None if source is None else source["label"],
        "failures": res.get("failures", []) + test_failures,
        "predictions": {
            "paths": [s.path for s in pred["samples"]],
            "labels": [int(s.label) for s in pred["samples"]],
            "scores": [float(x) for x in pred["result"].scores],
        },
    }


def run_bench(out: str | Path, data, categories="all", detectors="patchcore", shots="1", runs: int = 5,
              batch_size: int = 16, pixel_eval_size: int | None = 256, plots: bool = True,
              progress: bool = True, argv: Sequence[str] | None = None, aux: str | None = None,
              corruptions: str | None = None) -> dict:
    """Run (or take from the cache) every run of the grid, then write results.json, report.md and plots.

    ``aux``: a dataset spec of labelled defects that every detector taking an ``aux`` parameter (CLAD) also trains
    on, unless its spec sets one; the evaluated category itself is never used.
    ``corruptions``: ``name:severity,...`` or ``all`` (``clad.data.corruptions.parse_corruptions``): every cell is
    also evaluated on its test split under each of them, on the same fit, and the report adds a robustness table.

    Returns a summary: ``ran``, ``cached``, ``failed`` (counts for this invocation), ``interrupted``, the paths
    written and the ``records`` of every planned run that has one.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    data_specs = parse_data_specs(data)
    det_specs = parse_detector_specs(detectors)
    shot_list = parse_shots(shots)
    from clad.data.corruptions import parse_corruptions

    corruption_list = parse_corruptions(corruptions) if corruptions else []
    if runs < 1:
        raise ValueError(f"--runs must be >= 1, got {runs}")
    from clad.registry import detector_class

    for d in det_specs:
        detector_class(d.name)  # an unknown name is a typo: stop before running anything
    if aux:
        det_specs = with_aux(det_specs, aux)
    cats = resolve_categories(data_specs, categories)
    plan = plan_runs(data_specs, cats, det_specs, shot_list, range(runs), corruption_list)
    runs_dir, bt_dir = out / "runs", out / "backbone_times"
    runs_dir.mkdir(parents=True, exist_ok=True)
    env = machine()

    tests, backbone_times, records, shared_fits = _TestSplits(), {}, [], _SharedFits()
    counts = {"ran": 0, "cached": 0, "failed": 0}
    interrupted = False
    bar = tqdm(plan, desc="bench", unit="run", disable=not progress, dynamic_ncols=True)
    try:
        for i, run in enumerate(bar, start=1):
            path = runs_dir / run.filename(pixel_eval_size)
            prefix = f"[{i}/{len(plan)}] {run.title()}:"
            cached = read_json(path)
            if cached and cached.get("format") == RUN_FORMAT and cached.get("status") == "ok":
                cached["settings"]["label"] = run.detector.label
                records.append(dict(cached, file=str(path.relative_to(out))))
                counts["cached"] += 1
                tqdm.write(f"{prefix} cached")
                continue
            retry = " (failed before, retrying)" if cached and cached.get("status") == "failed" else ""
            record = {"format": RUN_FORMAT, "key": run.key(pixel_eval_size),
                      "settings": dict(run.settings(), label=run.detector.label, pixel_eval_size=pixel_eval_size,
                                       batch_size=batch_size),
                      "environment": env, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            t0 = time.perf_counter()
            try:
                record.update(execute_run(run, tests, backbone_times, bt_dir, batch_size, pixel_eval_size, shared_fits))
                record["status"] = "ok"
                counts["ran"] += 1
            except Exception as e:  # noqa: BLE001 - one failing run must not stop the others
                record.update(status="failed", error=f"{type(e).__name__}: {e}",
                              traceback="".join(traceback.format_exc().splitlines(keepends=True)[-15:]))
                counts["failed"] += 1
            record["seconds"] = time.perf_counter() - t0
            write_json(path, record)
            records.append(dict(plain(record), file=str(path.relative_to(out))))
            tqdm.write(f"{prefix}{retry} {_summary_line(record)}")
    except KeyboardInterrupt:
        interrupted = True
        tqdm.write("interrupted: finished runs are cached; run the same command again to go on")
    finally:
        bar.close()

    command = ["clad", *argv] if argv is not None else None
    settings = {"data": data_specs, "categories": {dataset_name(k): v for k, v in cats.items()},
                "detectors": [dataclasses.asdict(d) for d in det_specs], "shots": [shots_text(s) for s in shot_list],
                "runs": runs, "seeds": list(range(runs)), "batch_size": batch_size,
                "pixel_eval_size": pixel_eval_size, "command": command}
    if corruption_list:
        settings["corruptions"] = [f"{n}:{s}" for n, s in corruption_list]
    with uninterrupted(raise_after=False):  # a signal now would only cut the tables in half
        written = write_outputs(out, records, settings, env, det_specs, n_planned=len(plan), plots=plots,
                                interrupted=interrupted)
    summary = dict(counts, planned=len(plan), interrupted=interrupted, records=records, **written)
    print(f"bench: {counts['ran']} ran, {counts['cached']} cached, {counts['failed']} failed"
          f"{', interrupted' if interrupted else ''} -> {written['report']}")
    return summary


def _summary_line(record: dict) -> str:
    if record.get("status") != "ok":
        return f"FAILED {record.get('error', '')}".splitlines()[0]
    m = record["metrics"]
    ratio = m.get("predict_over_backbone")
    return (f"image AUROC {fmt_value(m.get('image_auroc'), 'image_auroc')}  "
            f"pixel AUROC {fmt_value(m.get('pixel_auroc'), 'pixel_auroc')}  "
            f"fit {fmt_value(m.get('fit_seconds'), 'fit_seconds')} s  "
            f"predict {fmt_value(m.get('predict_ms_per_image'), 'predict_ms_per_image')} ms/image"
            + (f" ({ratio:.1f}x backbone)" if ratio else ""))
