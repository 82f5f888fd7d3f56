"""Running the grid: each run fitted and evaluated once, its record cached in ``runs/``, the outputs written.

A finished run is one JSON file ``DIR/runs/<category>-<detector>-shots<n>-seed<r>-<key>.json`` (``Run.filename``);
a rerun skips the runs it finds there, so an interrupted bench goes on where it stopped. A run that raises is
recorded with its error and traceback tail, and retried by the next invocation. Ctrl-C or SIGTERM (under
``clad.pipeline.outputs.stop_on_signals``) stops between two writes: every finished run stays cached, the run in
progress leaves nothing, and the tables are written from the finished ones. Detectors of one (dataset,
category, shots, seed) that differ only in inference parameters share one fit (``fit_signature`` / ``adopt``).

Two engines run the runs that are not cached: ``local`` runs them one after the other in this process; ``ray``
(``clad.cluster.grid``) runs each group of runs that share a fit (``fit_groups``) as one Ray task. Both go through
``run_runs`` (one run's record) and the same planning, cache, failure records and outputs here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
import traceback
from pathlib import Path
from typing import Iterator, Sequence

from clad.bench.aggregate import fmt_value
from clad.bench.files import plain, read_json, write_json
from clad.bench.measure import MeasuredDetector, PeakMemory, backbone_time, machine
from clad.bench.plan import Run, plan_runs, resolve_categories
from clad.bench.render import write_outputs
from clad.errors import SpecError
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
        "fit_report": res.get("fit_report") or None,
        "failures": res.get("failures", []) + test_failures,
        "predictions": {
            "paths": [s.path for s in pred["samples"]],
            "labels": [int(s.label) for s in pred["samples"]],
            "scores": [float(x) for x in pred["result"].scores],
        },
    }


def run_runs(runs: Sequence[tuple[int, Run]], tests: _TestSplits, backbone_times: dict, bt_dir: Path | None,
             batch_size: int, pixel_eval_size: int | None, env: dict) -> Iterator[tuple[int, dict]]:
    """The record of each ``(plan index, run)``, in order: ``execute_run``'s figures with status "ok", or the
    error and traceback tail with status "failed"; both with the run's settings, ``environment`` and ``seconds``.

    Runs in one call share fits (``_SharedFits``) and decoded test splits. Both engines make records here only.
    """
    shared_fits = _SharedFits()
    for i, run in runs:
        record = _header(run, pixel_eval_size, batch_size, env)
        t0 = time.perf_counter()
        try:
            record.update(execute_run(run, tests, backbone_times, bt_dir, batch_size, pixel_eval_size, shared_fits))
            record["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - one failing run must not stop the others
            record.update(_failure(e))
        record["seconds"] = time.perf_counter() - t0
        yield i, record


def _header(run: Run, pixel_eval_size: int | None, batch_size: int, env: dict) -> dict:
    return {"format": RUN_FORMAT, "key": run.key(pixel_eval_size),
            "settings": dict(run.settings(), label=run.detector.label, pixel_eval_size=pixel_eval_size,
                             batch_size=batch_size),
            "environment": env, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _failure(e: BaseException) -> dict:
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return {"status": "failed", "error": f"{type(e).__name__}: {e}",
            "traceback": "".join("".join(tb).splitlines(keepends=True)[-15:])}


def fit_groups(runs: Sequence[tuple[int, Run]]) -> list[list[tuple[int, Run]]]:
    """The runs (in plan order) cut into groups that share a fit: same (dataset, category, shots, seed) and
    ``Detector.fit_signature`` (e.g. clad and clad_plus; a detector's clean and corrupted runs). The ray engine
    runs each group as one task, so a fit is shared exactly as in the local engine. A detector that cannot be
    built is a group of its own (its run fails there, with the error)."""
    from clad.registry import create_detector

    groups: dict = {}
    for i, run in runs:
        try:
            signature = create_detector(run.detector.name, **run.detector_params()).fit_signature()
        except Exception:  # noqa: BLE001 - execute_run records the error
            signature = i
        groups.setdefault((run.dataset, run.category, run.shots, run.seed, signature), []).append((i, run))
    return list(groups.values())


_WORKER_TESTS: _TestSplits | None = None  # a Ray worker's last decoded test split, kept for its next task
_WORKER_BACKBONE_TIMES: dict = {}  # the backbone times a Ray worker measured or was given, for its next tasks


def run_group(runs: Sequence[tuple[int, Run]], known_backbone_times: dict, batch_size: int,
              pixel_eval_size: int | None, threads: int | None = None) -> dict:
    """One Ray task: ``run_runs`` over one ``fit_groups`` group, with ``threads`` threads (its CPUs) for torch and
    for numpy's BLAS.

    Test splits: each worker process keeps the last one it decoded (tasks go out category-major, so a worker
    mostly meets the same category again), decoding another when a task brings another category. The records
    and the backbone times measured here (``backbone_times``: file name -> document) go back to the driver,
    which writes them, so the bench folder need only exist where the driver runs; ``known_backbone_times`` are
    the driver's (same file names), so a backbone is not timed again; the tasks go out before the first times come
    back, so each worker also keeps the times it measured for its next tasks (else every task of a category timed
    its backbone again: 8 timings instead of 2 in a grid of 8 runs over 2 categories).
    """
    import tempfile

    import torch
    from threadpoolctl import threadpool_limits

    global _WORKER_TESTS
    if threads:
        torch.set_num_threads(threads)
    if _WORKER_TESTS is None:
        _WORKER_TESTS = _TestSplits()
    _WORKER_BACKBONE_TIMES.update({Path(name).stem: doc for name, doc in known_backbone_times.items()})
    with threadpool_limits(threads), tempfile.TemporaryDirectory(prefix="clad-bench-") as tmp:
        records = list(run_runs(runs, _WORKER_TESTS, _WORKER_BACKBONE_TIMES, Path(tmp), batch_size, pixel_eval_size,
                                machine()))
        measured = {p.name: read_json(p) for p in Path(tmp).glob("*.json")}
    return {"records": records, "backbone_times": measured}


def run_bench(out: str | Path, data, categories="all", detectors="patchcore", shots="1", runs: int = 5,
              batch_size: int = 16, pixel_eval_size: int | None = 256, plots: bool = True,
              progress: bool = True, argv: Sequence[str] | None = None, aux: str | None = None,
              corruptions: str | None = None, engine: str = "local", address: str | None = None,
              num_cpus: int | None = None, cpus_per_run: int = 1) -> dict:
    """Run (or take from the cache) every run of the grid, then write results.json, report.md and plots.

    ``aux``: a dataset spec of labelled defects that every detector taking an ``aux`` parameter (CLAD) also trains
    on, unless its spec sets one; the evaluated category itself is never used.
    ``corruptions``: ``name:severity,...`` or ``all`` (``clad.data.corruptions.parse_corruptions``): every cell is
    also evaluated on its test split under each of them, on the same fit, and the report adds a robustness table.
    ``engine``: ``local`` (this process, one run after another) or ``ray``: each group of runs sharing a fit is a
    Ray task of ``cpus_per_run`` CPUs (and as many torch threads) on the cluster that ``clad.cluster.connect``
    joins at ``address`` or starts with ``num_cpus`` (then shut down at the end). Records are written here as
    tasks finish; an interrupt cancels the tasks still running.

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
    if engine not in ("local", "ray"):
        raise SpecError(f"--engine must be local or ray, got {engine!r}")
    if engine == "local" and (address is not None or num_cpus is not None or cpus_per_run != 1):
        raise SpecError("--address, --num-cpus and --cpus-per-run are for --engine ray")
    from clad.registry import detector_class

    for d in det_specs:
        detector_class(d.name)  # an unknown name is a typo: stop before running anything
    if aux:
        det_specs = with_aux(det_specs, aux)
    cats = resolve_categories(data_specs, categories)
    plan = plan_runs(data_specs, cats, det_specs, shot_list, range(runs), corruption_list)
    runs_dir, bt_dir = out / "runs", out / "backbone_times"
    runs_dir.mkdir(parents=True, exist_ok=True)
    cluster = None
    if engine == "ray":
        from clad.cluster.grid import RayGrid

        cluster = RayGrid(address, num_cpus, cpus_per_run)  # before anything runs: a bad address fails now
    env = machine()

    records, counts, pending = {}, {"ran": 0, "cached": 0, "failed": 0}, []
    interrupted = False
    bar = tqdm(total=len(plan), desc="bench", unit="run", disable=not progress, dynamic_ncols=True)

    def prefix(i: int, run: Run) -> str:
        return f"[{i}/{len(plan)}] {run.title()}:"

    def finish(i: int, record: dict) -> None:
        run = plan[i - 1]
        path = runs_dir / run.filename(pixel_eval_size)
        write_json(path, record)
        records[i] = dict(plain(record), file=str(path.relative_to(out)))
        counts["ran" if record["status"] == "ok" else "failed"] += 1
        bar.update()
        tqdm.write(f"{prefix(i, run)}{retried.get(i, '')} {_summary_line(record)}")

    retried = {}
    try:
        for i, run in enumerate(plan, start=1):
            path = runs_dir / run.filename(pixel_eval_size)
            cached = read_json(path)
            if cached and cached.get("format") == RUN_FORMAT and cached.get("status") == "ok":
                cached["settings"]["label"] = run.detector.label
                records[i] = dict(cached, file=str(path.relative_to(out)))
                counts["cached"] += 1
                bar.update()
                tqdm.write(f"{prefix(i, run)} cached")
                continue
            if cached and cached.get("status") == "failed":
                retried[i] = " (failed before, retrying)"
            pending.append((i, run))
        if cluster is None:
            for i, record in run_runs(pending, _TestSplits(), {}, bt_dir, batch_size, pixel_eval_size, env):
                finish(i, record)
        elif pending:
            known = {p.name: read_json(p) for p in bt_dir.glob("*.json")}
            groups = fit_groups(pending)
            tasks = [(group, known, batch_size, pixel_eval_size, cpus_per_run) for group in groups]
            with contextlib.closing(cluster.run(run_group, tasks)) as results:  # closed: the rest is cancelled
                for g, result, error in results:
                    if error is not None:  # the task itself failed (a worker that died, say)
                        result = {"records": [(i, dict(_header(run, pixel_eval_size, batch_size, env),
                                                       seconds=None, **_failure(error))) for i, run in groups[g]],
                                  "backbone_times": {}}
                    for name, doc in result["backbone_times"].items():
                        write_json(bt_dir / name, doc)
                    for i, record in result["records"]:
                        finish(i, record)
    except KeyboardInterrupt:
        interrupted = True
        tqdm.write("interrupted: finished runs are cached; run the same command again to go on")
    finally:
        bar.close()
        if cluster is not None:
            cluster.close()

    records = [records[i] for i in sorted(records)]
    command = ["clad", *argv] if argv is not None else None
    settings = {"data": data_specs, "categories": {dataset_name(k): v for k, v in cats.items()},
                "detectors": [dataclasses.asdict(d) for d in det_specs], "shots": [shots_text(s) for s in shot_list],
                "runs": runs, "seeds": list(range(runs)), "batch_size": batch_size,
                "pixel_eval_size": pixel_eval_size, "command": command}
    if corruption_list:
        settings["corruptions"] = [f"{n}:{s}" for n, s in corruption_list]
    if cluster is not None:  # only then: a local bench's results.json is as it was
        settings["engine"] = cluster.description
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
