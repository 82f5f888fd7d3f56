"""Why CLAD's language map can rank normal texture above defects (issue 23, part 4): one figure per cause tested.

For each category and seed, one detector is fitted on k references; from its patch embeddings this prints, on the
real test split (a seeded sample of ``--n-test`` images) and on held-out views of the references with synthetic
anomalies (``calibration.check_set``, what the fit-time self-check uses):

- rule: the language map's patch and image AUROC with Eq. 4 against the normal description alone ("normal", the
  paper's literal reading and clad's rule until this change) and against every description ("contrast": 1 - the
  softmax at the normal one, the fix), from the same embeddings;
- pooled: the image AUROC of the pooled image embedding (Eq. 4 on the mean patch embedding) under both rules,
  beside the maximum of the map;
- darkness: the AUROC of darkness itself (255 - grey level, per patch) as a detector, and the Spearman correlation
  of the language map with darkness on normal test images (does it learn "dark is a defect"?);
- sigma: the contrast rule's patch AUROC with sigma / 4 and sigma * 4 (Eq. 4 against the normal description alone
  is a monotone function of the distance with one sigma, so its AUROCs cannot depend on sigma at all);
- borders: the memory map's fusion scale (99th percentile on normal views) from views with black-filled borders
  (the views before this change) and with reflected borders (now), and the memory's patch AUROC for reference.

Patch AUROC: on the working grid (32 x 32 at 256 px), a patch is defective where at least half of it is, normal
where none of it is. Image AUROC: the maximum of the raw grid map.

    PYTHONPATH=src python benchmarks/clad_language.py --categories bottle,magnetic_tile --seeds 0 --shots 1
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import spearmanr

from clad.data import open_dataset
from clad.detectors.clad import calibration
from clad.detectors.clad.model import language_score
from clad.detectors.clad.training import augment
from clad.detectors.thresholds import jitter, resized
from clad.metrics import image_auroc
from clad.registry import create_detector

DATA = {"bottle": "mvtec:../shared/data/mvtec_ad", "magnetic_tile": "mvtec:../shared/data"}


@torch.no_grad()
def embed(det, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch embeddings (N, D, h, w) and memory maps (N, h, w) of (size, size, 3) images."""
    zs, mems = [], []
    with det._brute_search():
        for i in range(0, len(images), 16):
            x = det.model_.backbone.preprocess(images[i : i + 16], det.config.image_size)
            _, mem, z = det._maps(x, need_memory=True)
            zs.append(z), mems.append(mem)
    return torch.cat(zs), torch.cat(mems)


def figures(det, images: list[np.ndarray], masks: np.ndarray, labels: np.ndarray) -> dict:
    z, mem = embed(det, images)
    classes, sigma, sigma_img = det.text_embeddings_, det.sigma_, det.sigma_image_
    z_img = F.normalize(z.mean(dim=(2, 3)), dim=-1)
    peak = lambda m: m.flatten(1).max(1).values  # noqa: E731
    out = {}
    for rule in ("normal", "contrast"):
        lang = language_score(z, classes, sigma, rule)
        out[f"{rule}: patch"] = calibration.patch_auroc(masks, lang)
        out[f"{rule}: image (map max)"] = image_auroc(labels, peak(lang))
        out[f"{rule}: image (pooled)"] = image_auroc(labels, language_score(z_img, classes, sigma_img, rule))
    for factor in (0.25, 4.0):
        out[f"contrast, sigma x {factor}: patch"] = calibration.patch_auroc(
            masks, language_score(z, classes, sigma * factor, "contrast"))
    out["memory: patch"] = calibration.patch_auroc(masks, mem)
    out["memory: image"] = image_auroc(labels, peak(mem))
    grey = torch.from_numpy(np.stack(images)).float().mean(-1)[:, None]  # (N, 1, S, S)
    dark = 255 - F.adaptive_avg_pool2d(grey, mem.shape[-2:])[:, 0]  # (N, h, w)
    out["darkness alone: patch"] = calibration.patch_auroc(masks, dark)
    good = torch.from_numpy(labels == 0)
    for rule in ("normal", "contrast"):
        lang = language_score(z, classes, sigma, rule)
        out[f"{rule}: Spearman with darkness on normals"] = spearmanr(lang[good].ravel(), dark[good].ravel())[0]
    return out


def test_split(category: str, n: int, size: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    test = open_dataset(DATA[category], category, "test")
    pick = np.random.default_rng(0).permutation(len(test))[:n]
    samples = [test[int(i)] for i in pick]
    to_mask = lambda m: np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 0  # noqa: E731
    return ([resized(s.image, size) for s in samples], np.stack([to_mask(s.mask) for s in samples]),
            np.array([s.label for s in samples]))


@torch.no_grad()
def border_scales(det, refs: list[np.ndarray], seed: int) -> dict:
    size = det.config.image_size
    out = {}
    for name, make in (("black-filled", augment), ("reflected", jitter)):
        rng = np.random.default_rng([seed, 7])
        views = [make(refs[i % len(refs)], rng, size) for i in range(16)]
        out[f"memory scale, views {name}"] = float(calibration.scale(embed(det, views)[1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--categories", default="bottle,magnetic_tile")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--detector", default="clad_plus")
    p.add_argument("--n-test", type=int, default=200)
    args = p.parse_args()
    for category in args.categories.split(","):
        for seed in args.seeds:
            train = open_dataset(DATA[category], category, "train", n_shots=args.shots, seed=seed)
            refs = [train[i].image for i in range(len(train))]
            t0 = time.perf_counter()
            det = create_detector(args.detector, category=category, seed=seed).fit(refs)
            print(f"\n## {category}, {args.detector}, {args.shots} shot(s), seed {seed} (fit {time.perf_counter() - t0:.0f} s)")
            real = figures(det, *test_split(category, args.n_test, det.config.image_size))
            held = figures(det, *calibration.check_set(refs, seed + 1000, det.config.image_size))
            print("| figure | real test | held-out synthetic |\n|---|---|---|")
            for k in real:
                print(f"| {k} | {real[k]:.3f} | {held[k]:.3f} |")
            for k, v in border_scales(det, refs, seed).items():
                print(f"| {k} | {v:.4f} | |")
            print(f"self-check at fit: {det.fit_report()}")


if __name__ == "__main__":
    main()
