"""Teaching (``Detector.add_references``) against a fit from scratch on the same references, on magnetic tile.

    nice -n 5 python benchmarks/teach.py                                    # PatchCore and PaDiM, full test split
    nice -n 5 python benchmarks/teach.py --detectors clad_plus --test-subset 200

An operator simulated from the labels: start from 1 reference (the seed's 1-shot draw from train/good), then teach
the next normal images of the same seeded order (only train/good images, which the labels say are normal) until
4, 16 and 64 have been taught. After each step: image and pixel AUROC of the taught detector on the test split,
beside a detector fitted from scratch on the same references (the seed's 5-, 17- and 65-shot draws: a larger draw
holds every smaller one, so these are the same images); the seconds of the teach (the ``add_references`` call,
its threshold included; that step is then timed again alone) and of the fit from scratch (``fit``, its threshold
included), and the memory's rows where the detector has one. Metrics as ``clad eval`` computes them
(``clad.evaluate.evaluate``; pixel metrics at a longer side of 256). Prints a Markdown table, one row per step, then the seconds of teaching one more image.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

STEPS = (4, 16, 64)  # images taught in all after each step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mvtec:../shared/data", help="dataset spec holding the category")
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--detectors", default="patchcore,padim", help="comma-separated, each can_add_references")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-subset", type=int, metavar="N", help="a seeded draw of N test images (all: none)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from clad.data import open_dataset

    train = open_dataset(args.data, args.category, "train")
    test = open_dataset(args.data, args.category, "test")
    # the order of the seed's few-shot draws (clad.data.datasets.few_shot_paths: sorted, then permuted)
    order = np.random.default_rng(args.seed).permutation(len(train))[: 1 + STEPS[-1]]
    refs = [train[int(i)].image for i in order]
    ref_paths = [str(train.paths[int(i)]) for i in order]
    split = f"all {len(test)} test images"
    if args.test_subset:
        pick = np.sort(np.random.default_rng(args.seed).permutation(len(test))[: args.test_subset])
        test = [test[int(i)] for i in pick]
        split = f"{len(test)} of the test images (seed {args.seed})"
    print(f"{args.category}, {split}, seed {args.seed}, {args.threads} torch threads, "
          f"load average before: {os.getloadavg()[0]:.1f}\n")
    print("| detector | references | taught (this step) | image AUROC taught / scratch | pixel AUROC taught / scratch "
          "| difference image / pixel | teach (s) | its threshold step (s) | fit from scratch (s) "
          "| memory rows taught / scratch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    notes = [run(name, args, refs, ref_paths, test) for name in args.detectors.split(",")]
    print("\n" + "\n".join(notes))


def run(name: str, args, refs: list, ref_paths: list[str], test) -> str:
    """Print the detector's rows; return a line on one image taught at the end (an operator's single verdict)."""
    from clad.data import open_dataset
    from clad.evaluate import evaluate
    from clad.registry import create_detector
    from clad.specs import detector_params

    def make():
        return create_detector(name, **detector_params(name, {}, seed=args.seed, category=args.category))

    def rows(det) -> str:
        return str(len(det.memory_bank_)) if hasattr(det, "memory_bank_") else "-"

    taught = make()
    if not taught.can_add_references:
        raise SystemExit(f"{name}: cannot add references (can_add_references is False)")
    t0 = time.perf_counter()
    taught.fit(refs[:1])
    first_fit = time.perf_counter() - t0
    start = evaluate(make(), open_dataset(args.data, args.category, "train", n_shots=1, seed=args.seed), test,
                     progress=False, fitted_from=taught)
    print(f"| {name} | 1 | - | {_pct(start['image_auroc'])} | {_pct(start['pixel_auroc'])} | - | - | - "
          f"| {first_fit:.1f} | {rows(taught)} |", flush=True)
    done = 0
    for total in STEPS:
        t0 = time.perf_counter()
        taught.add_references(refs[1 + done : 1 + total])
        teach_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        taught._calibrate_threshold([r.numpy() for r in taught.references_])  # that step again, alone: same value
        threshold_s = time.perf_counter() - t0
        shots = open_dataset(args.data, args.category, "train", n_shots=1 + total, seed=args.seed)
        assert sorted(map(str, shots.paths)) == sorted(ref_paths[: 1 + total]), "not the references taught"
        r_taught = evaluate(make(), shots, test, progress=False, fitted_from=taught)
        scratch = make()
        r_scratch = evaluate(scratch, shots, test, progress=False)
        di = 100 * (r_taught["image_auroc"] - r_scratch["image_auroc"])
        dp = 100 * (r_taught["pixel_auroc"] - r_scratch["pixel_auroc"])
        print(f"| {name} | {1 + total} | {total} ({total - done}) "
              f"| {_pct(r_taught['image_auroc'])} / {_pct(r_scratch['image_auroc'])} "
              f"| {_pct(r_taught['pixel_auroc'])} / {_pct(r_scratch['pixel_auroc'])} | {di:+.1f} / {dp:+.1f} "
              f"| {teach_s:.1f} | {threshold_s:.1f} | {r_scratch['fit_seconds']:.1f} "
              f"| {rows(taught)} / {rows(scratch)} |", flush=True)
        done = total
    extra = train_image(args, len(refs))  # one more normal image, not among the references
    t0 = time.perf_counter()
    taught.add_references([extra])
    return f"{name}: one more image taught to the {len(refs)}-reference model: {time.perf_counter() - t0:.1f} s"


def train_image(args, skip: int):
    """A train/good image after the first ``skip`` of the seeded order."""
    from clad.data import open_dataset

    train = open_dataset(args.data, args.category, "train")
    return train[int(np.random.default_rng(args.seed).permutation(len(train))[skip])].image


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


if __name__ == "__main__":
    main()
