"""EfficientNet-Lite0/1/2 forward time per image on this CPU (issue 23, part 1): batch 16, 256 px and native sizes.

    python benchmarks/lite_speed.py                         # lite0,1,2; 256 px and native; 5 rounds
    python benchmarks/lite_speed.py --variants 1 --sizes 256 --rounds 3 --threads 2

Per variant and input size, the forward to ``stage3`` (the deepest map PatchCore and PaDiM use) and to ``stage4``
(the whole network without its head), each two ways: the folded inference path clad runs (batch norms folded into
the convolutions, ``torch.inference_mode``) and the package's own modules block by block (``torch.no_grad``).
Random images, channels-last as ``preprocess`` gives them. Every cell is timed once per round, in an order rotated
each round so that a shared machine's drift hits all alike; printed: median ms/image over rounds and the range,
and the multiply-adds per image of the convolutions run (GMAC, counted from their shapes: no timing, so a loaded
machine cannot move it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from clad.backbones.efficientnet import NATIVE_SIZE
from clad.registry import create_backbone


def modules_forward(bb, x: torch.Tensor, last: str) -> torch.Tensor:
    """The package's modules as they are (no folding), up to the last block of stage ``last``."""
    net = bb.net
    h = net._swish(net._bn0(net._conv_stem(x)))
    end = bb.stages[last][0]
    for idx, block in enumerate(net._blocks):
        h = block(h)
        if idx == end:
            break
    return h


def gmacs(bb, size: int, last: str) -> float:
    """Multiply-adds (1e9) of one image's convolutions up to stage ``last``: output elements x (C_in / groups) x k^2."""
    total = [0]

    def count(conv, _inputs, output):
        total[0] += output.numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]

    hooks = [m.register_forward_hook(count) for m in bb.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            modules_forward(bb, torch.zeros(1, 3, size, size), last)
    finally:
        for h in hooks:
            h.remove()
    return total[0] / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="0,1,2")
    p.add_argument("--sizes", default="256,native", help="comma-separated pixel sizes; 'native' = each variant's own")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [int(v) for v in args.variants.split(",")]
    backbones = {v: create_backbone(f"efficientnet_lite{v}") for v in variants}
    cells = []  # (variant, size, last stage, way)
    for v in variants:
        sizes = sorted({NATIVE_SIZE[v] if s == "native" else int(s) for s in args.sizes.split(",")})
        for size in sizes:
            for last in ("stage3", "stage4"):
                for way in ("folded", "modules"):
                    cells.append((v, size, last, way))
    torch.manual_seed(0)
    inputs = {size: torch.randn(args.batch, 3, size, size).contiguous(memory_format=torch.channels_last)
              for size in {c[1] for c in cells}}

    def run(cell) -> float:
        v, size, last, way = cell
        bb, x = backbones[v], inputs[size]
        t = time.perf_counter()
        if way == "folded":
            with torch.inference_mode():
                bb(x, [last])
        else:
            with torch.no_grad():
                modules_forward(bb, x, last)
        return (time.perf_counter() - t) * 1000.0 / args.batch

    for cell in cells:  # warm-up: the folded weights are prepared on first use
        run(cell)
    times: dict[tuple, list[float]] = {c: [] for c in cells}
    for r in range(args.rounds):
        k = r % len(cells)
        for cell in cells[k:] + cells[:k]:
            times[cell].append(run(cell))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.rounds} rounds, "
          f"load average {' '.join(open('/proc/loadavg').read().split()[:3]) if os.path.exists('/proc/loadavg') else '?'}")
    print(f"{'backbone':<20}{'size':>6}{'to':>8}{'GMAC':>7}{'folded ms/img':>22}{'modules ms/img':>22}{'fold speed-up':>15}")
    for v, size, last, way in cells:
        if way != "folded":
            continue
        f, m = times[(v, size, last, "folded")], times[(v, size, last, "modules")]
        fm, mm = statistics.median(f), statistics.median(m)
        g = gmacs(backbones[v], size, last)
        print(f"{'efficientnet_lite%d' % v:<20}{size:>6}{last:>8}{g:>7.3f}{fm:>9.1f} ({min(f):.1f}-{max(f):.1f})"
              f"{mm:>9.1f} ({min(m):.1f}-{max(m):.1f}){mm / fm:>8.2f}x")


if __name__ == "__main__":
    main()
