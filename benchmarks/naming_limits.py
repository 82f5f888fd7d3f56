"""How well can a few labelled examples name magnetic-tile defect types at all? A bound for `clad eval --explain`.

    python benchmarks/naming_limits.py [--root ../shared/data] [--category magnetic_tile] [--shots 2] [--seeds 5]

For every defective test image, EfficientNet-Lite0 (256 px) features of stages 2-4 are pooled two ways:
over the whole image (mean, or max), and over the ground-truth defect mask (an oracle: a perfect localization,
which no detector gives). ``--shots`` images per defect type (drawn as ``clad eval --catalogue-shots`` draws them)
are the catalogue; every other defective image is named by its nearest type prototype (cosine of standardised
descriptors). Prints top-1 and top-3 accuracy, mean ± std over catalogue seeds, and the chance level.
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
import torch.nn.functional as F

STAGES = ("stage2", "stage3", "stage4")


def features(samples, batch_size: int = 16) -> dict[str, torch.Tensor]:
    from clad.registry import create_backbone

    bb = create_backbone("efficientnet_lite0")
    parts = {k: [] for k in STAGES}
    with torch.inference_mode():
        for i in range(0, len(samples), batch_size):
            f = bb(bb.preprocess([s.image for s in samples[i : i + batch_size]], 256), list(STAGES))
            for k in STAGES:
                parts[k].append(f[k])
    return {k: torch.cat(v) for k, v in parts.items()}


def mask_pool(f: torch.Tensor, masks) -> torch.Tensor:
    w = torch.stack([F.adaptive_avg_pool2d(torch.from_numpy(m.astype(np.float32))[None, None], f.shape[-2:])[0, 0]
                     for m in masks]) + 1e-6
    return (f * w[:, None]).sum((2, 3)) / w.sum((1, 2))[:, None]


def accuracy(desc: torch.Tensor, types: list[str], paths: list[str], shots: int, seeds: int):
    from clad.data.datasets import few_shot_paths

    names = sorted(set(types))
    top1, top3 = [], []
    for seed in range(seeds):
        cat = set()
        for t in names:
            cat |= set(few_shot_paths([p for p, u in zip(paths, types) if u == t], shots, seed))
        ci = [i for i, p in enumerate(paths) if p in cat]
        rest = [i for i, p in enumerate(paths) if p not in cat]
        x = (desc - desc[ci].mean(0)) / (desc[ci].std(0) + 1e-3)  # catalogue statistics only
        x = F.normalize(x, dim=1)
        protos = torch.stack([F.normalize(x[[i for i in ci if types[i] == t]].mean(0), dim=0) for t in names])
        order = (x[rest] @ protos.T).argsort(1, descending=True).numpy()
        truth = np.array([names.index(types[i]) for i in rest])
        top1.append(float((order[:, 0] == truth).mean()))
        top3.append(float((order[:, :3] == truth[:, None]).any(1).mean()))
    return top1, top3, len(names)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="../shared/data")
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--seeds", type=int, default=5)
    a = p.parse_args(argv)
    from clad.data import open_dataset
    from clad.evaluate import load_split

    samples, _ = load_split(open_dataset(f"mvtec:{a.root}", a.category, "test"), progress=False)
    samples = [s for s in samples if s.label and s.mask is not None]
    types, paths = [s.defect_type for s in samples], [s.path for s in samples]
    feats = features(samples)
    rows = []
    for k in STAGES:
        rows.append((f"whole image, mean-pooled {k}", feats[k].mean((2, 3))))
        rows.append((f"whole image, max-pooled {k}", feats[k].amax((2, 3))))
        rows.append((f"ground-truth mask (oracle), {k}", mask_pool(feats[k], [s.mask for s in samples])))
    print(f"{a.category}: {len(samples)} defective images, {a.shots} catalogue images per type, "
          f"{a.seeds} catalogue seeds")
    for name, desc in rows:
        t1, t3, n = accuracy(desc, types, paths, a.shots, a.seeds)
        print(f"  {name:<40} top-1 {statistics.fmean(t1):.3f} ± {statistics.stdev(t1) if len(t1) > 1 else 0:.3f}"
              f"  top-3 {statistics.fmean(t3):.3f}   (chance {1 / n:.3f} / {min(1, 3 / n):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
