"""The label-free threshold (``clad.detectors.thresholds``) against the F1-max one on real test splits.

    python benchmarks/thresholds.py --data ../shared/data                    # the table of benchmarks/README.md
    PYTHONPATH=CHECKOUT/src python benchmarks/thresholds.py --fit-times 3    # PatchCore's fit time, any version

For each (category, detector, shots) of ``RUNS``: fit with seed 0 on one torch thread, predict the test split
(``clad.evaluate.evaluate``), and print one Markdown row: image AUROC, the detector's own threshold with the
precision and recall of its decisions (score > threshold), the F1-max threshold of the test scores (an oracle)
with its precision and recall (score >= threshold), the fit time, and the time of the threshold's step of ``fit``
(run again, alone).

``--fit-times N`` instead fits PatchCore on bottle (1 shot and every image) N times each and prints the seconds,
and those of the threshold's step alone where the code has one: run it with the ``src`` of a checkout from before
the threshold (c002060) and of this one, back to back.
"""
from __future__ import annotations

import argparse
import time

import torch

RUNS = [  # (dataset under --data, category, detector, shots; None = every training image)
    ("mvtec_ad", "bottle", "patchcore", 1),
    ("mvtec_ad", "bottle", "padim", 1),
    ("mvtec_ad", "bottle", "clad_plus", 1),
    (".", "magnetic_tile", "patchcore", 1),
    (".", "magnetic_tile", "padim", 1),
    (".", "magnetic_tile", "clad_plus", 1),
    ("mvtec_ad", "bottle", "patchcore", None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="folder holding mvtec_ad/ and magnetic_tile/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit-times", type=int, metavar="N", help="only time PatchCore's fit on bottle, N times")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared machine: one core per run
    if args.fit_times:
        fit_times(args.data, args.seed, args.fit_times)
        return

    from clad.data import open_dataset
    from clad.evaluate import evaluate
    from clad.registry import create_detector
    from clad.specs import detector_params

    print("| category | detector | shots | image AUROC | label-free threshold | precision | recall "
          "| F1-max threshold | precision | recall | fit (s) | threshold step alone (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for folder, category, name, shots in RUNS:
        spec = f"mvtec:{args.data}/{folder}"
        train = open_dataset(spec, category, "train", n_shots=shots, seed=args.seed)
        test = open_dataset(spec, category, "test")
        det = create_detector(name, **detector_params(name, {}, seed=args.seed, category=category))
        r = evaluate(det, train, test, progress=False)
        refs = [train[i].image for i in range(len(train))]
        t0 = time.perf_counter()
        det._calibrate_threshold(refs)  # the threshold's step of fit alone (the same views, the same value)
        threshold_s = time.perf_counter() - t0
        print(f"| {category} | {name} | {shots or 'all'} | {100 * r['image_auroc']:.1f} | {r['threshold']:.4g} "
              f"| {100 * r['threshold_precision']:.1f} | {100 * r['threshold_recall']:.1f} "
              f"| {r['image_f1_threshold']:.4g} | {100 * r['image_f1_precision']:.1f} | {100 * r['image_f1_recall']:.1f} "
              f"| {r['fit_seconds']:.1f} | {threshold_s:.1f} |", flush=True)


def fit_times(data: str, seed: int, repeats: int) -> None:
    """PatchCore's fit on bottle, 1 shot and every image, ``repeats`` times each (only APIs older than the
    threshold, so that a checkout from before it runs this too)."""
    import clad
    from clad.data import open_dataset
    from clad.evaluate import load_split

    for shots in (1, None):
        train = open_dataset(f"mvtec:{data}/mvtec_ad", "bottle", "train", n_shots=shots, seed=seed)
        refs = [s.image for s in load_split(train, progress=False)[0]]
        for _ in range(repeats):
            t0 = time.perf_counter()
            det = clad.create_detector("patchcore", seed=seed).fit(refs)
            line = f"bottle patchcore shots={shots or 'all'}: fit {time.perf_counter() - t0:.2f} s"
            if hasattr(det, "_calibrate_threshold"):
                t0 = time.perf_counter()
                det._calibrate_threshold(refs)
                line += f", threshold step alone {time.perf_counter() - t0:.2f} s"
            print(line, flush=True)


if __name__ == "__main__":
    main()
