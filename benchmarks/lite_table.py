"""The backbone table of issue 23, part 1: `clad bench` folders, one per backbone, side by side.

    python benchmarks/lite_table.py /tmp/lite12/lite0 /tmp/lite12/lite1 /tmp/lite12/lite2
    python benchmarks/lite_table.py --skip clad_plus-memory-only DIR [DIR ...]   # leave runs of these labels out

Reads every successful run under each folder's ``runs/`` and prints one markdown row per category, detector and
shots: image and pixel AUROC (%) as mean ± sample sd over the seeds run, predict ms/image (median over the seeds)
and the ratio of predict to the backbone's own forward timed in the same run (median), for each backbone. A cell
whose seeds are not all there says how many ran; a cell not run says so. Last, the default rule's average: per
seed, the mean over the cells every backbone ran with that seed, then mean ± sd over seeds, and the difference to
the first backbone, paired by seed (the same references).
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def _cell(runs: list[dict]) -> str:
    if not runs:
        return "not run"
    img = [100 * r["metrics"]["image_auroc"] for r in runs]
    pix = [100 * r["metrics"]["pixel_auroc"] for r in runs]
    ms = statistics.median(r["metrics"]["predict_ms_per_image"] for r in runs)
    ratio = statistics.median(r["metrics"]["predict_over_backbone"] for r in runs)
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    seeds = "" if len(runs) >= 3 else f" ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
    return (f"{statistics.mean(img):.1f} ± {sd(img):.1f} / {statistics.mean(pix):.1f} ± {sd(pix):.1f}, "
            f"{ms:.0f} ms ({ratio:.1f}x){seeds}")


def main(folders: list[str], skip: set[str] = frozenset()) -> None:
    table: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    backbones = []
    for folder in folders:
        for path in sorted(Path(folder, "runs").glob("*.json")):
            run = json.loads(path.read_text())
            if run.get("status") != "ok" or run["settings"].get("label") in skip:
                continue
            s = run["settings"]
            bb = run["backbone"]
            if bb not in backbones:
                backbones.append(bb)
            shots = s["shots"]
            order = (s["category"], 10**9 if shots == "all" else int(shots), s["detector"])
            table[order][bb].append(run)
    backbones.sort()
    print("| category | shots | detector | " + " | ".join(backbones) + " |")
    print("|---|---|---|" + "---|" * len(backbones))
    for order in sorted(table):
        category, shots, detector = order
        shots = "all" if shots == 10**9 else str(shots)
        print(f"| {category} | {shots} | {detector} | " + " | ".join(_cell(table[order][b]) for b in backbones) + " |")
    # cells (and seeds) run with every backbone
    common = defaultdict(dict)  # seed -> {backbone: [image, pixel AUROC of each common cell]}
    for order, by_bb in table.items():
        seeds = set.intersection(*({r["settings"]["seed"] for r in by_bb.get(b, [])} for b in backbones))
        for b in backbones:
            for r in by_bb.get(b, []):
                if r["settings"]["seed"] in seeds:
                    common[r["settings"]["seed"]].setdefault(b, []).append(
                        (100 * r["metrics"]["image_auroc"], 100 * r["metrics"]["pixel_auroc"]))
    seeds = sorted(s for s in common if len({len(v) for v in common[s].values()}) == 1 and len(common[s]) == len(backbones))
    if not seeds:
        return
    n = len(common[seeds[0]][backbones[0]])
    print(f"\nAverage over the cells every backbone ran ({n} per seed for seeds {seeds}), image / pixel AUROC, "
          f"and the difference to {backbones[0]} paired by seed:\n")
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    for b in backbones:
        img = [statistics.mean(x[0] for x in common[s][b]) for s in seeds]
        pix = [statistics.mean(x[1] for x in common[s][b]) for s in seeds]
        d_img = [i - statistics.mean(x[0] for x in common[s][backbones[0]]) for i, s in zip(img, seeds)]
        d_pix = [p - statistics.mean(x[1] for x in common[s][backbones[0]]) for p, s in zip(pix, seeds)]
        print(f"- {b}: {statistics.mean(img):.2f} ± {sd(img):.2f} / {statistics.mean(pix):.2f} ± {sd(pix):.2f}; "
              f"difference {statistics.mean(d_img):+.2f} ± {sd(d_img):.2f} / {statistics.mean(d_pix):+.2f} ± {sd(d_pix):.2f}")


if __name__ == "__main__":
    args = sys.argv[1:]
    skip = set()
    if args[:1] == ["--skip"]:
        skip, args = set(args[1].split(",")), args[2:]
    main(args, skip)
