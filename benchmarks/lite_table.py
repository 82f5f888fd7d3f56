"""The backbone table of issue 23, part 1: `clad bench` folders, one per backbone, side by side.

    python benchmarks/lite_table.py /tmp/lite12/lite0 /tmp/lite12/lite1 /tmp/lite12/lite2

Reads every successful run under each folder's ``runs/`` and prints one markdown row per category, detector and
shots: image and pixel AUROC (%) as mean ± sample sd over the seeds run, predict ms/image (median over the seeds)
and the ratio of predict to the backbone's own forward timed in the same run (median), for each backbone. A cell
whose seeds are not all there says how many ran; a cell not run says so.
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


def main(folders: list[str]) -> None:
    table: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    backbones = []
    for folder in folders:
        for path in sorted(Path(folder, "runs").glob("*.json")):
            run = json.loads(path.read_text())
            if run.get("status") != "ok":
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


if __name__ == "__main__":
    main(sys.argv[1:])
