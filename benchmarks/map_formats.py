"""The sizes of ``clad predict --maps`` formats and their worst error against float32, on real maps.

    python benchmarks/map_formats.py                      # magnetic tile's 583 test images, PatchCore 4 shots
    python benchmarks/map_formats.py --maps DIR           # the float32 maps of a run already made

Fits PatchCore (default backbone) on ``--shots`` train/good images and runs ``clad predict`` (float32 ``.npy``
maps) on the test images of ``--category``, unless ``--maps`` names a maps folder. Then writes every map again as
float16 and png16 (``clad.pipeline.write_map``), reads it back (``read_map``) and prints each format's total size
and its worst errors against the float32 map: relative to each value (|d| / |x|) and relative to the map's range
(|d| / (max - min)).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data")
    ap.add_argument("--category", default="magnetic_tile")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--maps", type=Path, help="a maps folder of float32 .npy (default: predict to make one)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from clad.pipeline import read_map, write_map

    work = Path(tempfile.mkdtemp(prefix="clad-map-formats-"))
    maps = args.maps
    if maps is None:
        import clad
        from clad.cli import main as clad_main
        from clad.data import open_dataset

        train = open_dataset(f"mvtec:{args.data}", args.category, "train", n_shots=args.shots, seed=0)
        clad.create_detector("patchcore").fit([s.image for s in train]).save(work / "model")
        if clad_main(["predict", "--model", str(work / "model"), "--input", str(args.data / args.category / "test"),
                      "--out", str(work / "out")]):
            return 1
        maps = work / "out" / "maps"
    files = sorted(maps.rglob("*.npy"))
    sizes = {"npy": 0, "float16": 0, "png16": 0}
    worst = {f: [0.0, 0.0] for f in ("float16", "png16")}  # relative to the value, relative to the range
    for k, f in enumerate(files):
        exact = read_map(f)
        sizes["npy"] += f.stat().st_size
        span = float(exact.max() - exact.min()) or 1.0
        for fmt in ("float16", "png16"):
            path = write_map(work / f"m{k}", exact, fmt)
            sizes[fmt] += path.stat().st_size
            d = np.abs(read_map(path).astype(np.float64) - exact)
            nonzero = np.abs(exact) > 0
            worst[fmt][0] = max(worst[fmt][0], float((d[nonzero] / np.abs(exact[nonzero])).max()))
            worst[fmt][1] = max(worst[fmt][1], float(d.max()) / span)
            path.unlink()
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    print(f"{len(files)} maps from {maps}\n")
    print("| --maps | size (MB) | worst |d| / |x| | worst |d| / (max - min) |")
    print("|---|---|---|---|")
    print(f"| npy | {sizes['npy'] / 1e6:.1f} | 0 | 0 |")
    for fmt in ("float16", "png16"):
        print(f"| {fmt} | {sizes[fmt] / 1e6:.1f} | {worst[fmt][0]:.2e} | {worst[fmt][1]:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
