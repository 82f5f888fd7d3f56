"""The benchmark grid on Ray against the local engine: wall times, Ray's start-up and overhead, on this machine.

    nice -n 5 python benchmarks/ray_grid.py                  # bottle and magnetic tile, patchcore and padim,
                                                              # shots 1 and 4, seed 0: 8 cells, three engines
    python benchmarks/ray_grid.py --categories bottle --detectors 'patchcore[backbone=tiny_cnn;image_size=64]' \\
        --shots 1 --engines local,ray:1                       # a smoke run

One invocation runs the same grid (``clad bench``'s ``run_bench``) with each engine of ``--engines``, each into a
fresh bench folder (nothing cached) and, for Ray, on a fresh local cluster of N CPUs (``ray:N``; each run a task of
``--cpus-per-run`` CPUs and as many threads, torch's and numpy's BLAS's). The local engine runs the cells one after
another in this process with the default threads (``local:N``: N threads, torch's and numpy's BLAS's). For each
engine it prints:

- start-up: ``clad.cluster.connect`` starting the local cluster (Ray only);
- grid wall: ``run_bench`` from the call to its return (planning, every run, results.json and report.md); for Ray
  this includes starting the worker processes and their imports (torch, clad) on first use;
- Σ run: the sum of the runs' own ``seconds`` (fit + predict + metrics + the backbone timing, inside the task);
- overhead: grid wall - Σ run / min(N, tasks) for Ray: what the grid costs beyond its runs spread evenly over the
  workers (worker start, scheduling, moving records back, and any imbalance between the workers' shares);
- task round trip: the mean of 20 sequential no-op tasks on the warm cluster, after the grid;
- the largest relative difference between any figure or score of a record and another engine's record of that
  run (the first engine with as many torch threads per run, else the first engine), timing, memory and environment
  left out: 0 at the same threads; a 2-thread local run and a 1-thread task may differ in the last digits of the
  pixel metrics (sums in another order).

The load average is printed before and after each engine: the figures compare only within one invocation.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from clad.bench import run_bench  # noqa: E402
from clad.cluster import connect  # noqa: E402

DATA = (REPO / ".." / "shared" / "data").resolve()
TIMING = {"environment", "started", "seconds", "memory", "backbone_timing", "file"}


def comparable(record: dict) -> dict:
    """A record without what may differ between two runs of one cell (when, where, how fast, how much memory)."""
    out = {k: v for k, v in record.items() if k not in TIMING}
    out["metrics"] = {k: v for k, v in record.get("metrics", {}).items()
                      if not (k.endswith(("_seconds", "_ms_per_image", "_mb")) or k == "predict_over_backbone")}
    return out


def largest_difference(a, b) -> float:
    """The largest relative difference between two records' numbers (0.0: equal; inf: not the same shape)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return max((largest_difference(a[k], b[k]) for k in a), default=0.0) if a.keys() == b.keys() else math.inf
    if isinstance(a, list) and isinstance(b, list):
        return max(map(largest_difference, a, b), default=0.0) if len(a) == len(b) else math.inf
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return 0.0 if a == b else abs(a - b) / max(abs(a), abs(b))
    return 0.0 if a == b else math.inf


def _noop():
    return None


def task_round_trip_ms(ray, n: int = 20) -> float:
    remote = ray.remote(_noop)
    ray.get(remote.remote())  # a warm worker
    t0 = time.perf_counter()
    for _ in range(n):
        ray.get(remote.remote())
    return 1000 * (time.perf_counter() - t0) / n


def run_engine(engine: str, args, folder: Path) -> dict:
    load_before = os.getloadavg()[0]
    ray, startup, cpus = None, None, None
    kwargs, threads = {}, torch.get_num_threads()
    if engine.startswith("local:"):
        torch.set_num_threads(int(engine.partition(":")[2]))
    if engine.startswith("ray"):
        cpus = int(engine.partition(":")[2] or 1)
        t0 = time.perf_counter()
        ray = connect(num_cpus=cpus)
        startup = time.perf_counter() - t0
        kwargs = dict(engine="ray", cpus_per_run=args.cpus_per_run)
    limits = threadpool_limits(torch.get_num_threads()) if engine.startswith("local:") else None  # numpy's BLAS too
    t0 = time.perf_counter()
    summary = run_bench(folder, args.data, args.categories, args.detectors, args.shots, args.runs,
                        progress=False, plots=False, **kwargs)
    wall = time.perf_counter() - t0
    torch.set_num_threads(threads)
    if limits is not None:
        limits.restore_original_limits()
    busy = sum(r.get("seconds") or 0 for r in summary["records"])
    row = {"engine": engine, "cpus": cpus, "startup_s": startup, "wall_s": wall, "run_sum_s": busy,
           "runs": summary["ran"], "failed": summary["failed"], "records": summary["records"],
           "threads": sorted({r["environment"].get("torch_threads") for r in summary["records"]} - {None})}
    if ray is not None:
        n_tasks = len(summary["records"])
        row["overhead_s"] = wall - busy / max(1, min(cpus // args.cpus_per_run, n_tasks))
        row["task_ms"] = task_round_trip_ms(ray)
        ray.shutdown()
    row["load"] = (load_before, os.getloadavg()[0])
    return row


def fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=f"mvtec:{DATA / 'mvtec_ad'},mvtec:{DATA}")
    p.add_argument("--categories", default="bottle,magnetic_tile")
    p.add_argument("--detectors", default="patchcore,padim")
    p.add_argument("--shots", default="1,4")
    p.add_argument("--runs", type=int, default=1, help="seeds 0..runs-1 (default 1)")
    p.add_argument("--engines", default="local,ray:1,ray:2", help="comma-separated: local, ray:N (default "
                   "local,ray:1,ray:2)")
    p.add_argument("--cpus-per-run", type=int, default=1)
    p.add_argument("--keep", metavar="DIR", help="write the bench folders under DIR (default: a temporary folder)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ray-grid-"))
    print(f"# ray_grid: {args.categories} x {args.detectors} x shots {args.shots} x {args.runs} seed(s); "
          f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for engine in args.engines.split(","):
        folder = root / engine.replace(":", "")
        row = run_engine(engine, args, folder)
        # compared with the first engine that ran its runs on as many torch threads, else with the first engine
        same = [r for r in rows if r["threads"] == row["threads"]]
        reference_row = (same or rows or [row])[0]
        reference, row["compared_with"] = reference_row["records"], reference_row["engine"]
        row["difference"] = max((largest_difference(comparable(a), comparable(b))
                                 for a, b in zip(row["records"], reference, strict=True)), default=0.0)
        rows.append(row)
        print(f"{engine}: wall {row['wall_s']:.1f} s, start-up {fmt(row['startup_s'])} s, "
              f"load {row['load'][0]:.2f} -> {row['load'][1]:.2f}", flush=True)

    print("\n| engine | CPUs | torch threads / run | cluster start-up s | grid wall s | Σ run s | Ray overhead s "
          "| task round trip ms | runs (failed) | largest difference (from) | load before -> after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        diff = "none" if r["difference"] == 0 else format(r["difference"], ".1e")
        print(f"| {r['engine']} | {r['cpus'] or os.cpu_count()} | {','.join(map(str, r['threads']))} "
              f"| {fmt(r['startup_s'])} | {r['wall_s']:.1f} | {r['run_sum_s']:.1f} | {fmt(r.get('overhead_s'))} "
              f"| {fmt(r.get('task_ms'))} | {r['runs']} ({r['failed']}) | {diff} ({r['compared_with']}) "
              f"| {r['load'][0]:.2f} -> {r['load'][1]:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "records"} for r in rows],
                                              indent=1))
    return 0 if not any(r["failed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
