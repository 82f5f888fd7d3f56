"""``clad bench``: run every (dataset, category, detector, shots, seed), cache each run, and write the paper's tables.

A bench is a grid of runs. Run r uses seed r both to draw the reference images and as the detector's ``seed``.
Each finished run is one JSON file ``DIR/runs/<category>-<detector>-shots<n>-seed<r>-<key>.json`` where ``key``
hashes the run's full settings (dataset spec, category, detector name + resolved parameters, shots, seed, pixel
evaluation size, clad version); a rerun skips the runs it finds there, so an interrupted bench goes on where it
stopped. A run that raises is recorded with its error and traceback tail, and retried by the next invocation.

From the runs, ``results.json`` (every figure with its settings) and ``report.md`` (tables, plots, failures).
Aggregation, one rule for every table: for each seed, the mean over the categories of that seed's values (only
when every category's run of that seed succeeded with a finite value), then mean +- sample std (ddof=1) over seeds.

Human ratings (the paper's Table 3): ``export_rating_sheet`` writes blind overlays and a sheet per rater,
``import_ratings`` turns the filled sheets and the separate key into the table.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from clad.specs import (DetectorSpec, dataset_name, detector_params, parse_data_specs, parse_detector_specs,
                        parse_shots, shots_text, split_top, with_aux)

RUN_FORMAT = "clad-bench-run"
RESULTS_FORMAT = "clad-bench-results"
KEY_FORMAT = "clad-rating-key"
PUBLISHED_NOTE = "published (paper, 1-shot setting)"

# Figures of a run that the tables aggregate: (key, label, scale for display, decimals).
METRICS = {
    "image_auroc": ("image AUROC", 100, 1),
    "pixel_auroc": ("pixel AUROC", 100, 1),
    "aupro": ("AUPRO", 100, 1),
    "image_f1_max": ("image F1-max", 100, 1),
    "pixel_f1_max": ("pixel F1-max", 100, 1),
    "iou": ("IoU", 1, 3),
    "mean_iou": ("mean IoU (defective)", 1, 3),
    "fit_seconds": ("fit (s)", 1, 2),
    "predict_ms_per_image": ("predict (ms/image)", 1, 1),
    "backbone_ms_per_image": ("backbone forward (ms/image)", 1, 1),
    "predict_over_backbone": ("predict / backbone", 1, 2),
    "peak_rss_growth_mb": ("peak RSS growth (MB)", 1, 0),
    "cuda_peak_mb": ("CUDA peak allocated (MB)", 1, 0),
}
TABLE1_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")
SPEED_METRICS = ("fit_seconds", "predict_ms_per_image", "backbone_ms_per_image", "predict_over_backbone",
                 "peak_rss_growth_mb", "cuda_peak_mb")

# The paper's numbers, 1-shot setting, all 15 MVTec AD / 12 VisA categories: (mean, std) in percent.
PAPER_NAMES = {"spade": "SPADE", "padim": "PaDiM", "patchcore": "PatchCore", "winclip": "WinCLIP", "clad": "CLAD"}
PUBLISHED_TABLE1 = {
    "mvtec": {
        "spade": ((81.0, 2.0), (91.2, 0.4)),
        "padim": ((76.6, 3.1), (89.3, 0.9)),
        "patchcore": ((83.4, 3.0), (92.0, 1.0)),
        "winclip": ((93.1, 2.0), (95.2, 0.5)),
        "clad": ((94.1, 1.1), (95.3, 0.1)),
    },
    "visa": {
        "spade": ((79.5, 4.0), (95.6, 0.4)),
        "padim": ((62.8, 5.4), (89.9, 0.8)),
        "patchcore": ((79.9, 2.9), (95.4, 0.6)),
        "winclip": ((83.8, 4.0), (96.4, 0.4)),
        "clad": ((86.1, 1.1), (96.2, 0.1)),
    },
}
# Table 2 (MVTec AD), by the labels this tool recognises for the paper's ablations.
PUBLISHED_TABLE2 = {
    "clad": ("CLAD (full)", (94.1, 1.1), (95.3, 0.1)),
    "clad-no-contrastive": ("without contrastive loss", (88.5, 2.3), (91.2, 1.0)),
    "clad-no-finetune": ("without fine-tuning", (91.2, 2.0), (92.5, 0.8)),
    "clad-simple-cnn": ("simple CNN (no ViT)", (85.6, 3.1), (89.4, 1.3)),
}
PUBLISHED_TABLE3 = {"spade": 3.4, "padim": 3.7, "patchcore": 4.1, "winclip": 4.4, "clad": 4.6}
PUBLISHED_TABLE4 = {"spade": 0.63, "padim": 0.66, "patchcore": 0.72, "winclip": 0.75, "clad": 0.80}


# ------------------------------------------------------------------------------------------------- parsing


def resolve_categories(data_specs: Sequence[str], categories: str | Sequence[str]) -> dict[str, list[str | None]]:
    """Categories per dataset. ``all`` lists each dataset's; a list keeps, per dataset, the names it has.

    Folder datasets have one unnamed category (None). A listed name that no dataset has is an error.
    """
    from clad.data import list_categories

    wanted = None if categories in ("all", ["all"], None) else (
        split_top(categories, ",") if isinstance(categories, str) else list(categories))
    out, seen = {}, set()
    for spec in data_specs:
        if spec.startswith("folder:"):
            out[spec] = [None]
            continue
        have = list_categories(spec)
        cats = have if wanted is None else [c for c in wanted if c in have]
        seen.update(cats)
        out[spec] = cats
    if wanted is not None:
        missing = [c for c in wanted if c not in seen]
        if missing and any(not s.startswith("folder:") for s in data_specs):
            raise ValueError(f"--categories: {missing} not found in {', '.join(map(dataset_name, data_specs))}")
    return out


# --------------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Run:
    """One cell of the grid."""

    dataset: str
    category: str | None
    detector: DetectorSpec
    shots: int | None
    seed: int

    @property
    def category_name(self) -> str:
        if self.category is not None:
            return self.category
        return Path(self.dataset.partition(":")[2].split(",")[0]).name

    def detector_params(self) -> dict:
        """The parameters the detector is built with: the spec's, plus this run's seed and category."""
        return detector_params(self.detector.name, self.detector.params, seed=self.seed, category=self.category)

    def settings(self) -> dict:
        """Everything that determines this run's figures; its hash is the cache key."""
        import clad
        from clad.detectors.base import make_config
        from clad.registry import detector_class

        params = self.detector_params()
        try:  # the resolved config, so that a changed default is a different run
            config = make_config(detector_class(self.detector.name).Config, params, "")
            resolved = dataclasses.asdict(config)
        except Exception:  # noqa: BLE001 - the run itself reports the error; the key needs only the given params
            resolved = None
        else:  # a field that changes nothing at these values (metadata ``omit_from_key_when``) is left out
            for f in dataclasses.fields(config):
                when = f.metadata.get("omit_from_key_when")
                if when and all(resolved.get(k) == v for k, v in when.items()):
                    resolved.pop(f.name)
        return {
            "dataset": self.dataset,
            "category": self.category_name,
            "detector": self.detector.name,
            "params": _plain(params),
            "resolved_params": _plain(resolved),
            "shots": shots_text(self.shots),
            "seed": self.seed,
            "clad_version": clad.__version__,
        }

    def key(self, pixel_eval_size: int | None) -> str:
        doc = dict(self.settings(), pixel_eval_size=pixel_eval_size)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def filename(self, pixel_eval_size: int | None) -> str:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.category_name}-{self.detector.name}")
        return f"{slug}-shots{shots_text(self.shots)}-seed{self.seed}-{self.key(pixel_eval_size)}.json"

    def title(self) -> str:
        return (f"{dataset_name(self.dataset)}/{self.category_name} {self.detector.label} "
                f"shots={shots_text(self.shots)} seed={self.seed}")


def plan_runs(data_specs, categories: dict, detectors: Sequence[DetectorSpec], shots: Sequence, seeds) -> list[Run]:
    """The grid, category-major so that one category's test images are decoded once for all its runs, and the
    detectors of one (shots, seed) next to each other so that those of one fit share it (``Detector.adopt``)."""
    return [Run(d, c, det, s, seed) for d in data_specs for c in categories[d] for s in shots
            for seed in seeds for det in detectors]


def _plain(obj):
    """JSON-ready copy: numpy scalars and arrays to Python, tuples to lists, NaN/inf to None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _write_json(path: Path, doc) -> None:
    """Write atomically (temporary file + rename), so an interrupted bench never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_plain(doc), indent=1, allow_nan=False))
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def machine() -> dict:
    """Versions (clad.evaluate.environment) plus what the timings depend on: OS, CPUs, accelerator."""
    import torch

    from clad.evaluate import environment

    env = environment()
    env.update(platform=platform.platform(), cpu_count=os.cpu_count(),
               cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return env


# ------------------------------------------------------------------------------------------ measurement


def _rss_bytes() -> int | None:
    """Resident set size of this process now (Linux /proc), else None."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class PeakMemory:
    """Peak RSS while inside ``phase()`` blocks, sampled every ``interval`` s by a background thread.

    ``growth_mb``: the highest RSS seen during any phase minus the RSS just before the first phase. Where /proc is
    missing, the growth of ``ru_maxrss`` (the process high-water mark) is used instead, which reads 0 when an
    earlier run of the same process went higher. ``cuda_mb``: torch.cuda.max_memory_allocated over the phases.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.baseline = self.peak = None
        self._active = False
        self._stop = threading.Event()
        self._thread = None
        self._maxrss0 = None

    def __enter__(self):
        import resource

        import torch

        self._maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self._cuda = torch.cuda.is_available()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self):
        while not self._stop.wait(self.interval):
            if self._active:
                self._see()

    def _see(self):
        rss = _rss_bytes()
        if rss is not None:
            self.peak = rss if self.peak is None else max(self.peak, rss)

    def phase(self):
        meter = self

        class _Phase:
            def __enter__(self):
                if meter.baseline is None:
                    meter.baseline = _rss_bytes()
                meter._see()
                meter._active = True

            def __exit__(self, *exc):
                meter._see()
                meter._active = False

        return _Phase()

    def result(self) -> dict:
        import resource

        import torch

        if self.baseline is not None and self.peak is not None:
            growth, how = (self.peak - self.baseline) / 2**20, "sampled RSS"
        else:  # ru_maxrss is KiB on Linux
            growth, how = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._maxrss0) / 1024, "ru_maxrss"
        return {
            "peak_rss_growth_mb": growth,
            "peak_rss_mb": None if self.peak is None else self.peak / 2**20,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if self._cuda else None,
            "memory_method": how,
        }


class _Measured:
    """The detector as ``evaluate`` sees it, with fit and predict inside the memory meter's phases."""

    def __init__(self, detector, meter: PeakMemory):
        self._detector, self._meter = detector, meter

    def __getattr__(self, name):
        return getattr(self._detector, name)

    def fit(self, images):
        with self._meter.phase():
            self._detector.fit(images)
        return self

    def predict(self, images, **kwargs):
        with self._meter.phase():
            return self._detector.predict(images, **kwargs)


def time_backbone(spec: str, image_size: int | None, images: Sequence, batch_size: int = 16) -> dict:
    """The bare backbone's preprocess + forward over ``images`` at ``image_size``, batch ``batch_size``.

    One untimed warm-up batch first (the detector's backbone is already warm from fit). Returns ms per image.
    """
    import torch

    from clad.registry import create_backbone

    bb = create_backbone(spec)
    size = image_size or bb.default_size
    cuda = bb.device.type == "cuda"
    with torch.inference_mode():
        bb(bb.preprocess(images[:batch_size], size))
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(images), batch_size):
            bb(bb.preprocess(images[i : i + batch_size], size))
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {"backbone": spec, "image_size": size, "batch_size": batch_size, "n_images": len(images),
            "ms_per_image": 1000.0 * seconds / max(1, len(images))}


# ------------------------------------------------------------------------------------------------ running


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


def execute_run(run: Run, tests: _TestSplits, backbone_times: dict, bt_dir: Path | None, batch_size: int = 16,
                pixel_eval_size: int | None = 256, shared_fits: dict | None = None) -> dict:
    """Fit and evaluate one run; returns its record (status "ok"), or raises.

    shared_fits: fitted detectors of this (dataset, category, shots, seed) by ``fit_signature``; a detector that
    only differs from one of them in inference parameters (e.g. ``clad_plus`` after ``clad``) takes its fit, and
    its record gives that fit's time with ``fit_shared_with`` naming the run that paid for it.
    """
    from clad.data import open_dataset
    from clad.evaluate import evaluate
    from clad.registry import create_detector

    test_samples, test_failures = tests.get(run.dataset, run.category)
    train = open_dataset(run.dataset, run.category, "train", n_shots=run.shots, seed=run.seed)
    detector = create_detector(run.detector.name, **run.detector_params())
    source = None
    if shared_fits is not None:
        where = (run.dataset, run.category, run.shots, run.seed)
        if shared_fits.get("_where") != where:
            shared_fits.clear()
            shared_fits["_where"] = where
        source = shared_fits.get(detector.fit_signature())
    with PeakMemory() as meter:
        res = evaluate(_Measured(detector, meter), train, test_samples, batch_size=batch_size,
                       pixel_eval_size=pixel_eval_size, progress=False, keep_predictions=True,
                       fitted_from=None if source is None else source["detector"])
    if shared_fits is not None and source is None:
        shared_fits[detector.fit_signature()] = {"detector": detector, "fit_seconds": res["fit_seconds"],
                                                 "label": run.detector.label}
    pred = res.pop("_predictions")
    memory = meter.result()
    images = [s.image for s in pred["samples"]]
    params = res.pop("params")
    bb_spec, size = params.get("backbone"), params.get("image_size")
    bt = None
    if bb_spec:
        # The backbone's time belongs to the code and machine that measured it: a cached time from another
        # version (say, before a faster backbone) would make every ratio wrong.
        bt_key = hashlib.sha256(
            json.dumps([run.dataset, run.category, bb_spec, size, batch_size, machine()], sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        bt = backbone_times.get(bt_key)
        if bt is None and bt_dir is not None:
            bt = _read_json(bt_dir / f"{bt_key}.json")
        if bt is None:
            try:
                bt = time_backbone(bb_spec, size, images, batch_size)
            except Exception as e:  # noqa: BLE001 - the ratio is then missing, the run still counts
                bt = {"backbone": bb_spec, "image_size": size, "ms_per_image": None, "error": f"{type(e).__name__}: {e}"}
            if bt_dir is not None:
                _write_json(bt_dir / f"{bt_key}.json", dict(bt, dataset=run.dataset, category=run.category))
        backbone_times[bt_key] = bt
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
              progress: bool = True, argv: Sequence[str] | None = None, aux: str | None = None) -> dict:
    """Run (or take from the cache) every run of the grid, then write results.json, report.md and plots.

    ``aux``: a dataset spec of labelled defects that every detector taking an ``aux`` parameter (CLAD) also trains
    on, unless its spec sets one; the evaluated category itself is never used.

    Returns a summary: ``ran``, ``cached``, ``failed`` (counts for this invocation), ``interrupted``, the paths
    written and the ``records`` of every planned run that has one.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    data_specs = parse_data_specs(data)
    det_specs = parse_detector_specs(detectors)
    shot_list = parse_shots(shots)
    if runs < 1:
        raise ValueError(f"--runs must be >= 1, got {runs}")
    from clad.registry import detector_class

    for d in det_specs:
        detector_class(d.name)  # an unknown name is a typo: stop before running anything
    if aux:
        det_specs = with_aux(det_specs, aux)
    cats = resolve_categories(data_specs, categories)
    plan = plan_runs(data_specs, cats, det_specs, shot_list, range(runs))
    runs_dir, bt_dir = out / "runs", out / "backbone_times"
    runs_dir.mkdir(parents=True, exist_ok=True)
    env = machine()

    tests, backbone_times, records, shared_fits = _TestSplits(), {}, [], {}
    counts = {"ran": 0, "cached": 0, "failed": 0}
    interrupted = False
    bar = tqdm(plan, desc="bench", unit="run", disable=not progress, dynamic_ncols=True)
    try:
        for i, run in enumerate(bar, start=1):
            path = runs_dir / run.filename(pixel_eval_size)
            prefix = f"[{i}/{len(plan)}] {run.title()}:"
            cached = _read_json(path)
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
            _write_json(path, record)
            records.append(dict(_plain(record), file=str(path.relative_to(out))))
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
    return (f"image AUROC {_fmt(m.get('image_auroc'), 100, 1)}  pixel AUROC {_fmt(m.get('pixel_auroc'), 100, 1)}  "
            f"fit {_fmt(m.get('fit_seconds'), 1, 2)} s  predict {_fmt(m.get('predict_ms_per_image'), 1, 1)} ms/image"
            + (f" ({ratio:.1f}x backbone)" if ratio else ""))


# ------------------------------------------------------------------------------------------- aggregation


@dataclass
class Stat:
    """Mean +- sample std over seeds; ``n`` seeds used of ``n_seeds`` seen; ``values`` per seed used."""

    mean: float
    std: float
    n: int
    n_seeds: int
    values: dict = field(default_factory=dict)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else math.nan


def aggregate(records: Iterable[dict], metric: str, by: Sequence[str] = ("dataset", "label", "shots")) -> dict:
    """Group the run records by ``by`` (settings keys); per group, per seed, the mean over the group's categories.

    A seed counts only when every category of the group has an "ok" run of that seed with a finite value (so
    that no seed's average silently covers fewer categories); then mean +- std (ddof=1) over the seeds that count.
    Returns ``{group tuple: Stat}``; with ``category`` in ``by`` this is the per-category mean +- std over seeds.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r["settings"][k] for k in by), []).append(r)
    out = {}
    for g, recs in groups.items():
        categories = sorted({str(r["settings"]["category"]) for r in recs})
        seeds = sorted({r["settings"]["seed"] for r in recs})
        per_seed = {}
        for seed in seeds:
            vals = {}
            for r in recs:
                s = r["settings"]
                v = r.get("metrics", {}).get(metric) if r.get("status") == "ok" else None
                if s["seed"] == seed and _finite(v):
                    vals[str(s["category"])] = float(v)
            if len(vals) == len(categories):
                per_seed[seed] = float(np.mean([vals[c] for c in categories]))
        mean, std = _mean_std(list(per_seed.values()))
        out[g] = Stat(mean, std, len(per_seed), len(seeds), per_seed)
    return out


def _fmt(x, scale: float = 1, decimals: int = 1) -> str:
    return f"{x * scale:.{decimals}f}" if _finite(x) else "—"


def fmt_stat(st: Stat | None, metric: str) -> str:
    """``94.1 ± 1.1`` (percent for AUROC-like metrics); ``(k/N runs)`` when some seeds did not count."""
    if st is None or st.n == 0:
        return "—" if st is None else f"— (0/{st.n_seeds} runs)"
    _, scale, dec = METRICS.get(metric, (metric, 1, 3))
    text = _fmt(st.mean, scale, dec) + (f" ± {_fmt(st.std, scale, dec)}" if _finite(st.std) else "")
    return text + (f" ({st.n}/{st.n_seeds} runs)" if st.n < st.n_seeds else "")


def _pub(pair) -> str:
    return f"{pair[0]:.1f} ± {pair[1]:.1f}"


# --------------------------------------------------------------------------------------------- reporting

AGGREGATION_TEXT = (
    "Every figure in the tables below is aggregated the same way. For one dataset, detector and number of shots, "
    "each seed r (run r: seed r draws the reference images and seeds the detector) gives one value per category; "
    "the seed's value is the mean over the categories, computed only when every category's run of that seed "
    "succeeded with a finite value (otherwise the seed is left out and the cell says `(k/N runs)`). The cell is "
    "then mean ± sample standard deviation (ddof = 1) over the seeds that count. AUROC, AUPRO and F1-max are shown "
    "in percent. Per-category tables are mean ± std over the seeds of that category alone."
)
IOU_TEXT = (
    "IoU is |M ∩ G| / |M ∪ G| over all test pixels of a category (good and defective images together), where G is "
    "the ground-truth mask and M the anomaly map thresholded at the pixel F1-max threshold of that run (the "
    "threshold that maximises pixel F1 on the same test maps, so an oracle threshold chosen per category and "
    "run); mean IoU is the same per defective image, averaged. Maps and masks are compared at the pixel evaluation "
    "size (longer side {pes} px)."
)
SPEED_TEXT = (
    "fit (s): wall time of `fit` on the references; a detector that differs from another of the same seed only in "
    "inference parameters (`clad_plus` beside `clad`) takes that detector's fit (`Detector.adopt`, recorded as "
    "`fit_shared_with` in results.json) and shows its fit time, the time it would take alone. predict: wall time "
    "of `predict` over the test set (batch {bs}), per image, image decoding excluded. backbone forward: the bare backbone (`create_backbone(config."
    "backbone)`), preprocess + forward of all its feature maps at the detector's image size, batch {bs}, under "
    "`torch.inference_mode`, over the same test images, once per (dataset, category, backbone, image size) after "
    "one untimed warm-up batch; predict / backbone is the ratio of the two (1.0 = as fast as the bare backbone). "
    "Peak RSS growth: the highest resident set size of the process while inside `fit` or `predict` (sampled every "
    "5 ms from /proc/self/statm by a background thread) minus the resident size just before `fit`; it covers "
    "the model, memory bank, activations and any torch CPU allocation, but not memory that the process had "
    "already allocated and freed earlier (reused without growth), so later runs of one process can read lower. "
    "CUDA peak allocated is `torch.cuda.max_memory_allocated` over the run (only with a GPU). All on the machine "
    "named at the top, with the other processes that were running on it."
)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _kind(dataset: str) -> str:
    return dataset.partition(":")[0]


def build_tables(records: Sequence[dict], det_specs: Sequence[DetectorSpec]) -> dict:
    """Every aggregated figure, as JSON-ready rows (the markdown tables are made from these)."""
    order = {d.label: i for i, d in enumerate(det_specs)}
    plain = {d.label for d in det_specs if d.is_plain}

    def sort_key(g):
        *head, label, shots = g
        return (*head, order.get(label, 99), 10**6 if shots == "all" else int(shots))

    def stats(metrics, by):
        agg = {m: aggregate(records, m, by) for m in metrics}
        groups = sorted({g for a in agg.values() for g in a}, key=sort_key)
        return [(g, {m: agg[m].get(g) for m in metrics}) for g in groups]

    def row(g, st, by):
        out = dict(zip(by, g))
        for m, s in st.items():
            out[m] = None if s is None else {"mean": s.mean, "std": s.std, "n_runs": s.n, "n_seeds": s.n_seeds,
                                             "per_seed": s.values}
        return out

    by = ("dataset", "label", "shots")
    by_cat = ("dataset", "category", "label", "shots")
    table1 = stats(TABLE1_METRICS + ("iou", "mean_iou"), by)
    speed = stats(SPEED_METRICS, by)
    per_cat = stats(TABLE1_METRICS + ("iou",), by_cat)
    tables = {
        "table1": [row(g, st, by) for g, st in table1],
        "speed": [row(g, st, by) for g, st in speed],
        "per_category": [row(g, st, by_cat) for g, st in per_cat],
        "_raw": {"table1": table1, "speed": speed, "per_category": per_cat},
    }
    for r in tables["table1"]:
        spec = next((d for d in det_specs if d.label == r["label"]), None)
        pub = PUBLISHED_TABLE1.get(_kind(r["dataset"]), {}).get(r["label"]) if r["label"] in plain else None
        r["published_1shot"] = None if pub is None else {"image_auroc": pub[0], "pixel_auroc": pub[1]}
        r["detector"] = spec.name if spec else None
    return tables


def _ablation_labels(det_specs: Sequence[DetectorSpec]) -> list[str]:
    """CLAD and CLAD+ (full) first, then every ``clad`` / ``clad_plus`` variant with parameters or its own label."""
    family = ("clad", "clad_plus")
    full = [d.label for d in det_specs if d.name in family and d.is_plain]
    variants = [d.label for d in det_specs if d.name in family and not d.is_plain]
    return full + variants if variants else []


def render_report(records: Sequence[dict], settings: dict, env: dict, det_specs: Sequence[DetectorSpec],
                  plots: dict, n_planned: int, interrupted: bool) -> tuple[str, dict]:
    """The markdown report and the tables it shows."""
    tables = build_tables(records, det_specs)
    raw = tables.pop("_raw")
    pes, bs = settings.get("pixel_eval_size"), settings.get("batch_size")
    plain = {d.label for d in det_specs if d.is_plain}
    datasets = list(dict.fromkeys(r["settings"]["dataset"] for r in records))
    n_ok = sum(r.get("status") == "ok" for r in records)
    failed = [r for r in records if r.get("status") != "ok"]
    cats = settings.get("categories", {})

    md = ["# clad bench report", ""]
    md.append(f"clad {env.get('clad')}, torch {env.get('torch')}, Python {env.get('python')}, "
              f"{env.get('platform')}, {env.get('cpu_count')} CPU(s)"
              + (f", GPU {env['cuda']}" if env.get("cuda") else ", no GPU") + f", torch threads {env.get('torch_threads')}.")
    if settings.get("command"):
        md.append(f"\nCommand: `{' '.join(settings['command'])}`")
    md.append(f"\nRuns: {n_ok} ok, {len(failed)} failed, {n_planned - len(records)} not run, of {n_planned} planned"
              + (" — **the bench was interrupted; rerun the same command to finish it**." if interrupted else ".")
              + f" Seeds {settings.get('seeds')}. Every figure with its settings is in `results.json`; each run's "
              "record (settings, figures, scores, environment, error) is in `runs/`.")
    md.append("\nCategories run: " + "; ".join(f"{k}: {', '.join(str(c) for c in v) or '—'}" for k, v in cats.items())
              + ". **The paper's numbers cover all 15 MVTec AD / 12 VisA categories; ours cover only the categories "
              "run above**, so the two columns are comparable only when every category was run.")
    md += ["", "## How the numbers are aggregated", "", AGGREGATION_TEXT, ""]

    # Table 1
    md += ["## Table 1: detection and localisation", ""]
    for ds in datasets:
        rows = []
        for r, (g, st) in zip(tables["table1"], raw["table1"]):
            if r["dataset"] != ds:
                continue
            pub = r["published_1shot"] if r["shots"] == "1" else None
            rows.append([r["label"], r["shots"], *(fmt_stat(st[m], m) for m in TABLE1_METRICS),
                         f"{_pub(pub['image_auroc'])} / {_pub(pub['pixel_auroc'])}" if pub else "—"])
        md += [f"### {dataset_name(ds)}", "", f"`{ds}`", "",
               _md_table(["detector", "shots", *(METRICS[m][0] for m in TABLE1_METRICS),
                          f"image / pixel AUROC, {PUBLISHED_NOTE}"], rows), ""]
    kinds = {_kind(d) for d in datasets}
    pub_rows = [[PAPER_NAMES[n], *(f"{_pub(PUBLISHED_TABLE1[k][n][0])} / {_pub(PUBLISHED_TABLE1[k][n][1])}"
                                   for k in ("mvtec", "visa"))] for n in PAPER_NAMES]
    if kinds & {"mvtec", "visa"}:
        md += [f"All of the paper's Table 1 ({PUBLISHED_NOTE}; image / pixel AUROC, all categories), for reference; "
               "published numbers sit beside our rows only for the registry detector with its defaults "
               "(no parameters, no label) at 1 shot:", "",
               _md_table(["method", "MVTec AD", "VisA"], pub_rows), ""]

    # Table 2
    md += ["## Table 2: ablations", ""]
    ab = _ablation_labels(det_specs)
    if not ab:
        md += ["No ablation was run. Add `clad` variants to `--detectors`, e.g. "
               "`clad,clad[loss=supervised]@clad-no-contrastive,clad[finetune_stages=0;finetune_text_layers=0]"
               "@clad-no-finetune`.", ""]
    else:
        rows = []
        for r, (g, st) in zip(tables["table1"], raw["table1"]):
            if r["label"] not in ab:
                continue
            spec = next(d for d in det_specs if d.label == r["label"])
            pub = PUBLISHED_TABLE2.get(r["label"]) if _kind(r["dataset"]) == "mvtec" and r["shots"] == "1" else None
            full = {"clad": "CLAD (full)", "clad_plus": "CLAD+ (full)"}
            rows.append([dataset_name(r["dataset"]), full.get(r["label"], r["label"]) if r["label"] in plain else r["label"],
                         json.dumps(spec.params) if spec.params else "defaults", r["shots"],
                         fmt_stat(st["image_auroc"], "image_auroc"), fmt_stat(st["pixel_auroc"], "pixel_auroc"),
                         f"{pub[0]}: {_pub(pub[1])} / {_pub(pub[2])}" if pub else "—"])
        md += [_md_table(["dataset", "variant", "parameters", "shots", "image AUROC", "pixel AUROC",
                          f"image / pixel AUROC, {PUBLISHED_NOTE} (MVTec AD)"], rows), "",
               "Published ablation numbers sit beside the labels " + ", ".join(f"`{k}` ({v[0]})" for k, v in
                                                                              PUBLISHED_TABLE2.items())
               + "; other labels have none.", ""]

    # Table 3
    md += ["## Table 3: human rating of the maps", "",
           "Made separately: `clad bench --rating-sheet DIR ...` writes blind overlays and a sheet; each rater fills "
           "the `rating` column (1-5); `clad bench --ratings A.csv,B.csv --key DIR/key.json` makes the table. "
           f"{PUBLISHED_NOTE.capitalize()}: "
           + ", ".join(f"{PAPER_NAMES[k]} {v}" for k, v in PUBLISHED_TABLE3.items()) + ".", ""]

    # Table 4
    md += ["## Table 4: IoU of the thresholded maps", "", IOU_TEXT.format(pes=pes), ""]
    rows = []
    for r, (g, st) in zip(tables["table1"], raw["table1"]):
        pub = PUBLISHED_TABLE4.get(r["label"]) if (r["label"] in plain and r["shots"] == "1"
                                                  and _kind(r["dataset"]) == "mvtec") else None
        rows.append([dataset_name(r["dataset"]), r["label"], r["shots"], fmt_stat(st["iou"], "iou"),
                     fmt_stat(st["mean_iou"], "mean_iou"), f"{pub:.2f}" if pub is not None else "—"])
    md += [_md_table(["dataset", "detector", "shots", "IoU", "mean IoU (defective)", f"IoU, {PUBLISHED_NOTE}"], rows),
           "", "Published IoU: " + ", ".join(f"{PAPER_NAMES[k]} {v:.2f}" for k, v in PUBLISHED_TABLE4.items())
           + " (shown beside our MVTec AD rows).", ""]

    # speed and memory
    md += ["## Speed and memory", "", SPEED_TEXT.format(bs=bs), ""]
    speed_metrics = [m for m in SPEED_METRICS if m != "cuda_peak_mb"
                     or any(_finite(r.get("metrics", {}).get(m)) for r in records)]  # no GPU: no CUDA column
    rows = []
    for r, (g, st) in zip(tables["speed"], raw["speed"]):
        spec_rec = next((x for x in records if x["settings"]["label"] == r["label"] and x.get("status") == "ok"
                         and x["settings"]["dataset"] == r["dataset"]), None)
        bb = f"{spec_rec.get('backbone')} @ {spec_rec.get('image_size')}" if spec_rec else "—"
        rows.append([dataset_name(r["dataset"]), r["label"], r["shots"], bb, *(fmt_stat(st[m], m) for m in speed_metrics)])
    md += [_md_table(["dataset", "detector", "shots", "backbone @ size", *(METRICS[m][0] for m in speed_metrics)], rows), ""]

    # per category
    md += ["## Per-category results", ""]
    for ds in datasets:
        rows = []
        for r, (g, st) in zip(tables["per_category"], raw["per_category"]):
            if r["dataset"] != ds:
                continue
            n_fail = sum(1 for x in failed if (x["settings"]["dataset"], str(x["settings"]["category"]),
                                                x["settings"]["label"], x["settings"]["shots"]) ==
                         (ds, str(r["category"]), r["label"], r["shots"]))
            rows.append([r["category"], r["label"], r["shots"], *(fmt_stat(st[m], m) for m in TABLE1_METRICS + ("iou",)),
                         f"**{n_fail} failed**" if n_fail else ""])
        md += [f"### {dataset_name(ds)}", "",
               _md_table(["category", "detector", "shots", *(METRICS[m][0] for m in TABLE1_METRICS + ("iou",)), "failed"],
                         rows), ""]

    # plots
    if plots:
        md += ["## Plots", ""]
        for (ds, cat), files in plots.items():
            links = " · ".join(f"[{Path(f).stem.split('__')[-1]}]({f})" for f in files)
            md.append(f"- {dataset_name(ds)} / {cat}: {links}")
        md.append("")
        for (ds, cat), files in plots.items():
            md += [f"![{dataset_name(ds)} {cat}]({files[0]})", ""]

    # failures
    md += ["## Failed runs", ""]
    if not failed:
        md += ["None.", ""]
    else:
        md += [_md_table(["run", "error", "record"],
                         [[f"{dataset_name(x['settings']['dataset'])}/{x['settings']['category']} {x['settings']['label']} "
                           f"shots={x['settings']['shots']} seed={x['settings']['seed']}",
                           (x.get("error") or "").splitlines()[0].replace("|", "\\|")[:300], f"[json]({x['file']})"]
                          for x in failed]), "",
               "A failed run is retried by the next invocation of the same command.", ""]
    return "\n".join(md), tables


def write_plots(out: Path, records: Sequence[dict], det_specs: Sequence[DetectorSpec]) -> dict:
    """Per (dataset, category): AUROC bars with std error bars, and image ROC curves (lowest ok seed) per shots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    order = {d.label: i for i, d in enumerate(det_specs)}
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    by = ("dataset", "category", "label", "shots")
    img, pix = aggregate(records, "image_auroc", by), aggregate(records, "pixel_auroc", by)
    files: dict[tuple, list[str]] = {}
    for ds, cat in dict.fromkeys((r["settings"]["dataset"], r["settings"]["category"]) for r in records):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dataset_name(ds)}__{cat}")
        groups = sorted({g[2:] for g in img if g[:2] == (ds, cat)},
                        key=lambda x: (order.get(x[0], 99), 10**6 if x[1] == "all" else int(x[1])))
        if not groups:
            continue
        names = [lab if len({s for _, s in groups}) == 1 else f"{lab}\n{s}-shot" for lab, s in groups]
        x = np.arange(len(groups))
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(groups) + 1.5), 3.4), dpi=100)
        for off, agg, name, colour in ((-0.2, img, "image AUROC", "tab:blue"), (0.2, pix, "pixel AUROC", "tab:orange")):
            st = [agg.get((ds, cat, *g)) for g in groups]
            means = [100 * s.mean if s and s.n else np.nan for s in st]
            errs = [100 * s.std if s and s.n > 1 else 0.0 for s in st]
            ax.bar(x + off, means, 0.4, yerr=errs, capsize=3, label=name, color=colour)
        for xi, g in zip(x, groups):
            st = img.get((ds, cat, *g))
            if st is None or st.n == 0:
                ax.text(xi, 3, "no finished run", rotation=90, ha="center", va="bottom", fontsize=7, color="tab:red")
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylabel("AUROC (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{dataset_name(ds)} / {cat} (mean ± std over seeds)", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        name = f"plots/{slug}__auroc.png"
        fig.savefig(out / name)
        plt.close(fig)
        files[(ds, cat)] = [name]
        for shots in dict.fromkeys(s for _, s in groups):
            fig, ax = plt.subplots(figsize=(3.8, 3.6), dpi=100)
            drawn = False
            for lab in dict.fromkeys(lab for lab, s in groups if s == shots):
                runs = sorted((r for r in records if r.get("status") == "ok" and r.get("predictions")
                               and (r["settings"]["dataset"], r["settings"]["category"], r["settings"]["label"],
                                    r["settings"]["shots"]) == (ds, cat, lab, shots)),
                              key=lambda r: r["settings"]["seed"])
                if not runs:
                    continue
                p = runs[0]["predictions"]
                y = np.asarray(p["labels"])
                if y.min() == y.max():
                    continue
                fpr, tpr, _ = roc_curve(y, np.asarray(p["scores"], dtype=np.float64))
                auc = runs[0]["metrics"].get("image_auroc")
                ax.plot(fpr, tpr, label=f"{lab} (seed {runs[0]['settings']['seed']}, {_fmt(auc, 100, 1)})")
                drawn = True
            if not drawn:
                plt.close(fig)
                continue
            ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1)
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.set_title(f"{cat}, {shots}-shot, image ROC", fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
            fig.tight_layout()
            name = f"plots/{slug}__roc_{shots}shot.png"
            fig.savefig(out / name)
            plt.close(fig)
            files[(ds, cat)].append(name)
    return files


def write_outputs(out: Path, records: Sequence[dict], settings: dict, env: dict, det_specs: Sequence[DetectorSpec],
                  n_planned: int, plots: bool = True, interrupted: bool = False) -> dict:
    """results.json, report.md and plots/*.png from the run records."""
    plot_files = write_plots(out, records, det_specs) if plots and records else {}
    md, tables = render_report(records, settings, env, det_specs, plot_files, n_planned, interrupted)
    (out / "report.md").write_text(md)
    doc = {
        "format": RESULTS_FORMAT,
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings,
        "environment": env,
        "aggregation": AGGREGATION_TEXT,
        "iou_threshold_rule": IOU_TEXT.format(pes=settings.get("pixel_eval_size")),
        "speed_and_memory": SPEED_TEXT.format(bs=settings.get("batch_size")),
        "tables": tables,
        "published": {"note": PUBLISHED_NOTE + "; all 15 MVTec AD / 12 VisA categories; AUROC in percent",
                      "table1": PUBLISHED_TABLE1, "table2": PUBLISHED_TABLE2, "table3": PUBLISHED_TABLE3,
                      "table4": PUBLISHED_TABLE4},
        "plots": {f"{dataset_name(k[0])}/{k[1]}": v for k, v in plot_files.items()},
        "runs": records,
    }
    _write_json(out / "results.json", doc)
    return {"results": str(out / "results.json"), "report": str(out / "report.md"),
            "plots": [f for v in plot_files.values() for f in v]}


# ------------------------------------------------------------------------------------- human rating (Table 3)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def export_rating_sheet(out: str | Path, data, categories="all", detectors="patchcore", shots="1",
                        n_images: int = 20, seed: int = 0, scale: str = "per_map", batch_size: int = 16) -> dict:
    """Blind overlays of each detector's map on a seeded sample of defective test images, and a sheet to fill.

    Per (dataset, category): every detector is fitted on ``shots`` references drawn with ``seed`` (and seeded with
    it); ``n_images`` defective test images are drawn with ``seed``. For each image and detector,
    ``images/<image_id>_<letter>.png``, the letters shuffled per image (seeded) so the detector is hidden;
    ``ground_truth/<image_id>.png`` outlines the true defect in red. ``sheet.csv`` lists (image_id, option, rating
    (blank), ground_truth, image); ``key.json`` maps each (image_id, option) to the detector label: keep it away
    from the raters.

    scale: "per_map" (default) min-max scales each map over its own image before colouring, so every option of an
    image is drawn on the same [0, 1] colour scale whatever its detector's score units (raw scores of different
    detectors are not comparable, and one shared raw range would blank the maps of the detectors with small
    scores); "shared" colours every option of an image with the min and max of the raw maps of all its options.
    """
    from clad.data import open_dataset
    from clad.evaluate import load_split
    from clad.registry import create_detector
    from clad.viz import draw_contour, overlay, save_png

    if scale not in ("per_map", "shared"):
        raise ValueError(f"scale must be 'per_map' or 'shared', got {scale!r}")
    out = Path(out)
    data_specs = parse_data_specs(data)
    det_specs = parse_detector_specs(detectors)
    if len(det_specs) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} detectors per sheet")
    n_shots = parse_shots(shots)[0]
    cats = resolve_categories(data_specs, categories)
    rows, key = [], {}
    for ds in data_specs:
        for cat in cats[ds]:
            test = open_dataset(ds, cat, "test")
            defective = np.flatnonzero(test.labels == 1)
            if not len(defective):
                continue
            rng = np.random.default_rng(seed)
            pick = np.sort(rng.choice(defective, size=min(n_images, len(defective)), replace=False))
            samples, failures = load_split(_Subset(test, pick), progress=False)
            for f in failures:
                print(f"skipped {f['path']}: {f['error']}", file=sys.stderr)
            train_samples, _ = load_split(open_dataset(ds, cat, "train", n_shots=n_shots, seed=seed), progress=False)
            maps = {}
            for spec in det_specs:
                run = Run(ds, cat, spec, n_shots, seed)
                det = create_detector(spec.name, **run.detector_params()).fit([s.image for s in train_samples])
                maps[spec.label] = det.predict([s.image for s in samples], batch_size=batch_size).anomaly_maps
                print(f"rating sheet: {dataset_name(ds)}/{run.category_name}: {spec.label} fitted and applied")
            for j, s in enumerate(samples):
                cat_name = Run(ds, cat, det_specs[0], n_shots, seed).category_name
                image_id = re.sub(r"[^A-Za-z0-9_.-]+", "_",
                                  f"{_kind(ds)}-{cat_name}-{s.defect_type}-{Path(s.path).stem}")
                gt = f"ground_truth/{image_id}.png"
                save_png(draw_contour(s.image, s.mask, colour=(255, 0, 0), width=2), out / gt)
                order = np.random.default_rng([seed, len(key)]).permutation(len(det_specs))  # hides the detector
                raw = [maps[det_specs[k].label][j] for k in range(len(det_specs))]
                lo, hi = float(min(m.min() for m in raw)), float(max(m.max() for m in raw))
                key[image_id] = {}
                for letter, k in zip(LETTERS, order):
                    amap = maps[det_specs[k].label][j]
                    if scale == "per_map":
                        amap = (amap - amap.min()) / max(float(amap.max() - amap.min()), 1e-12)
                        vmin, vmax = 0.0, 1.0
                    else:
                        vmin, vmax = lo, hi
                    name = f"images/{image_id}_{letter}.png"
                    save_png(overlay(s.image, amap, vmin, vmax), out / name)
                    key[image_id][letter] = det_specs[k].label
                    rows.append({"image_id": image_id, "option": letter, "rating": "", "ground_truth": gt,
                                 "image": name})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sheet.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image_id", "option", "rating", "ground_truth", "image"])
        w.writeheader()
        w.writerows(rows)
    _write_json(out / "key.json", {
        "format": KEY_FORMAT,
        "settings": {"data": data_specs, "categories": {dataset_name(k): v for k, v in cats.items()},
                     "detectors": [dataclasses.asdict(d) for d in det_specs], "shots": shots_text(n_shots),
                     "n_images": n_images, "seed": seed, "scale": scale},
        "options": key,
    })
    print(f"rating sheet: {len(key)} image(s) x {len(det_specs)} option(s) -> {out / 'sheet.csv'}; "
          f"the key is {out / 'key.json'}: keep it from the raters")
    return {"sheet": str(out / "sheet.csv"), "key": str(out / "key.json"), "n_images": len(key), "rows": rows}


class _Subset:
    """Samples ``indices`` of a dataset, lazily, with their paths (for load_split's failure messages)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        self.paths = [dataset.paths[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


def import_ratings(sheets: str | Sequence[str], key_path: str | Path) -> dict:
    """Filled sheets (one CSV per rater) + key.json -> per detector: mean, std (ddof=1), raters, images.

    Each non-blank rating must be an integer 1-5; blank ones are skipped (counted as ``n_blank``). Mean and std
    are over all individual ratings of the detector (every rater, every image).
    """
    from clad.errors import ConfigError

    paths = split_top(sheets, ",") if isinstance(sheets, str) else [str(s) for s in sheets]
    key = _read_json(Path(key_path))
    if not key or key.get("format") != KEY_FORMAT:
        raise ConfigError(f"{key_path}: not a rating key written by `clad bench --rating-sheet`")
    options = key["options"]
    labels = list(dict.fromkeys(d["label"] for d in key["settings"]["detectors"]))
    ratings: dict[str, list[tuple[str, str, int]]] = {lab: [] for lab in labels}
    n_blank = 0
    for p in paths:
        rater = Path(p).stem
        with open(p, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"image_id", "option", "rating"} - set(reader.fieldnames or [])
            if missing:
                raise ConfigError(f"{p}: missing column(s) {sorted(missing)}")
            for line, row in enumerate(reader, start=2):
                text = (row["rating"] or "").strip()
                if not text:
                    n_blank += 1
                    continue
                label = options.get(row["image_id"], {}).get(row["option"])
                if label is None:
                    raise ConfigError(f"{p}, line {line}: image {row['image_id']!r} option {row['option']!r} "
                                      "is not in the key")
                try:
                    value = float(text)
                except ValueError:
                    value = math.nan
                if not (value == int(value) if math.isfinite(value) else False) or not 1 <= value <= 5:
                    raise ConfigError(f"{p}, line {line}: rating must be an integer 1-5, got {text!r}")
                ratings[label].append((rater, row["image_id"], int(value)))
    rows = []
    for lab in labels:
        vals = [v for _, _, v in ratings[lab]]
        mean, std = _mean_std(vals)
        rows.append({"detector": lab, "mean": mean, "std": std, "n_ratings": len(vals),
                     "n_raters": len({r for r, _, _ in ratings[lab]}), "n_images": len({i for _, i, _ in ratings[lab]}),
                     "published": PUBLISHED_TABLE3.get(lab)})
    return {"rows": rows, "n_blank": n_blank, "sheets": paths, "key": str(key_path)}


def ratings_markdown(table: dict) -> str:
    rows = [[r["detector"], _fmt(r["mean"], 1, 2), _fmt(r["std"], 1, 2), r["n_raters"], r["n_images"],
             r["n_ratings"], "—" if r["published"] is None else f"{r['published']:.1f}"] for r in table["rows"]]
    return "\n".join([
        "## Table 3: human rating of the anomaly maps (1 = useless, 5 = exact)", "",
        _md_table(["detector", "mean", "std", "raters", "images", "ratings", f"mean, {PUBLISHED_NOTE}"], rows), "",
        f"Mean and sample std (ddof = 1) over every individual rating of the detector. Sheets: "
        f"{', '.join(Path(s).name for s in table['sheets'])}; {table['n_blank']} blank rating(s) skipped. "
        "The paper's ratings cover its own images and raters.", ""])


# ------------------------------------------------------------------------------------------ command line


def add_parser(sub) -> None:
    """Add ``clad bench`` to the ``clad`` command's subparsers."""
    p = sub.add_parser(
        "bench", help="run the paper's benchmark grid (cached, resumable) and write its tables",
        description="Three modes: the benchmark (--out), a blind rating sheet (--rating-sheet) and the rating "
                    "table from filled sheets (--ratings + --key).")
    p.add_argument("--data", help="comma-separated datasets: mvtec:ROOT, visa:ROOT, folder:GOOD[,DEFECT[,MASKS]]")
    p.add_argument("--categories", default="all", help="'all' (default) or a comma-separated list")
    p.add_argument("--detectors", default="clad,patchcore,padim,spade",
                   help="comma-separated NAME[key=value;key=value]@LABEL, e.g. "
                        "'clad,clad[loss=supervised]@clad-no-contrastive,patchcore' (default clad,patchcore,padim,spade)")
    p.add_argument("--shots", default="1", help="comma-separated reference counts or 'all' (default 1)")
    p.add_argument("--runs", type=int, default=5, help="runs per cell; run r uses seed r (default 5)")
    p.add_argument("--out", help="bench folder: runs/ (cache), results.json, report.md, plots/")
    p.add_argument("--aux", metavar="SPEC", help="labelled defects of other categories for CLAD to train on too, "
                   "e.g. mvtec:ROOT (the evaluated category is always left out)")
    p.add_argument("--batch-size", type=int, default=16, help="predict and backbone-timing batch (default 16)")
    p.add_argument("--pixel-eval-size", type=int, default=256, help="longer side for pixel metrics (0 = native)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--rating-sheet", metavar="DIR", help="write a blind human-rating sheet to DIR instead")
    p.add_argument("--n-images", type=int, default=20, help="defective images per category in the sheet (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the rating sheet's references and images (default 0)")
    p.add_argument("--rating-scale", choices=("per_map", "shared"), default="per_map",
                   help="overlay colour scale in the sheet (default per_map; see clad.bench.export_rating_sheet)")
    p.add_argument("--ratings", metavar="CSV[,CSV...]", help="filled sheets, one per rater: print Table 3")
    p.add_argument("--key", help="key.json of the rating sheet (with --ratings)")
    p.set_defaults(func=cmd_bench)


def _command(args) -> list[str]:
    """The bench command line, rebuilt from the parsed arguments (recorded in results.json and the report)."""
    out = ["bench", "--data", args.data, "--categories", args.categories, "--detectors", args.detectors,
           "--shots", args.shots, "--runs", str(args.runs), "--out", args.out]
    if args.batch_size != 16:
        out += ["--batch-size", str(args.batch_size)]
    if args.pixel_eval_size != 256:
        out += ["--pixel-eval-size", str(args.pixel_eval_size or 0)]
    if args.aux:
        out += ["--aux", args.aux]
    return [f"'{a}'" if re.search(r"[\s\[\];@]", a) else a for a in out]


def cmd_bench(args) -> int:
    pes = args.pixel_eval_size or None
    try:
        if args.ratings:
            if not args.key:
                raise SystemExit("clad bench: --ratings needs --key KEY.json")
            table = import_ratings(args.ratings, args.key)
            md = ratings_markdown(table)
            print(md)
            dest = Path(args.out) / "table3.md" if args.out else Path(args.key).with_name("table3.md")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(md)
            print(f"written {dest}")
            return 0
        if not args.data:
            raise SystemExit("clad bench: --data is needed")
        if args.rating_sheet:
            export_rating_sheet(args.rating_sheet, args.data, args.categories, args.detectors, args.shots,
                                n_images=args.n_images, seed=args.seed, scale=args.rating_scale,
                                batch_size=args.batch_size)
            return 0
        if not args.out:
            raise SystemExit("clad bench: --out DIR is needed (or --rating-sheet DIR, or --ratings with --key)")
        summary = run_bench(args.out, args.data, args.categories, args.detectors, args.shots, args.runs,
                            batch_size=args.batch_size, pixel_eval_size=pes, plots=not args.no_plots,
                            argv=_command(args), aux=args.aux)
    except ValueError as e:  # bad --data/--detectors/--shots/--categories: say which, no traceback
        raise SystemExit(f"clad bench: {e}") from None
    if summary["interrupted"]:
        return 130
    return 1 if summary["failed"] else 0
