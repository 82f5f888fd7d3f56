"""The before/after table of issue 23 part 4: CLAD and CLAD+ image / pixel AUROC per category and shots, before
(a bench folder run with the code before the change) and after, over the seeds both have, and the language weight
CLAD+ chose at fit in the after runs (``fit_report`` in their records).

    python benchmarks/clad_language_table.py --before benchmarks/results/clad --after DIR [DIR ...]

Each folder is a ``clad bench`` folder: its results.json, or else its runs/*.json (a bench still running).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def records(folder: Path) -> list[dict]:
    if (folder / "results.json").is_file():
        return json.loads((folder / "results.json").read_text())["runs"]
    return [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]


def cells(folders: list[Path]) -> dict:
    """(category, label, shots) -> {seed: record} of the finished runs; where folders overlap, the first wins."""
    out = defaultdict(dict)
    for folder in folders:
        for r in records(folder):
            if r.get("status") == "ok":
                st = r["settings"]
                out[(st["category"], st["label"], str(st["shots"]))].setdefault(st["seed"], r)
    return out


def mean_std(values: list[float]) -> str:
    v = 100 * np.asarray(values)
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", nargs="+", type=Path, required=True)
    p.add_argument("--after", nargs="+", type=Path, required=True)
    p.add_argument("--labels", default="clad,clad_plus,clad_plus-memory-only")
    args = p.parse_args()
    before, after = cells(args.before), cells(args.after)
    print("| category | detector | shots | seeds | image AUROC before | after | pixel AUROC before | after "
          "| language weight chosen (per seed) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (cat, label, shots), runs in sorted(after.items()):
        if label not in args.labels.split(","):
            continue
        old = before.get((cat, label, shots), {})
        seeds = sorted(runs)
        both = [s for s in seeds if s in old]
        fig = lambda rs, k: mean_std([rs[s]["metrics"][k] for s in both]) if both else "—"  # noqa: E731
        weights = [(runs[s].get("fit_report") or {}).get("language_weight_chosen") for s in seeds]
        shown = " ".join("—" if w is None else f"{w:.1f}" for w in weights) if "plus" in label else "—"
        if label.endswith("memory-only"):
            shown = "(memory alone)"
        print(f"| {cat} | {label} | {shots} | {','.join(map(str, both or seeds))} | {fig(old, 'image_auroc')} | "
              f"{mean_std([runs[s]['metrics']['image_auroc'] for s in both or seeds])} | {fig(old, 'pixel_auroc')} | "
              f"{mean_std([runs[s]['metrics']['pixel_auroc'] for s in both or seeds])} | {shown} |")


if __name__ == "__main__":
    main()
