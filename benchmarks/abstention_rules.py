"""Confidences and threshold rules compared offline, from the rankings ``benchmarks/abstention.py --rankings`` stored.

    python benchmarks/abstention_rules.py OUT

Confidences: "margin" (session 13's: first type over second of the named ranking, the strongest region's),
"agree_min" (session 13's candidate: when the region's and the whole image's rankings name the same type, the
smaller of their margins; else -1 + the region's margin / 4, below every agreeing image) and "lead_both" (the
adopted one, ``clad.explain.explainer.type_confidence``: the named type's lead over the best other type in the
region's ranking and in the whole image's, the smaller; the same as "agree_min" when they agree, negative when they
do not). Thresholds, from the catalogue's leave-one-out: "acc_pseudo" (the adopted rule, ``confidence_threshold``)
and "median" (the median leave-one-out confidence). Prints, per run and confidence, top-1 at 100 % and 50 %
coverage and each threshold's coverage and top-1 on the test images, then per confidence how many runs meet
top-1 at 50 % >= chance + 0.2 (full coverage is the same for every confidence: they only reorder).
"""
from __future__ import annotations

import glob
import json
import math
import statistics
import sys

from clad.explain.explainer import confidence_threshold, type_confidence
from clad.explain.explanation import TypeScore


def _margin(ranking):
    return ranking[0][1] - ranking[1][1]


def _scores(ranking):
    return [TypeScore(n, n, s) for n, s in ranking]


CONFIDENCES = {
    "margin": lambda region, image: _margin(region),
    "agree_min": lambda region, image: (min(_margin(region), _margin(image)) if region[0][0] == image[0][0]
                                        else -1 + _margin(region) / 4),
    "lead_both": lambda region, image: type_confidence(_scores(region), _scores(image)),
}
RULES = {
    "acc_pseudo": confidence_threshold,
    "median": lambda pairs, n_types: statistics.median(c for c, _ in pairs) if pairs else None,
}


def _pairs(items, confidence):
    return [(confidence(region, image), region[0][0] == truth) for (region, image), truth in items]


def _top1_at(pairs, coverage):
    """top-1 of the most confident ceil(coverage * n) (ties keep the images' order, as ``coverage_curve``)."""
    ordered = sorted(pairs, key=lambda p: -p[0])
    k = max(1, math.ceil(coverage * len(ordered) - 1e-9))
    return sum(r for _, r in ordered[:k]) / k


def main(argv=None) -> int:
    out = (argv or sys.argv[1:])[0]
    met = {name: [] for name in CONFIDENCES}
    for path in sorted(glob.glob(f"{out}/*_rankings.json")):
        d = json.load(open(path))
        n_types = len({t for _, t in d["test"]})
        chance = 1 / n_types
        for name, confidence in CONFIDENCES.items():
            test, cal = _pairs(d["test"], confidence), _pairs(d["catalogue"], confidence)
            half = _top1_at(test, 0.5)
            met[name].append((half >= chance + 0.2 - 1e-12, half - chance - 0.2))
            line = (f"{path.split('/')[-1][:-14]:20s} {name:10s} top-1 100 % {_top1_at(test, 1.0):.3f}  "
                    f"50 % {half:.3f}  (chance {chance:.3f})")
            for rule_name, rule in RULES.items():
                th = rule(cal, n_types)
                answered = [r for c, r in test if th is None or c >= th]
                line += (f" | {rule_name}: threshold {'none' if th is None else f'{th:.3g}'} answered "
                         f"{len(answered) / len(test):.2f}, top-1 {sum(answered) / max(1, len(answered)):.3f}")
            print(line)
    for name, runs in met.items():
        print(f"{name:10s} top-1 at 50 % >= chance + 0.2 on {sum(ok for ok, _ in runs)} of {len(runs)} runs; "
              f"sum of (top-1 at 50 % - target) {sum(x for _, x in runs):+.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
