"""Batch scoring on Ray Data against the local engine: images/s of ``clad predict`` on magnetic tile, in one run.

    python benchmarks/ray_scaling.py                 # all 1,344 images (train + test), npy maps
    python benchmarks/ray_scaling.py --n 64          # a quick look on 64 of them
    python benchmarks/ray_scaling.py --maps png16    # the same with 16-bit PNG maps

Lists every image of ``--data`` (train/good and test/*, no masks) in a CSV manifest (``--n``: that many, evenly
spread), fits PatchCore (default backbone) once on ``--shots`` train/good images, then runs ``clad predict`` on the
manifest, each in a fresh process with the same model: the local engine (torch's default threads, then 1 thread),
then ``--engine ray`` on a fresh local cluster of 1 and then 2 CPUs (one scoring actor per CPU, one torch thread
each). Each prints the wall time with and without Ray's start-up (``ray.init`` of the local cluster; the actors'
start, model load included, is inside the predict time), images/s on the latter, the driver's peak RSS
(``ru_maxrss`` of that process: Ray's workers are other processes), and the size of the maps folder. Ray's own
overhead is ray with 1 CPU against the local engine with 1 thread, the same compute.

Linux keeps ``ru_maxrss`` across ``exec`` and a child starts with its parent's pages: this process imports neither
torch, clad nor ray, so each child's figure is its own.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
FIT = """
import sys
import clad
from clad.data import open_dataset
train = open_dataset("mvtec:" + sys.argv[1], sys.argv[2], "train", n_shots=int(sys.argv[3]), seed=0)
clad.create_detector("patchcore").fit([s.image for s in train]).save(sys.argv[4])
"""
PREDICT = """
import json, resource, sys, time
t0 = time.perf_counter()
engine, cpus, threads = sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
import torch
if threads:
    torch.set_num_threads(threads)
from clad.cli import main
args = ["predict", "--model", sys.argv[1], "--input", sys.argv[2], "--out", sys.argv[3], "--batch-size", sys.argv[7],
        "--maps", sys.argv[8]]
startup = 0.0
if engine == "ray":
    from clad.cluster import connect
    t = time.perf_counter()
    connect(None, cpus)
    startup = time.perf_counter() - t
    args += ["--engine", "ray"]
t1 = time.perf_counter()
rc = main(args)
t2 = time.perf_counter()
print("RESULT " + json.dumps(dict(rc=rc, startup=startup, predict=t2 - t1, wall=t2 - t0,
                                  peak_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))
sys.exit(rc)
"""


def images(root: Path) -> list[Path]:
    """Every image of train/good and test/* under ``root`` (not the ground-truth masks), sorted."""
    found = [p for sub in ("train", "test") for p in (root / sub).rglob("*") if p.suffix.lower() in SUFFIXES]
    return sorted(found)


def spread(paths: list[Path], n: int | None) -> list[Path]:
    if n is None or n >= len(paths):
        return paths
    step = len(paths) / n
    return [paths[int(k * step)] for k in range(n)]


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6 if folder.is_dir() else 0.0


def child(code: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data", help="MVTec-layout root")
    ap.add_argument("--category", default="magnetic_tile")
    ap.add_argument("--n", type=int, help="images to score (default: all), evenly spread over the sorted list")
    ap.add_argument("--shots", type=int, default=4, help="train/good images PatchCore is fitted on (default 4)")
    ap.add_argument("--maps", default="npy", choices=("npy", "float16", "png16", "none"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--runs", default="local,local-1t,ray-1,ray-2",
                    help="which runs, comma-separated (default local,local-1t,ray-1,ray-2)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is given up")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    args = ap.parse_args()

    root = (args.data / args.category).resolve()
    if not root.is_dir():
        print(f"no data at {root} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="clad-ray-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    todo = spread(images(root), args.n)
    manifest = work / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path"])
        w.writerows([[str(p)] for p in todo])
    print(f"{len(todo)} images of {root} in {manifest}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
          "cores", flush=True)

    model = work / "model"
    t = time.perf_counter()
    fit = child(FIT, args.data.resolve(), args.category, args.shots, model, timeout=args.timeout)
    if fit.returncode:
        print(fit.stderr[-3000:], file=sys.stderr)
        return 1
    print(f"fitted patchcore on {args.shots} shot(s) in {time.perf_counter() - t:.1f} s", flush=True)

    plans = {"local": ("local", 0, 0), "local-1t": ("local", 0, 1), "ray-1": ("ray", 1, 0), "ray-2": ("ray", 2, 0)}
    results = {}
    for name in args.runs.split(","):
        engine, cpus, threads = plans[name]
        out = work / f"out-{name}"
        try:
            run = child(PREDICT, model, manifest, out, engine, cpus, threads, args.batch_size, args.maps,
                        timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{name}: gave up after {args.timeout:.0f} s", flush=True)
            continue
        line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
        if run.returncode or line is None:
            print(f"{name}: failed (exit {run.returncode})\n{run.stderr[-3000:]}", flush=True)
            continue
        r = json.loads(line[len("RESULT "):])
        with open(out / "predictions.csv", newline="") as fh:
            r["scored"] = sum(1 for _ in csv.DictReader(fh))
        r["maps_mb"] = folder_mb(out / "maps")
        results[name] = r
        print(f"{name}: {r['scored']} scored in {r['predict']:.1f} s (+ {r['startup']:.1f} s start-up), "
              f"{r['scored'] / r['predict']:.2f} images/s, driver peak RSS {r['peak_rss_kb'] / 1024:.0f} MB",
              flush=True)

    print(f"\n{len(todo)} images, PatchCore ({args.shots} shots, default backbone), batch {args.batch_size}, maps "
          f"{args.maps}; load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| run | images/s | wall excl. start-up (s) | wall incl. start-up (s) | Ray start-up (s) "
          "| driver peak RSS (MB) | maps (MB) |")
    print("|---|---|---|---|---|---|---|")
    labels = {"local": "local engine (torch default threads)", "local-1t": "local engine, 1 thread",
              "ray-1": "ray, 1 CPU (1 actor)", "ray-2": "ray, 2 CPUs (2 actors)"}
    for name, r in results.items():
        print(f"| {labels[name]} | {r['scored'] / r['predict']:.2f} | {r['predict']:.1f} | "
              f"{r['predict'] + r['startup']:.1f} | {r['startup']:.1f} | {r['peak_rss_kb'] / 1024:.0f} | "
              f"{r['maps_mb']:.1f} |")
    base = results.get("local-1t") or results.get("local")
    if base and "ray-1" in results:
        ray1 = results["ray-1"]
        print(f"\nRay's overhead (ray 1 CPU against the local engine with "
              f"{'1 thread' if 'local-1t' in results else 'default threads'}): "
              f"{ray1['predict'] - base['predict']:+.1f} s on the scoring "
              f"({(ray1['predict'] / base['predict'] - 1) * 100:+.0f} %), {ray1['startup']:.1f} s more to start")
    if "ray-1" in results and "ray-2" in results:
        print(f"ray 2 CPUs / 1 CPU: {results['ray-1']['predict'] / results['ray-2']['predict']:.2f}x")
    if args.work is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
