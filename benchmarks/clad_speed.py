"""CLAD+ against PatchCore: predict time per image at k shots, and where CLAD+'s time goes.

    python benchmarks/clad_speed.py                                  # bottle, 1, 2 and 4 shots
    python benchmarks/clad_speed.py --root ../shared/data --category magnetic_tile --shots 4

Both detectors are fitted on the same k references (seed 0) and predict the same test images. CLAD+ is trained for
one epoch only: its predict path (backbone, heads, memory search, maps; a second pass of the last stage when it
is fine-tuned) does not depend on how long it trained, and a full fit would take minutes per shot count. Each time is the best of ``--repeats`` runs;
the headline ratio is paired (``baselines.paired_ratio``): each batch through both detectors back to back, over
``--rounds`` rounds, median and range.
The issue's target is CLAD+ within 1.5x PatchCore's time per image.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from baselines import describe, load_category, paired_ratio
from clad.data.io import load_batch
from clad.detectors.clad import CLADPlus
from clad.detectors.patchcore import PatchCore

REPO = Path(__file__).resolve().parents[1]


def best_ms(fn, n_images: int, repeats: int) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs, in ms per image."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best / n_images * 1e3


def measure(train, test, category: str, repeats: int, batch_size: int, rounds: int) -> dict[str, float]:
    patchcore = PatchCore().fit(train)
    plus = CLADPlus(category=category, epochs=1).fit(train)
    n = len(test)
    batches = [test[i : i + batch_size] for i in range(0, n, batch_size)]
    plus.predict(batches[0])  # warm-up: each index times pruning against brute force on its first batch
    patchcore.predict(batches[0])
    pairs = [(lambda b=b: plus.predict(b, batch_size=batch_size), lambda b=b: patchcore.predict(b, batch_size=batch_size))
             for b in batches]
    out = {
        "paired": paired_ratio(pairs, rounds) if rounds else None,
        "PatchCore predict": best_ms(lambda: patchcore.predict(test, batch_size=batch_size), n, repeats),
        "CLAD+ predict": best_ms(lambda: plus.predict(test, batch_size=batch_size), n, repeats),
    }
    bb, model = plus.model_.backbone, plus.model_
    xs = [bb.preprocess(load_batch(test[i : i + batch_size])[0], plus.config.image_size) for i in range(0, n, batch_size)]
    first, last = plus.config.layers
    with torch.inference_mode():
        stages = [model.stage_features(x, tuned=False) for x in xs]
        flat = [model.combine(h1, h2).permute(0, 2, 3, 1).flatten(0, 2) for h1, h2 in stages]
        out["  backbone forward to the last stage"] = best_ms(lambda: [bb(x, [first, last]) for x in xs], n, repeats)
        tuned = model.tail is not None
        what = "backbone with the fine-tuned last stage, heads" if tuned else "backbone, heads"
        out[f"  language map ({what})"] = best_ms(lambda: [plus._maps(x, need_memory=False) for x in xs], n, repeats)
        if tuned:  # the memory's features need the frozen last stage too
            out["  second, frozen pass of the last stage"] = best_ms(lambda: [bb.run_stage(last, h1) for h1, _ in stages], n, repeats)
        out["  memory search"] = best_ms(lambda: [plus._nearest_memory(f) for f in flat], n, repeats)
    out["memory patches: PatchCore / CLAD+"] = (len(patchcore.memory_bank_), len(plus.memory_bank_))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "mvtec_ad")
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--test-images", type=int, default=80, help="test images timed (the first N)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7, help="rounds of the paired CLAD+ / PatchCore timing (0: skip)")
    args = ap.parse_args(argv)
    print(f"{args.root / args.category}, {torch.get_num_threads()} threads, best of {args.repeats}, ms/image")
    for k in args.shots:
        train, test, _, _ = load_category(args.root, args.category, k, seed=0)
        res = measure(train, test[: args.test_images], args.category, args.repeats, args.batch_size, args.rounds)
        mem = res.pop("memory patches: PatchCore / CLAD+")
        paired = res.pop("paired")
        ratio = res["CLAD+ predict"] / res["PatchCore predict"]
        print(f"\n{k} shot(s): memory {mem[0]} patches (PatchCore coreset) / {mem[1]} (CLAD+); CLAD+ / PatchCore = {ratio:.2f}x "
              f"(best-of times)")
        if paired is not None:
            print(f"  paired CLAD+ / PatchCore, {args.rounds} rounds: {describe(paired)}")
        for name, ms in res.items():
            print(f"  {name:44s} {ms:8.1f}")


if __name__ == "__main__":
    main()
