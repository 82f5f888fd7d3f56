"""Where a corruption's image-AUROC drop comes from: the normal test images, the defective ones, or both.

Reads the ``results.json`` of a ``clad bench --corruptions`` folder and, for each detector and corrupted test set,
compares three AUROCs against the clean one of the same fit (scores of the same images, so each pair is exact):

- ``normals``: corrupted normal images against clean defective ones: the drop when only the normals move, i.e. the
  false alarms a corruption raises on good parts. A memory that has seen the corruption can remove this part.
- ``defects``: clean normal images against corrupted defective ones: the drop when only the defects move, i.e.
  the defect signal the corruption wipes out (blur over a hairline crack). No memory of normal images gives it back.
- ``both``: the benchmark's own drop (clean minus corrupted AUROC).

Usage::

    python benchmarks/corruption_drop.py benchmarks/results/corruptions/magnetic_tile [--by-severity]

prints a markdown table, one row per detector, one cell per corruption: ``normals / defects / both`` in AUROC
points (positive = worse), averaged over the severities run.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score


def _auroc(normal: np.ndarray, defective: np.ndarray) -> float:
    y = np.r_[np.zeros(len(normal)), np.ones(len(defective))]
    return 100.0 * roc_auc_score(y, np.r_[normal, defective])


def decompose(clean: dict, corrupted: dict) -> tuple[float, float, float]:
    """(normals, defects, both) drops in AUROC points of one corrupted run against its clean run (their
    ``predictions``: paths, labels, scores)."""
    def split(pred):
        by_path = dict(zip(pred["paths"], zip(pred["labels"], pred["scores"])))
        return by_path

    a, b = split(clean["predictions"]), split(corrupted["predictions"])
    paths = [p for p in a if p in b]
    lab = np.array([a[p][0] for p in paths])
    s0, s1 = np.array([a[p][1] for p in paths]), np.array([b[p][1] for p in paths])
    base = _auroc(s0[lab == 0], s0[lab == 1])
    return (base - _auroc(s1[lab == 0], s0[lab == 1]), base - _auroc(s0[lab == 0], s1[lab == 1]),
            base - _auroc(s1[lab == 0], s1[lab == 1]))


def table(results: Path, by_severity: bool = False) -> str:
    runs = [r for r in json.loads(results.read_text())["runs"] if r.get("status") == "ok"]
    clean = {(r["settings"]["label"], r["settings"]["shots"], r["settings"]["seed"]): r
             for r in runs if "corruption" not in r["settings"]}
    cells = defaultdict(list)  # (label, shots, column) -> [(normals, defects, both)]
    columns = []
    for r in runs:
        st = r["settings"]
        if "corruption" not in st or (st["label"], st["shots"], st["seed"]) not in clean:
            continue
        name, severity = st["corruption"].split(":")
        column = f"severity {severity}" if by_severity else name
        if column not in columns:
            columns.append(column)
        d = decompose(clean[(st["label"], st["shots"], st["seed"])], r)
        cells[(st["label"], st["shots"], column)].append(d)
        cells[(st["label"], st["shots"], "mean")].append(d)
    columns = sorted(columns) if by_severity else columns
    rows = list(dict.fromkeys((k[0], k[1]) for k in cells))
    out = ["| detector | shots | " + " | ".join(columns + ["mean"]) + " |", "|---|---|" + "---|" * (len(columns) + 1)]
    for label, shots in rows:
        vals = []
        for c in columns + ["mean"]:
            ds = cells.get((label, shots, c))
            vals.append(" / ".join(f"{v:.1f}" for v in np.mean(ds, axis=0)) if ds else "—")
        out.append(f"| {label} | {shots} | " + " | ".join(vals) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench", type=Path, help="a clad bench --corruptions folder (its results.json)")
    p.add_argument("--by-severity", action="store_true", help="one column per severity instead of per corruption")
    a = p.parse_args()
    print("image AUROC drop in points, normals / defects / both (see the module docstring)\n")
    print(table(a.bench / "results.json", a.by_severity))


if __name__ == "__main__":
    main()
