"""Other confidences and threshold rules, from the rankings ``benchmarks/abstention.py --rankings`` stored.

    python benchmarks/abstention_rules.py OUT

Confidences: "margin" (the adopted one: first type over second of the named ranking), "min_margin_agree" (when
the region's and the whole image's rankings name the same type, the smaller of their margins; else below every
agreeing image). Thresholds, from the catalogue's leave-one-out: "acc_pseudo" (the adopted rule,
``confidence_threshold``) and "median" (the median leave-one-out confidence). Prints top-1 at 100 % and 50 %
coverage and each threshold's coverage and top-1 on the test images.
"""
from __future__ import annotations

import glob
import json
import math
import statistics
import sys

from clad.explain.explainer import confidence_threshold


def _margin(ranking):
    return ranking[0][1] - ranking[1][1]


CONFIDENCES = {
    "margin": lambda region, image: _margin(region),
    "min_margin_agree": lambda region, image: (min(_margin(region), _margin(image)) if region[0][0] == image[0][0]
                                               else -1 + _margin(region) / 4),
}
RULES = {
    "acc_pseudo": confidence_threshold,
    "median": lambda pairs, n_types: statistics.median(c for c, _ in pairs) if pairs else None,
}


def _pairs(items, confidence):
    return [(confidence(region, image), region[0][0] == truth) for (region, image), truth in items]


def _top1_at(pairs, coverage):
    ordered = sorted(pairs, key=lambda p: -p[0])
    k = max(1, math.ceil(coverage * len(ordered) - 1e-9))
    return sum(r for _, r in ordered[:k]) / k


def main(argv=None) -> int:
    out = (argv or sys.argv[1:])[0]
    for path in sorted(glob.glob(f"{out}/*_rankings.json")):
        d = json.load(open(path))
        n_types = len({t for _, t in d["test"]})
        for name, confidence in CONFIDENCES.items():
            test, cal = _pairs(d["test"], confidence), _pairs(d["catalogue"], confidence)
            line = (f"{path.split('/')[-1][:-14]:20s} {name:17s} top-1 100 % {_top1_at(test, 1.0):.3f}  "
                    f"50 % {_top1_at(test, 0.5):.3f}  (chance {1 / n_types:.3f})")
            for rule_name, rule in RULES.items():
                th = rule(cal, n_types)
                answered = [r for c, r in test if th is None or c >= th]
                line += f" | {rule_name}: answered {len(answered) / len(test):.2f}, top-1 {sum(answered) / max(1, len(answered)):.2f}"
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
