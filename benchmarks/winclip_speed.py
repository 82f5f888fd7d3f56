"""CPU time of WinCLIP / WinCLIP+ with a ViT-B/16-sized CLIP (random weights: speed does not depend on them).

Builds the model offline (vision: 768 wide, 12 blocks, 12 heads, patch 16 at 240 px -> the paper's 15x15 grid with
2x2 and 3x3 windows; text: 512 wide, 12 blocks), saves it to a temporary folder and loads it through
``create_backbone("clip:...")``. Reports ms per image zero-shot and 1-shot, the fit times, and how the time splits
between the image tower's full pass, its window passes, and everything outside the transformer.

    python benchmarks/winclip_speed.py [--threads 2] [--images 2] [--size 240]
"""
from __future__ import annotations

import argparse
import collections
import re
import tempfile
import time

import numpy as np
import torch

import clad
from clad.backbones.clip import build_random_clip
from clad.ops.prompts import state_prompts


def texture(seed: int, size: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = (128 + 40 * np.sin(xx / 5.0) + 20 * np.cos(yy / 7.0))[..., None] + rng.normal(0, 4, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=2, help="test images per mode (one batch)")
    ap.add_argument("--size", type=int, default=240)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    normal, anomalous = state_prompts("metal nut")
    words = {w for p in normal + anomalous for w in re.findall(r"[a-z]+", p)}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = build_random_clip(tmp, image_size=args.size, patch_size=16, hidden=768, layers=12, heads=12,
                                   text_hidden=512, text_layers=12, text_heads=8, projection=512, words=sorted(words))
        bb = clad.create_backbone(f"clip:{folder}")
        print(f"built and loaded a ViT-B/16 CLIP at {args.size} px in {time.perf_counter() - t0:.1f} s")

        # Time every transformer pass of the image tower, split by sequence length (full image vs windows),
        # and the text tower.
        spent: dict[str, float] = collections.defaultdict(float)
        n_full = 1 + (args.size // 16) ** 2
        image_tower, text_tower = bb.transformer, bb.text_features

        def timed_transformer(h, n_blocks=None):
            t = time.perf_counter()
            out = image_tower(h, n_blocks)
            spent["image tower, full pass" if h.shape[1] == n_full else "image tower, windows"] += time.perf_counter() - t
            return out

        def timed_text(tokens):
            t = time.perf_counter()
            out = text_tower(tokens)
            spent["text tower"] += time.perf_counter() - t
            return out

        bb.transformer, bb.text_features = timed_transformer, timed_text
        refs, tests = [texture(100)], [texture(s) for s in range(args.images)]
        common = dict(backbone=f"clip:{folder}", category="metal_nut", image_size=args.size)

        for mode, few in (("zero-shot", False), ("1-shot", True)):
            det = clad.create_detector("winclip", few_shot=few, **common)
            det.backbone_ = bb  # share the loaded model instead of loading it again
            spent.clear()
            t = time.perf_counter()
            det.fit(refs)
            fit_s, fit_parts = time.perf_counter() - t, dict(spent)
            spent.clear()
            t = time.perf_counter()
            det.predict(tests, batch_size=len(tests))
            total = time.perf_counter() - t
            inside = sum(spent.values())
            parts = ", ".join(f"{k} {1000 * v / len(tests):.0f}" for k, v in sorted(spent.items()))
            print(f"{mode:9s}: fit {fit_s:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in fit_parts.items())}); "
                  f"predict {1000 * total / len(tests):.0f} ms/image ({parts}; "
                  f"outside the transformer {1000 * (total - inside) / len(tests):.0f} ms = {100 * (total - inside) / total:.1f} %)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
