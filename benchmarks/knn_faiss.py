"""faiss against clad's own nearest-neighbour search, on PatchCore's full-shot memory banks (issue 19).

    python benchmarks/knn_faiss.py                                  # bottle, then magnetic tile; 2, then 1 thread
    python benchmarks/knn_faiss.py --datasets bottle --threads 2 --rounds 3 --cache /tmp/knn_faiss

PatchCore (defaults: 10 % coreset, exact search) is fitted on every training image of the category; the test
patch features are extracted once and kept in memory, so only the search is timed. Each method searches every
batch of 16 test images; in each round every method makes one pass over the batches, in an order rotated each
round, so that a shared machine's noise hits them alike, and ms/image is the median over rounds (a pass per
method, not a batch, so that the OpenMP threads one library leaves spinning after a call cost the next library
once per pass, not once per batch). ``--after-forward`` runs the backbone's forward of each batch, untimed,
right before its search, as predict does. The reference is the plain brute-force
search (``clad.ops.knn.knn``). Per method: ms/image at each thread count, the largest |image score - exact|,
image AUROC (the exact search's beside it), the patch distances' mean excess over the exact ones and their
largest difference, pixel AUROC (``--pixel-auroc``), index build time, the bytes the index holds, and the growth
of the process's resident memory while it was built.

``--cache DIR`` keeps the fitted memory, a sample of left-out training patches and the test features as .npy
files, so a rerun skips the fit.
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import load_category  # noqa: E402

from clad.detectors.patchcore import PatchCore, exact_top  # noqa: E402
from clad.metrics import image_auroc, pixel_auroc  # noqa: E402
from clad.ops.coreset import KCenterIndex  # noqa: E402
from clad.data.io import load_batch  # noqa: E402
from clad.ops.ivf import ProjectedIVF  # noqa: E402
from clad.ops.knn import knn  # noqa: E402
from clad.ops.smoothing import smooth_maps  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DATASETS = {"bottle": (DATA / "mvtec_ad", "bottle"), "magnetic_tile": (DATA, "magnetic_tile")}
BATCH = 16


def rss() -> int:
    """Resident memory of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def cpu_idle(seconds: float = 1.0) -> float:
    """Fraction of the machine's CPU time that was idle over the next ``seconds``."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total
    (i0, t0), _, (i1, t1) = read(), time.sleep(seconds), read()
    return (i1 - i0) / max(1, t1 - t0)


def wait_quiet(min_idle: float, max_wait: float = 30.0) -> None:
    """Wait (up to ``max_wait`` s) for a second in which at least ``min_idle`` of the CPUs was idle: on a machine
    shared with other jobs, a round then starts when they pause, not in the middle of their bursts."""
    end = time.perf_counter() + max_wait
    while min_idle > 0 and cpu_idle() < min_idle and time.perf_counter() < end:
        pass


def held_bytes(obj) -> int:
    """Bytes of the arrays and tensors an own index holds (its attributes)."""
    total = 0
    for v in vars(obj).values():
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, np.ndarray):
            total += v.nbytes
    return total


def built(make):
    """(index, build seconds, RSS growth in bytes) of ``make()``."""
    gc.collect()
    r0, t0 = rss(), time.perf_counter()
    index = make()
    return index, time.perf_counter() - t0, rss() - r0


class FaissProbe:
    """faiss IVF as the approximate search under ``exact_top``: ``nearest`` probes ``nprobe`` lists, ``closer`` two,
    ``exact`` is faiss's flat index. Every distance is a true distance to a memory row, so an upper bound."""

    def __init__(self, ivf, flat):
        self.ivf, self.flat = ivf, flat

    def _search(self, index, query: torch.Tensor, nprobe: int | None = None):
        q = np.ascontiguousarray(query.detach().float().cpu().numpy())
        if nprobe is not None:
            index.nprobe = nprobe
        d, i = index.search(q, 1)
        d = np.where(i[:, 0] < 0, np.inf, d[:, 0])  # a probe of empty lists finds nothing: no bound
        return torch.from_numpy(np.sqrt(np.maximum(d, 0))), torch.from_numpy(i[:, 0])

    def nearest(self, query, n_probe=1, indices=True):
        return self._search(self.ivf, query, n_probe)

    def closer(self, query, indices=True):
        return self._search(self.ivf, query, 2)

    def exact(self, query, bound, indices=True):
        return self._search(self.flat, query)


def faiss_search(index, nprobe: int | None = None, ef: int | None = None):
    """A search function (B, P, C) -> distances (B, P) for a faiss index."""
    def run(feats: torch.Tensor) -> torch.Tensor:
        if nprobe is not None:
            index.nprobe = nprobe
        if ef is not None:
            index.hnsw.efSearch = ef
        b, p, c = feats.shape
        d, i = index.search(feats.reshape(-1, c).numpy(), 1)
        d = np.where(i[:, 0] < 0, np.inf, d[:, 0])
        return torch.from_numpy(np.sqrt(np.maximum(d, 0))).view(b, p)
    return run


def load(name: str, cache: Path | None, seed: int):
    """(memory (M, C), decide sample (S, C), test feature batches [(B, P, C)], patch grid (h, w), image shapes
    per batch, test images, labels (N,), masks)."""
    root, category = DATASETS[name]
    train, test, labels, masks = load_category(root, category)
    shapes = [[a.shape[:2] for a in test[i : i + BATCH]] for i in range(0, len(test), BATCH)]
    files = {k: cache / f"{name}_{k}.npy" for k in ("memory", "sample", "test")} if cache else {}
    if files and all(f.exists() for f in files.values()):
        memory, sample, feats = (torch.from_numpy(np.load(files[k])) for k in ("memory", "sample", "test"))
        grid = (int(math.isqrt(feats.shape[1])),) * 2
        print(f"{name}: memory, sample and test features from {cache}")
    else:
        t0 = time.perf_counter()
        det = PatchCore(seed=seed).fit(train)
        fs = det.fit_seconds_
        print(f"{name}: {len(train)} train images, fit {time.perf_counter() - t0:.0f} s (features {fs['features']:.0f}"
              f" + coreset {fs['coreset']:.0f} + index {fs['index']:.1f}); bank {det.bank_size_} -> "
              f"{len(det.memory_bank_)} x {det.memory_bank_.shape[1]}")
        memory = det.memory_bank_
        # left-out training patches to decide pruning against brute force on, as fit does (any real patches do)
        with torch.inference_mode():
            sample = torch.cat([det._embed(load_batch(train[i : i + BATCH])[0]).permute(0, 2, 3, 1).flatten(0, 2)
                                for i in range(0, len(train), BATCH)])
        sample = sample[torch.randperm(len(sample), generator=torch.Generator().manual_seed(seed))[: KCenterIndex.decide_min]]
        with torch.inference_mode():
            embs = [det._embed(load_batch(test[i : i + BATCH])[0]) for i in range(0, len(test), BATCH)]
        grid = tuple(embs[0].shape[2:])
        feats = torch.cat([e.permute(0, 2, 3, 1).flatten(1, 2) for e in embs])  # (N, P, C)
        if files:
            cache.mkdir(parents=True, exist_ok=True)
            for k, v in (("memory", memory), ("sample", sample), ("test", feats)):
                np.save(files[k], v.numpy())
    batches = list(feats.contiguous().split(BATCH))
    return memory.contiguous(), sample, batches, grid, shapes, test, labels, masks


def bench(name: str, args) -> list[dict]:
    memory, sample, batches, grid, shapes, test, labels, masks = load(name, args.cache, args.seed)
    m, c = memory.shape
    n_images = sum(len(b) for b in batches)
    bank = memory.numpy()
    torch.set_num_threads(max(args.threads))
    faiss.omp_set_num_threads(max(args.threads))

    methods, info = {}, {}  # name -> search fn; name -> (build s, held bytes, RSS growth)
    own, t, r = built(lambda: KCenterIndex(memory))
    own.decide(sample)
    info[f"own exact (KCenterIndex, {own.search})"] = (t, held_bytes(own), r)
    methods[f"own exact (KCenterIndex, {own.search})"] = lambda f: own.nearest(f.reshape(-1, c), indices=False)[0].view(f.shape[:2])
    bank_sq = (memory * memory).sum(1)
    info["own brute force (knn)"] = (0.0, 0, 0)
    methods["own brute force (knn)"] = lambda f: knn(f.reshape(-1, c), memory, indices=False, bank_sq=bank_sq)[0].view(f.shape[:2])
    ivf, t, r = built(lambda: ProjectedIVF(memory, 32))
    info["own n_probe=1 (ProjectedIVF), no exact maxima"] = (t, held_bytes(ivf), r)
    info["own n_probe=1 + exact maxima (ProjectedIVF, exact_top)"] = info["own n_probe=1 (ProjectedIVF), no exact maxima"]

    def probed(f, certify):
        d = ivf.nearest(f.reshape(-1, c), 1, indices=False)[0].view(f.shape[:2])
        if certify:
            exact_top(ivf, f, d)
        return d

    methods["own n_probe=1 (ProjectedIVF), no exact maxima"] = lambda f: probed(f, False)
    methods["own n_probe=1 + exact maxima (ProjectedIVF, exact_top)"] = lambda f: probed(f, True)

    def make_flat():
        index = faiss.IndexFlatL2(c)
        index.add(bank)
        return index

    flat, t, r = built(make_flat)
    info["faiss IndexFlatL2"] = (t, faiss.serialize_index(flat).nbytes, r)
    methods["faiss IndexFlatL2"] = faiss_search(flat)
    nlist = max(1, round(math.sqrt(m)))

    def make_ivf():
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(c), c, nlist)
        index.cp.seed = args.seed
        index.train(bank)
        index.add(bank)
        return index

    fivf, t, r = built(make_ivf)
    for p in args.nprobe:
        info[f"faiss IVF{nlist},Flat nprobe={p}"] = (t, faiss.serialize_index(fivf).nbytes, r)
        methods[f"faiss IVF{nlist},Flat nprobe={p}"] = faiss_search(fivf, nprobe=p)
    hybrid = FaissProbe(fivf, flat)

    def faiss_certified(f):
        d = hybrid.nearest(f.reshape(-1, c), 1)[0].view(f.shape[:2])
        exact_top(hybrid, f, d)
        return d

    info[f"faiss IVF{nlist} nprobe=1 + exact maxima (exact_top, Flat)"] = (
        t, faiss.serialize_index(fivf).nbytes + faiss.serialize_index(flat).nbytes, r)
    methods[f"faiss IVF{nlist} nprobe=1 + exact maxima (exact_top, Flat)"] = faiss_certified

    def make_hnsw():
        index = faiss.IndexHNSWFlat(c, 32)
        index.add(bank)
        return index

    hnsw, t, r = built(make_hnsw)
    for ef in args.ef:
        info[f"faiss HNSW32 efSearch={ef}"] = (t, faiss.serialize_index(hnsw).nbytes, r)
        methods[f"faiss HNSW32 efSearch={ef}"] = faiss_search(hnsw, ef=ef)

    # the reference: plain brute force, and each method's own results (not timed)
    with torch.inference_mode():
        exact = [methods["own brute force (knn)"](f) for f in batches]
        results = {k: [fn(f) for f in batches] for k, fn in methods.items()}  # also the warm-up
    ref = torch.cat(exact)  # (N, P)
    ref_scores = ref.amax(1).numpy()

    def pix(dist):
        maps = [m_ for d, s in zip(dist.split(BATCH), shapes) for m_ in smooth_maps(d.view(-1, *grid), 256, 4.0, s)]
        return pixel_auroc(masks, maps)

    ref_pix = pix(ref) if args.pixel_auroc else float("nan")
    rows = []
    for k, parts in results.items():
        d = torch.cat(parts)
        scores = d.amax(1).numpy()
        rows.append({
            "dataset": name, "method": k, "M": m, "images": n_images,
            "score_err": float(np.abs(scores - ref_scores).max()),
            "image_auroc": image_auroc(labels, scores), "image_auroc_exact": image_auroc(labels, ref_scores),
            "excess": float((d / ref.clamp_min(1e-12)).mean() - 1), "patch_err": float((d - ref).abs().max()),
            "pixel_auroc": pix(d) if args.pixel_auroc else float("nan"), "pixel_auroc_exact": ref_pix,
            "build_s": info[k][0], "bytes": info[k][1], "rss": info[k][2],
        })

    forwards = [None] * len(batches)
    if args.after_forward:
        from clad.registry import create_backbone

        bb = create_backbone("efficientnet_lite0")
        layers = PatchCore.Config().layers
        with torch.inference_mode():
            xs = [bb.preprocess(load_batch(test[i : i + BATCH])[0], 256) for i in range(0, len(test), BATCH)]
        forwards = [lambda x=x: bb(x, layers) for x in xs]
    # timing on an evenly spaced subset of the batches, if asked (exactness is over all of them)
    step = max(1, len(batches) * BATCH // args.time_images) if args.time_images else 1
    timed = list(zip(batches[::step], forwards[::step]))
    for row, ms in zip(rows, time_methods(methods, timed, args).values()):
        row.update(ms)
    if args.brute_rows:  # brute force on smaller memories (prefixes of the coreset: coresets themselves)
        small = {}
        for n in args.brute_rows:
            sub, sub_np = memory[:n].contiguous(), bank[:n]
            sub_sq = (sub * sub).sum(1)
            small_flat = faiss.IndexFlatL2(c)
            small_flat.add(sub_np)
            for k in (1, 3):
                small[f"own brute force (knn), {n} rows, k={k}"] = (
                    lambda f, s_=sub, q_=sub_sq, k=k: knn(f.reshape(-1, c), s_, k=k, indices=k > 1, bank_sq=q_))
                small[f"faiss IndexFlatL2, {n} rows, k={k}"] = lambda f, i_=small_flat, k=k: i_.search(f.reshape(-1, c).numpy(), k)
        with torch.inference_mode():
            for fn in small.values():  # warm-up
                fn(batches[0])
        for k, ms in time_methods(small, timed, args).items():
            rows.append({"dataset": name, "method": k, "M": m, "brute_only": True, **ms})
    return rows


def time_methods(methods: dict, timed: list, args) -> dict[str, dict]:
    """{method: {"ms_T": (median, min, max) ms/image over rounds}} for each thread count T. ``timed``: (features
    (B, P, C), the batch's forward or None) pairs; each round runs every method over all of them, in an order
    rotated each round."""
    names, n = list(methods), sum(len(f) for f, _ in timed)
    out = {k: {} for k in names}
    for threads in args.threads if args.rounds else []:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        times = np.zeros((args.rounds, len(names)))
        with torch.inference_mode():
            for rnd in range(args.rounds):
                wait_quiet(args.min_idle)
                for j in range(len(names)):
                    i = (j + rnd) % len(names)
                    for f, forward in timed:
                        if forward is not None:
                            forward()
                        t0 = time.perf_counter()
                        methods[names[i]](f)
                        times[rnd, i] += time.perf_counter() - t0
        med, lo, hi = (np.percentile(times, q, axis=0) / n * 1e3 for q in (50, 0, 100))
        for k, a, b, c in zip(names, med, lo, hi):
            out[k][f"ms_{threads}"] = (a, b, c)
        print(f"{threads} thread(s): {args.rounds} rounds of {len(names)} methods over {n} images done", flush=True)
    return out


def table(rows: list[dict], threads: list[int]) -> str:
    head = (["dataset (memory rows)", "method"] + [f"ms/image, {t} thr. (range)" for t in threads]
            + ["max abs image-score err", "image AUROC (exact)", "patch dist. mean excess", "max abs patch err",
               "pixel AUROC (exact)", "build s", "index MB", "RSS growth MB"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ms = [f"{r[f'ms_{t}'][0]:.2f} ({r[f'ms_{t}'][1]:.2f}-{r[f'ms_{t}'][2]:.2f})" if f"ms_{t}" in r else "" for t in threads]
        if r.get("brute_only"):
            out.append("| " + " | ".join([f"{r['dataset']} ({r['M']})", r["method"]] + ms + [""] * 8) + " |")
            continue
        cells = ([f"{r['dataset']} ({r['M']})", r["method"]] + ms
                 + [f"{r['score_err']:.1e}", f"{r['image_auroc'] * 100:.2f} ({r['image_auroc_exact'] * 100:.2f})",
                    f"{r['excess'] * 100:.2f} %", f"{r['patch_err']:.2e}",
                    f"{r['pixel_auroc'] * 100:.2f} ({r['pixel_auroc_exact'] * 100:.2f})",
                    f"{r['build_s']:.2f}", f"{r['bytes'] / 2**20:.1f}", f"{r['rss'] / 2**20:.0f}"])
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="thread counts, torch and faiss alike")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--time-images", type=int, default=None,
                    help="time the search on about this many test images, evenly spaced batches (default: all)")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16], help="faiss IVF lists probed")
    ap.add_argument("--ef", type=int, nargs="+", default=[16, 64], help="faiss HNSW efSearch")
    ap.add_argument("--after-forward", action="store_true",
                    help="run the backbone's forward of each batch (untimed) before its search, as predict does")
    ap.add_argument("--brute-rows", type=int, nargs="*", default=[1024, 4096],
                    help="also brute force alone (own knn, faiss flat; k = 1 and 3) on this many memory rows")
    ap.add_argument("--min-idle", type=float, default=0.75,
                    help="start each round after a second with at least this fraction of the CPUs idle, waiting 30 s at most")
    ap.add_argument("--pixel-auroc", action="store_true", help="also pixel AUROC per method (slow)")
    ap.add_argument("--cache", type=Path, default=None, help="folder for the fitted memory and test features")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"faiss {faiss.__version__}, torch {torch.__version__}, {torch.get_num_threads()} torch threads available")
    rows = [r for name in args.datasets for r in bench(name, args)]
    print(table(rows, args.threads))


if __name__ == "__main__":
    main()
