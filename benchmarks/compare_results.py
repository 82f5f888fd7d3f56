"""Check that a rerun reproduces committed bench results: every accuracy figure of every common run equal.

    python benchmarks/compare_results.py benchmarks/results/main/results.json RERUN/results.json [--tol 1e-6]

Runs are matched by dataset folder name, category, detector label, shots and seed; timings, memory and
environment are ignored. Prints one line per matched run and exits 1 when any figure differs beyond --tol.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

IGNORED = ("seconds", "_ms", "ms_per", "rss", "memory", "_mb", "over_backbone", "n_failed")


def _runs(path: str) -> dict:
    doc = json.loads(Path(path).read_text())
    out = {}
    for r in doc["runs"]:
        s = r["settings"]
        key = (Path(s["dataset"].partition(":")[2].split(",")[0]).name, s["category"], s["label"], str(s["shots"]), s["seed"])
        out[key] = r.get("metrics") or {}
    return out


def _accuracy(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not any(t in k for t in IGNORED)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference")
    ap.add_argument("rerun")
    ap.add_argument("--tol", type=float, default=1e-6, help="largest absolute difference counted as equal")
    args = ap.parse_args(argv)
    ref, new = _runs(args.reference), _runs(args.rerun)
    common = sorted(set(ref) & set(new))
    if not common:
        print("no run in common", file=sys.stderr)
        return 1
    bad = 0
    for key in common:
        a, b = _accuracy(ref[key]), _accuracy(new[key])
        diffs = {k: (a[k], b.get(k)) for k in a
                 if b.get(k) is None or not (math.isclose(a[k], b[k], abs_tol=args.tol) or (math.isnan(a[k]) and math.isnan(b[k])))}
        bad += bool(diffs)
        status = "equal" if not diffs else "DIFFERENT " + ", ".join(f"{k}: {x} -> {y}" for k, (x, y) in diffs.items())
        print(f"{'/'.join(map(str, key))}: {len(a)} figures {status}")
    print(f"{len(common) - bad} of {len(common)} runs equal in every accuracy figure (tol {args.tol:g})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
