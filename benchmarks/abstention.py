"""Explanations that abstain (issue 23, part 5): top-1 type naming by coverage, on both categories, several seeds.

    nice -n 5 python benchmarks/abstention.py [--root ../shared/data] [--detector patchcore] [--shots all]
        [--seeds 0 1 2] [--catalogue-shots 2] [--out results/abstention]

For each category this does what ``clad eval --explain --catalogue-shots N --seed S`` does, with one fit and one
prediction of the test split per category (they do not depend on the catalogue seed when ``--shots all``): the
detector is fitted on train/good, the test split predicted, then for each seed N defective test images per type
are drawn as the catalogue and the naming is measured on the other defective images (``evaluate_naming``). Writes
``OUT/<category>_seed<S>.json`` (the ``explain`` part of ``clad eval --out``) and prints one row per seed: top-1
at full coverage and at 50 % coverage against chance, the learnt threshold's coverage and top-1, and how many
images got only their peak region.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

CATEGORIES = {"magnetic_tile": "mvtec:{root}", "bottle": "mvtec:{root}/mvtec_ad"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="../shared/data")
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    p.add_argument("--detector", default="patchcore")
    p.add_argument("--shots", default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--catalogue-shots", type=int, default=2)
    p.add_argument("--out", default="results/abstention")
    p.add_argument("--rankings", action="store_true",
                   help="also write every ranking (region and whole image), each with all the types, not 3")
    a = p.parse_args(argv)
    from clad.data import open_dataset
    from clad.evaluate import evaluate
    from clad.explain.quality import evaluate_naming, held_out_normals
    from clad.registry import create_detector
    from clad.specs import detector_params, parse_shot

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for category in a.categories:
        data = CATEGORIES[category].format(root=a.root)
        shots = parse_shot(a.shots)
        train = open_dataset(data, category, "train", n_shots=shots, seed=a.seeds[0])
        det = create_detector(a.detector, **detector_params(a.detector, {}, seed=a.seeds[0], category=category))
        pred = evaluate(det, train, open_dataset(data, category, "test"), keep_predictions=True)["_predictions"]
        for seed in a.seeds:
            normals = held_out_normals(open_dataset(data, category, "train"), train, seed=seed)
            res = evaluate_naming(det, pred["samples"], pred["result"], catalogue_shots=a.catalogue_shots, seed=seed,
                                  normal_images=normals or None, keep_rankings=a.rankings,
                                  **({"n_types": 100} if a.rankings else {}))
            (out / f"{category}_seed{seed}.json").write_text(json.dumps(res, indent=2))
            if a.rankings:  # every ranking of the test images and of the catalogue's leave-one-out, for studies
                (out / f"{category}_seed{seed}_rankings.json").write_text(json.dumps(res["_rankings"]))
            r = res["catalogue"]
            half = next(c for c in r["coverage_curve"] if c["coverage"] == 0.5)
            at = r["at_threshold"]
            rows.append((category, seed, r["chance_top1"], r["top1"], half["top1"], at["threshold"], at["coverage"],
                         at["top1"], r["peak_only"], r["n_images"]))
            print(f"{category} seed {seed}: top-1 {r['top1']:.3f} (chance {r['chance_top1']:.3f}), at 50 % "
                  f"{half['top1']:.3f}, threshold {at['threshold']}: coverage {at['coverage']:.2f} top-1 {at['top1']:.3f}; "
                  f"peak only {r['peak_only']:.2f}", flush=True)
    print("\n| category | seed | chance | top-1 at 100 % | top-1 at 50 % | learnt threshold | its coverage | its top-1 | peak-only regions | images |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c, s, ch, full, half, th, cov, top, peak, n in rows:
        th = "none" if th is None else f"{th:.3g}"
        print(f"| {c} | {s} | {ch:.3f} | {full:.3f} | {half:.3f} | {th} | {cov:.2f} | {top:.3f} | {peak:.2f} | {n} |")
    for c in a.categories:
        sub = [r for r in rows if r[0] == c]
        print(f"{c}: mean top-1 at 100 % {statistics.mean(r[3] for r in sub):.3f}, at 50 % "
              f"{statistics.mean(r[4] for r in sub):.3f}, chance {sub[0][2]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
