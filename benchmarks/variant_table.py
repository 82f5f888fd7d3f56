"""One table of detector variants from `clad bench` folders: the shape/resolution and ladder tables of issue 23.

    python benchmarks/variant_table.py FOLDER [FOLDER ...] [--labels a,b,c] [--seeds 0,1,2]

Reads every successful run under each folder's ``runs/`` and prints one markdown row per category, shots and
variant (the bench's label, e.g. ``patchcore-keep`` from ``patchcore[resize=keep]@patchcore-keep``, or
``label@backbone`` when ``--by-backbone``): image and pixel AUROC (%) as mean ± sample sd over the seeds, how many
seeds, and predict ms/image and predict over the backbone's forward (medians over the seeds; times depend on the
machine's load, the ratio less so). Where one variant ran in several folders, every run counts once per seed.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def collect(folders: list[str], by_backbone: bool = False, seeds: set[int] | None = None) -> dict:
    """{(category, shots, variant): {seed: run}}."""
    table: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for folder in folders:
        for path in sorted(Path(folder, "runs").glob("*.json")):
            run = json.loads(path.read_text())
            s = run["settings"]
            if run.get("status") != "ok" or s.get("corruption") or (seeds is not None and s["seed"] not in seeds):
                continue
            label = s.get("label") or s["detector"]
            if by_backbone:
                label = f"{s['detector']}@{run['backbone']}"
            table[(s["category"], s["shots"], label)][s["seed"]] = run
    return table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--labels", help="comma-separated variants to show, in this order (default: all, sorted)")
    ap.add_argument("--seeds", help="comma-separated seeds to count (default: all)")
    ap.add_argument("--by-backbone", action="store_true", help="name variants detector@backbone")
    args = ap.parse_args(argv)
    seeds = None if not args.seeds else {int(s) for s in args.seeds.split(",")}
    table = collect(args.folders, args.by_backbone, seeds)
    order = args.labels.split(",") if args.labels else None
    shots_key = (lambda s: 10**9 if s == "all" else int(s))

    def key(k):
        category, shots, label = k
        return category, shots_key(shots), order.index(label) if order else label

    print("| category | shots | variant | seeds | image AUROC | pixel AUROC | predict ms/image | predict / backbone |")
    print("|---|---|---|---|---|---|---|---|")
    for k in sorted((k for k in table if not order or k[2] in order), key=key):
        runs = list(table[k].values())
        img = [100 * r["metrics"]["image_auroc"] for r in runs]
        pix = [100 * r["metrics"]["pixel_auroc"] for r in runs]
        ms = statistics.median(r["metrics"]["predict_ms_per_image"] for r in runs)
        ratio = statistics.median(r["metrics"]["predict_over_backbone"] for r in runs)
        print(f"| {k[0]} | {k[1]} | {k[2]} | {','.join(str(s) for s in sorted(table[k]))} | "
              f"{statistics.mean(img):.1f} ± {_sd(img):.1f} | {statistics.mean(pix):.1f} ± {_sd(pix):.1f} | "
              f"{ms:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
