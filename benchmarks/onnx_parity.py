"""ONNX export on real data: onnxruntime's scores and maps against torch's, and images/s of each on this CPU.

    nice -n 5 python benchmarks/onnx_parity.py                      # bottle and magnetic tile, the default cases
    python benchmarks/onnx_parity.py --data mvtec:../shared/data/mvtec_ad:bottle --cases patchcore:1 --n-speed 16

For each dataset (``SCHEME:ROOT:CATEGORY``) and case (``DETECTOR:SHOTS``, shots a number or ``all``; seed 0):
fits the torch detector on the references, exports it (``clad.export.export_onnx``), predicts the whole test split
with both runtimes (torch as ``Detector.predict``, onnxruntime as ``OnnxDetector.predict``, batches of
``--batch-size``, on all the process's threads) and prints, as one markdown table:

- the largest relative error of the image scores, max_i |s_ort - s_torch| / |s_torch|, and of the maps at each
  image's own resolution, max_i max|m_ort - m_torch| / max|m_torch| (the issue's bound: 1e-4);
- for PatchCore and patch_knn, the same map error of each runtime against maps whose patch distances are measured
  in float64 on torch's features (``exact_maps``): how much of the difference is whose rounding;
- images/s of each runtime at 1 and 2 threads (torch.set_num_threads; onnxruntime's intra-op threads), on the first
  ``--n-speed`` test images already decoded (the resize to the input, the graph or the torch forward and search,
  the maps' resize to each image's size), in batches of ``--batch-size``, the best of ``--rounds`` interleaved
  rounds after one untimed round each.

The machine's load average is printed before and after: the speed figures are only comparable within one run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from clad.data import open_dataset  # noqa: E402
from clad.data.io import load_batch  # noqa: E402
from clad.evaluate import load_split  # noqa: E402
from clad.export import OnnxDetector, export_onnx  # noqa: E402
from clad.ops.knn import knn  # noqa: E402
from clad.ops.smoothing import smooth_maps  # noqa: E402
from clad.registry import create_detector  # noqa: E402
from clad.specs import detector_params, parse_shot  # noqa: E402

DATA = ["mvtec:/work/shared/data/mvtec_ad:bottle", "mvtec:/work/shared/data:magnetic_tile"]
CASES = "patchcore:1,patchcore:all,patch_knn:1,padim:1,clad_plus:1"


def map_error(ours, theirs) -> float:
    """max_i max|ours_i - theirs_i| / max|theirs_i| over two lists of maps."""
    return max(float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-12))
               for a, b in zip(ours, theirs, strict=True))


def relative_errors(ours, theirs) -> tuple[float, float]:
    """(largest relative error of the scores, of the maps), as the module docstring defines them."""
    s_ort, s_torch = np.asarray(ours.scores, np.float64), np.asarray(theirs.scores, np.float64)
    scores = float(np.max(np.abs(s_ort - s_torch) / np.maximum(np.abs(s_torch), 1e-12)))
    return scores, map_error(ours.anomaly_maps, theirs.anomaly_maps)


def exact_maps(det, images, batch_size: int) -> list[np.ndarray] | None:
    """PatchCore's or patch_knn's maps from patch distances measured in float64 on torch's own features (the nearest
    row among the 8 nearest by float32), so that each runtime's float32 rounding can be told apart; None for the
    other detectors."""
    if det.name not in ("patchcore", "patch_knn") or getattr(det.config, "reweight", False):
        return None
    bank, out = det.memory_bank_, []
    for start in range(0, len(images), batch_size):
        arrays, shapes = load_batch(images[start : start + batch_size])
        with torch.inference_mode():
            emb = det._embed(arrays)  # (B, C, h, w)
        b, c, h, w = emb.shape
        q = emb.permute(0, 2, 3, 1).reshape(-1, c)
        _, candidates = knn(q, bank, k=8)  # (N, 8)
        d = (q.double()[:, None] - bank.double()[candidates]).norm(dim=-1).amin(1)  # (N,)
        out += smooth_maps(d.view(b, h, w), det.config.image_size, det.config.sigma, shapes)
    return out


def images_per_second(predict, images, batch_size: int) -> float:
    t0 = time.perf_counter()
    predict(images, batch_size=batch_size)
    return len(images) / (time.perf_counter() - t0)


def speeds(det, path: Path, images, batch_size: int, rounds: int, threads=(1, 2)) -> dict[str, float]:
    """{"torch 1": images/s, "onnxruntime 1": ..., ...}: the best of ``rounds``, the runtimes interleaved."""
    before = torch.get_num_threads()
    sessions = {t: OnnxDetector(path, threads=t) for t in threads}
    best: dict[str, float] = {}
    try:
        for r in range(rounds + 1):  # round 0 warms up and is not counted
            for t in threads:
                torch.set_num_threads(t)
                for name, predict in (("torch", det.predict), ("onnxruntime", sessions[t].predict)):
                    speed = images_per_second(predict, images, batch_size)
                    if r:
                        best[f"{name} {t}"] = max(best.get(f"{name} {t}", 0.0), speed)
    finally:
        torch.set_num_threads(before)
    return best


def run_case(data: str, case: str, args, tmp: Path) -> dict:
    scheme, _, rest = data.partition(":")
    root, _, category = rest.rpartition(":")
    name, _, shots = case.partition(":")
    n_shots = parse_shot(shots)
    train, _ = load_split(open_dataset(f"{scheme}:{root}", category, "train", n_shots=n_shots, seed=0), progress=False)
    test, _ = load_split(open_dataset(f"{scheme}:{root}", category, "test"), progress=False)
    images = [s.image for s in test]
    det = create_detector(name, **detector_params(name, {}, seed=0, category=category, aux=None))
    t0 = time.perf_counter()
    det.fit([s.image for s in train])
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    path = export_onnx(det, tmp / f"{category}-{name}-{shots}.onnx")
    export_s = time.perf_counter() - t0
    theirs = det.predict(images, batch_size=args.batch_size)
    ours = OnnxDetector(path).predict(images, batch_size=args.batch_size)
    score_err, map_err = relative_errors(ours, theirs)
    exact = exact_maps(det, images, args.batch_size)
    torch_exact, ort_exact = (None, None) if exact is None else (map_error(theirs.anomaly_maps, exact),
                                                                 map_error(ours.anomaly_maps, exact))
    memory = getattr(det, "memory_bank_", None)
    return {"data": category, "detector": name, "shots": shots, "n_test": len(images),
            "memory": "-" if memory is None else len(memory), "mb": path.stat().st_size / 1e6, "fit_s": fit_s,
            "export_s": export_s, "score_err": score_err, "map_err": map_err, "torch_exact": torch_exact,
            "ort_exact": ort_exact,
            **speeds(det, path, images[: args.n_speed], args.batch_size, args.rounds)}


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", default=DATA, help="SCHEME:ROOT:CATEGORY (default: bottle, magnetic tile)")
    p.add_argument("--cases", default=CASES, help=f"DETECTOR:SHOTS,... (default {CASES})")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-speed", type=int, default=32, help="test images timed (default 32)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per runtime and thread count (default 2)")
    args = p.parse_args(argv)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs; torch "
          f"{torch.__version__}; onnxruntime {__import__('onnxruntime').__version__}", flush=True)
    head = ("| data | detector | shots | test images | memory rows | .onnx MB | export s | score rel. err. | "
            "map rel. err. | torch map vs float64 | ORT map vs float64 | torch 1 thr. img/s | ORT 1 thr. img/s | "
            "torch 2 thr. img/s | ORT 2 thr. img/s |")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data:
            for case in args.cases.split(","):
                r = run_case(data, case, args, Path(tmp))
                rows.append(f"| {r['data']} | {r['detector']} | {r['shots']} | {r['n_test']} | {r['memory']} | "
                            f"{r['mb']:.1f} | {r['export_s']:.1f} | {r['score_err']:.1e} | {r['map_err']:.1e} | "
                            f"{_sci(r['torch_exact'])} | {_sci(r['ort_exact'])} | "
                            f"{r['torch 1']:.1f} | {r['onnxruntime 1']:.1f} | {r['torch 2']:.1f} | "
                            f"{r['onnxruntime 2']:.1f} |")
                print(rows[-1], f"(fit {r['fit_s']:.0f} s)", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("\n".join([head, "|" + "---|" * (head.count("|") - 1), *rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
