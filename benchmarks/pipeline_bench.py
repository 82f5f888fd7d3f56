"""The streaming predict flow (``clad.pipeline``): its speed against decoding and the forward alone, and its memory.

    python benchmarks/pipeline_bench.py                      # 1,000 / 10,000 images, PatchCore at 128 px
    python benchmarks/pipeline_bench.py --n-small 200 --n-large 2000 --n-speed 200   # a quick look

Writes ``--n-large`` PNGs (``--png-size`` px, striped textures with noise; ``--n-distinct`` of them written, the
rest hard links to those: decoding costs the same) to a temporary folder and fits PatchCore (EfficientNet-Lite0 at
``--image-size``) on 8 other textures. Then ``clad predict`` runs in a fresh process on the first ``--n-small``
images and on all ``--n-large``, each printing its peak RSS (``resource.getrusage``'s ``ru_maxrss``, read in that
process), and the ratio of the two. Last, in this process, images/s of: decoding alone (``Entry.load`` of
``--n-speed`` PNGs), the forward alone (``detector.predict`` on the same images already decoded), and the whole
flow (decode + predict + predictions CSV + ``.npy`` maps) without and with the prefetch thread; each the best of
``--rounds`` interleaved runs, at each of ``--torch-threads`` (the prefetch thread can only overlap the forward
when the forward leaves it a core).

Linux keeps a process's ``ru_maxrss`` across ``exec``, and a child starts with its parent's pages, so a child's
figure is at least its parent's size when it was started: this process imports neither torch nor clad (and fits
the model in a child too) until the memory children are done.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SRC = Path(__file__).resolve().parents[1] / "src"
FIT = """
import sys
import numpy as np
import clad
sys.path.insert(0, sys.argv[3])
from pipeline_bench import texture
refs = [texture(int(sys.argv[2]), 10_000 + k) for k in range(8)]
clad.create_detector("patchcore", image_size=int(sys.argv[4])).fit(refs).save(sys.argv[1])
"""
PREDICT = """
import resource, sys
from clad.cli import main
rc = main(["predict", "--model", sys.argv[1], "--input", sys.argv[2], "--out", sys.argv[3], "--batch-size", sys.argv[4]])
print("peak_rss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


def texture(size: int, seed: int) -> np.ndarray:
    """(size, size, 3) uint8: a striped surface with a seeded phase, tint and sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 2)
    base = 128 + 40 * np.sin(xx / 5.0 + phase[0]) + 20 * np.cos(yy / 7.0 + phase[1])
    image = base[..., None] + rng.uniform(-10, 10, 3) + rng.normal(0, 4, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_pngs(folder: Path, n: int, size: int, n_distinct: int) -> list[Path]:
    """``n`` PNGs, 1,000 per subfolder; the first ``n_distinct`` written, the others hard links to them."""
    paths = []
    for i in range(n):
        path = folder / f"{i // 1000:03d}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i < n_distinct:
            Image.fromarray(texture(size, i)).save(path, compress_level=1)
        else:
            os.link(paths[i % n_distinct], path)
        paths.append(path)
    return paths


def _child(code: str, *args) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    run = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"child process failed:\n{run.stderr[-3000:]}")
    return run.stdout


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.1f} images/s ({1000 * seconds / n:6.2f} ms/image)"


def peak_rss_mb(model: Path, folder: Path, out: Path, batch_size: int) -> tuple[float, float]:
    """Peak RSS (MB) and wall seconds of ``clad predict`` on ``folder`` in a fresh process."""
    t0 = time.perf_counter()
    stdout = _child(PREDICT, model, folder, out, batch_size)
    kb = next(int(line.split()[1]) for line in stdout.splitlines() if line.startswith("peak_rss_kb"))
    return kb / 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-small", type=int, default=1000)
    ap.add_argument("--n-large", type=int, default=10000)
    ap.add_argument("--n-distinct", type=int, default=1000, help="PNGs written; the others are hard links to them")
    ap.add_argument("--n-speed", type=int, default=500, help="images of the speed measurements")
    ap.add_argument("--png-size", type=int, default=128, help="side of the written PNGs")
    ap.add_argument("--image-size", type=int, default=128, help="PatchCore's working size")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="speed measurements repeated, best kept")
    ap.add_argument("--torch-threads", default="all,1", help="the speed measurements at each of these torch thread "
                    "counts ('all': torch's default); with fewer threads than cores, decoding has a core of its own")
    ap.add_argument("--prefetch", type=int, default=2, help="batches decoded ahead in the flow with prefetch")
    ap.add_argument("--workdir", help="folder for the images and outputs (default: a temporary one, removed)")
    a = ap.parse_args()

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="clad_pipeline_bench_"))
    try:
        t0 = time.perf_counter()
        paths = write_pngs(work / "large", a.n_large, a.png_size, min(a.n_distinct, a.n_large))
        for p in paths[: a.n_small]:  # the small set: the large set's first images
            (work / "small" / p.parent.name).mkdir(parents=True, exist_ok=True)
            os.link(p, work / "small" / p.parent.name / p.name)
        print(f"wrote {a.n_large} PNGs of {a.png_size} px in {time.perf_counter() - t0:.0f} s to {work}")
        _child(FIT, work / "model", a.png_size, Path(__file__).resolve().parent, a.image_size)
        print(f"patchcore, efficientnet_lite0 at {a.image_size} px, batch {a.batch_size}, {os.cpu_count()} CPUs")

        print("peak RSS of `clad predict` (a fresh process each; predictions.csv, errors.csv, maps/**.npy):")
        peaks = {}
        for name, n in (("small", a.n_small), ("large", a.n_large)):
            mb, seconds = peak_rss_mb(work / "model", work / name, work / f"out_{name}", a.batch_size)
            peaks[name] = mb
            print(f"  {n:6d} images: {mb:7.1f} MB ({seconds:.0f} s, {n / seconds:.1f} images/s with process start)")
            shutil.rmtree(work / f"out_{name}")
        print(f"  ratio {a.n_large} / {a.n_small}: {peaks['large'] / peaks['small']:.3f}")

        import torch

        import clad
        from clad.pipeline import MapsNpy, Pipeline, PredictionsCSV, from_folder

        det = clad.load_detector(work / "model")
        entries = from_folder(work / "large")[: a.n_speed]
        for threads in a.torch_threads.split(","):
            torch.set_num_threads(torch.get_num_threads() if threads == "all" else int(threads))
            det.predict([e.load().image for e in entries[: a.batch_size]], batch_size=a.batch_size)  # warm-up
            best: dict[str, float] = {}
            inside: dict[int, tuple] = {}
            for _ in range(a.rounds):  # interleaved, the best of each kept: the machine may be shared
                t0 = time.perf_counter()
                images = [e.load().image for e in entries]
                best["decode alone"] = min(best.get("decode alone", np.inf), time.perf_counter() - t0)
                t0 = time.perf_counter()
                det.predict(images, batch_size=a.batch_size)
                best["forward alone"] = min(best.get("forward alone", np.inf), time.perf_counter() - t0)
                del images
                for prefetch in (0, a.prefetch):
                    out = work / f"flow_{prefetch}"
                    sinks = [PredictionsCSV(out / "predictions.csv"), MapsNpy(out / "maps")]
                    s = Pipeline(det, sinks, batch_size=a.batch_size, prefetch=prefetch).run(entries)
                    name = f"flow, prefetch={prefetch}"
                    if s.seconds < best.get(name, np.inf):
                        best[name], inside[prefetch] = s.seconds, (s.decode_seconds, s.predict_seconds)
                    shutil.rmtree(out)
            print(f"speed over {a.n_speed} images, best of {a.rounds}, torch threads {torch.get_num_threads()}:")
            for name, seconds in best.items():
                line = f"  {name:<20} {rate(len(entries), seconds)}"
                if name.startswith("flow"):
                    dec, fwd = inside[int(name.split("=")[1])]
                    line += f"; of its {seconds:.1f} s: decoding {dec:.1f} s, forward {fwd:.1f} s"
                print(line)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
