"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

fit: embed every normal image into locally aggregated mid-level patch features, fill a memory bank with all of
them, and keep a greedy k-center coreset of it. predict: each test patch's score is the distance to its nearest
memory item; the image score is the largest patch score (optionally re-weighted, Eq. 7); the map is the patch
scores upsampled to the working size, Gaussian-smoothed and resized to each image's own resolution.

Choices for a fast CPU baseline (measured in benchmarks/baselines.py):
- features: ``stage2`` + ``stage3`` (strides 8 and 16) of the backbone, 3x3 average aggregation, stage3 upsampled
  to the stride-8 grid and concatenated: 40 + 112 = 152 channels for efficientnet_lite0. That is small already,
  so by default no channel pooling is applied (``embed_dim=None``). ``embed_dim=D`` applies PatchCore's own
  reduction: adaptive average pooling over channels to D per layer, then over the concatenation to D.
- robustness (``reference_jitter``, default 1): one photometric variant of each reference (brightness, contrast,
  blur, noise; ``clad.data.corruptions.jittered_copies``) joins the bank, so a test image under another light is
  not an anomaly for that alone.
- coreset: ``ceil(coreset_ratio * N)`` of the N bank patches (the copies' included; ``coreset_of="references"``:
  N counts the references' own patches only, so the memory does not grow with the jitter), selected in a 128-d
  Gaussian random projection by the exact greedy k-center rule, with batched distance updates
  (``clad.ops.coreset.greedy_coreset``): without jitter, full-shot bottle (214k patches -> 21k) in about 16 s on
  2 cores, full-shot magnetic tile (779k -> 78k) in about 8 min; one copy per reference doubles the bank and the
  memory, and so multiplies the selection's time by about 4.
- search: exact nearest neighbour with ``KCenterIndex`` (clusters of the memory bank from k-center centres refined
  by k-means, pruned with the triangle inequality, or brute force where its first search finds that faster, as
  on fine texture), built from the memory bank when first needed, so it is never saved. ``n_probe=n`` makes it
  an approximate inverted-file search of each patch's n closest clusters, for memories of at least ``probe_min``
  rows: by default in the memory's 32 leading principal components (``ProjectedIVF``; each distance is still
  measured in every channel to a real memory row, so it can only be too large). Each image's largest patch
  distance is then made exact (``exact_top``), so image scores do not change.
- predict: each batch is split over torch's threads, one part per thread (``workers``), with one torch thread
  each; the same results as one call, faster on a CPU (see ``_predict_batch``).
- map: upsampling, blur and resize are folded into two small matrices per axis (``smooth_maps``).
- shape (``resize``, ``zoom``, ``tile``; ``clad.ops.geometry``): every image squeezed to ``image_size`` squared, or
  kept in shape at one scale learnt from the references (``scale_``), whole or in overlapping tiles.
- teaching (``add_references``): the new references' patches join the memory by the greedy k-center rule
  continued from it (``continue_coreset``), as many as keep it ``coreset_ratio`` of every patch seen (counted as
  ``coreset_of`` says); the search indexes take the new rows without a rebuild (``extended``) until the memory has
  doubled since they were built.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from clad.data.corruptions import jittered_copies
from clad.data.io import load_batch
from clad.detectors.base import Detector, bounded
from clad.detectors.capabilities import BackbonePatchFeatures, from_config
from clad.ops.coreset import KCenterIndex, continue_coreset, greedy_coreset, worker_pool
from clad.ops.features import aggregate, patch_embeddings
from clad.ops.geometry import RESIZE_MODES, STEP, Geometry, reference_scale
from clad.ops.gradcam import grad_cam
from clad.ops.ivf import ProjectedIVF, one_blas_thread
from clad.ops.knn import knn
from clad.ops.smoothing import smooth_maps


@dataclass
class PatchCoreConfig:
    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("stage2", "stage3")
    image_size: int = bounded(256, "[8, inf)")
    neighbourhood: int = bounded(3, "[1, inf)")  # local aggregation window, in patches
    # PatchCore's channel pooling to this many dims; None keeps all channels
    embed_dim: int | None = bounded(None, "[1, inf)")
    coreset_ratio: float = bounded(0.1, "(0, 1]")  # fraction of the memory bank kept (1.0: no subsampling)
    projection_dim: int | None = bounded(128, "[1, inf)")  # random projection used by the coreset selection only
    # 0: exact nearest neighbour; n > 0: search only the n closest memory clusters (approximate)
    n_probe: int = bounded(0, "[0, inf)")
    # n_probe applies to memories of at least this many rows; smaller ones are searched exactly, since there the
    # approximate search saves little and its few, small clusters cost accuracy (benchmarks/README.md).
    probe_min: int = bounded(8192, "[0, inf)", omit_from_key_when={"n_probe": 0})
    # With n_probe, the patches that may hold an image's largest score are searched again exactly, highest
    # approximate score first, until that maximum is certain (``exact_top``): image scores are then the exact
    # search's, and only the map keeps approximate values below each image's top (figures in
    # benchmarks/README.md).
    exact_max: bool = field(default=True, metadata={"omit_from_key_when": {"n_probe": 0}})
    # With n_probe, the search runs in this many leading principal components of the memory (``ProjectedIVF``:
    # each patch's candidate row is found there, its distance measured in all channels); None searches all
    # channels with ``KCenterIndex``'s clusters: faster at the same AUROCs (benchmarks/README.md, "Session 10").
    probe_dim: int | None = bounded(32, "[1, inf)", omit_from_key_when={"n_probe": 0})
    # predict splits each batch into this many parts, run side by side on threads with one torch thread each
    # (None: torch's thread count; 1: the whole batch in one call, torch's threads inside each operation). Split,
    # the search's own threads no longer wait on cores that OpenMP keeps spinning after each parallel operation
    # (benchmarks/README.md, "Session 10").
    workers: int | None = bounded(None, "[1, inf)", omit_from_key_when={"workers": None})
    reweight: bool = False  # Eq. 7 of the paper on the image score
    # b in Eq. 7: memory items around m* (m* included); b = 1 would make every weight 0
    reweight_neighbours: int = bounded(3, "[2, inf)")
    sigma: float = bounded(4.0, "[0, inf)")  # Gaussian smoothing of the map, in working-resolution pixels
    # photometric variants of each reference (clad.data.corruptions.jittered_copies) added to the bank before the
    # coreset; 0: none. On by default: lighting, contrast, blur and noise shifts cost far less (benchmarks/README.md,
    # "Corruption robustness")
    reference_jitter: int = bounded(1, "[0, inf)", omit_from_key_when={"reference_jitter": 0})
    # what coreset_ratio is a fraction of: "bank", every patch, the copies' included (the memory grows with the
    # jitter), or "references", the references' own patches (the memory keeps its size, shared with the copies)
    coreset_of: str = field(default="bank", metadata={"omit_from_key_when": {"reference_jitter": 0}})
    # score each patch by its distance minus the median of its image's, so that a change of the whole image
    # (noise, blur, lighting) that moves every score alike moves none. Measured worse (benchmarks/README.md,
    # "Corruption robustness"): clean AUROC falls on magnetic tile and the drop grows on bottle; kept off.
    median_baseline: bool = field(default=False, metadata={"omit_from_key_when": {"median_baseline": False}})
    batch_size: int = bounded(16, "[1, inf)")  # images per backbone call during fit
    # How an image of any shape becomes the backbone's input (``clad.ops.geometry``): "squeeze" to image_size x
    # image_size, or "keep" its aspect at one scale learnt from the references (image_size / their median
    # sqrt(H * W), times ``zoom``); with keep, ``tile`` cuts working images with a longer side into overlapping
    # tiles of that size (with zoom > 1: the high-resolution mode). Measured in benchmarks/README.md ("Shape").
    resize: str = field(default="squeeze", metadata={"omit_from_key_when": {"resize": "squeeze"}})
    zoom: float = bounded(1.0, "[0.25, 8]", omit_from_key_when={"resize": "squeeze"})
    tile: int | None = bounded(None, "[128, inf)", omit_from_key_when={"tile": None})
    seed: int = 0

    def __post_init__(self):
        self.layers = tuple(self.layers)
        if self.coreset_of not in ("bank", "references"):
            raise ValueError(f"coreset_of must be 'bank' or 'references', got {self.coreset_of!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.tile is not None and self.tile % STEP:
            raise ValueError(f"tile must be a multiple of {STEP}, got {self.tile}")
        if self.resize == "squeeze" and (self.zoom != 1.0 or self.tile is not None):
            raise ValueError("zoom and tile apply to resize=keep only")


def coreset_size(n_patches: int, ratio: float) -> int:
    """Number of memory items PatchCore keeps out of ``n_patches``: ceil(ratio * n), at least 1."""
    return min(n_patches, max(1, math.ceil(ratio * n_patches - 1e-9)))


def exact_top(index: KCenterIndex | ProjectedIVF, feats: torch.Tensor, dist: torch.Tensor,
              nearest: torch.Tensor | None = None, start: int = 1, tighten: int = 16) -> int:
    """Make each image's largest patch distance exact, in place, after an approximate search.

    feats (B, P, D): the patches of B images; dist (B, P): their approximate nearest-neighbour distances, which
    can only be too large (``nearest`` of the index with ``n_probe`` > 0); nearest (B, P) their memory rows, or
    None.

    1. Each image's ``tighten`` patches of highest distance are searched again more widely (``index.closer``),
       which lowers their bounds, so that fewer of them need step 2.
    2. Each image's patches are searched exactly (``index.exact``) from the highest bound down, ``start`` of them
       first, then as many more each round (1, 2, 4, ... in all), until the largest exact distance found is at
       least the bound of every patch not yet searched.

    Since no patch's exact distance exceeds its bound, that maximum is the exact search's. The patches searched
    exactly get their exact distance (and row); the others keep an upper bound. Returns the number of patches
    searched exactly.
    """
    b, p, c = feats.shape
    rows = torch.arange(b)[:, None]
    if tighten:
        k = min(tighten, p)
        top = dist.topk(k, dim=1).indices
        d, i = index.closer(feats[rows, top].reshape(-1, c), indices=nearest is not None)
        old = dist.gather(1, top)
        better = d.view(b, k) < old
        dist.scatter_(1, top, torch.where(better, d.view(b, k), old))
        if nearest is not None:
            nearest.scatter_(1, top, torch.where(better, i.view(b, k), nearest.gather(1, top)))
    approx = dist.clone()
    depth = min(p, 64)  # a sorted prefix is enough for almost every image; all of it is sorted when not
    bound, order = approx.topk(depth, dim=1)  # descending
    todo, lo, hi, searched = torch.arange(b), 0, min(start, p), 0
    while len(todo) and lo < p:
        if depth < p and hi >= depth:  # the next round, or the bound after it, lies past the sorted prefix
            depth = p
            bound, order = approx.sort(dim=1, descending=True)
        pos = order[todo, lo:hi]  # (T, hi - lo) patches searched this round
        query = feats[todo[:, None], pos].reshape(-1, c)
        d, i = index.exact(query, approx[todo[:, None], pos].reshape(-1), indices=nearest is not None)
        dist[todo[:, None], pos] = d.view(len(todo), -1)
        if nearest is not None:
            nearest[todo[:, None], pos] = i.view(len(todo), -1)
        searched += pos.numel()
        if hi == p:
            break
        best = dist[todo[:, None], order[todo, :hi]].amax(1)
        todo = todo[best < bound[todo, hi]]  # an unsearched patch might still be larger
        lo, hi = hi, min(2 * hi, p)
    return searched


class PatchCore(BackbonePatchFeatures, Detector):
    """Nearest-neighbour distance to a coreset of normal patch features; image score = largest patch score."""

    Config = PatchCoreConfig
    score_is_map_max = from_config(lambda cfg: not cfg.reweight)  # Eq. 7 scales the largest patch score
    can_add_references = True

    def _geometry(self) -> Geometry:
        cfg = self.config
        return Geometry(cfg.resize, cfg.image_size, getattr(self, "scale_", None), cfg.tile)

    def _embed(self, arrays) -> list[tuple[list[int], torch.Tensor, tuple[int, int]]]:
        """RGB arrays -> [(indices, patch features (B_g, C, h, w), working (H, W))], one group per working shape
        (one group when squeezed)."""
        bb, geometry = self._backbone(), self._geometry()
        stride = bb.info(self.config.layers[0]).stride
        out = []
        for idx, hw in geometry.groups([a.shape[:2] for a in arrays]):
            x = bb.preprocess([arrays[i] for i in idx], hw)
            out.append((idx, geometry.features(x, self._features, stride).cpu(), hw))
        return out

    @torch.inference_mode()
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch (B, 3, S, S) -> patch features (B, C, h, w)."""
        cfg = self.config
        return self._project(patch_embeddings(self._backbone(), x, cfg.layers, cfg.neighbourhood))

    def _project(self, emb: torch.Tensor) -> torch.Tensor:
        """Aggregated features (B, sum C_l, h, w) -> (B, embed_dim, h, w): per-layer then joint adaptive pooling."""
        cfg = self.config
        if cfg.embed_dim is None:
            return emb
        bb = self._backbone()
        b, _, h, w = emb.shape
        per_layer = emb.split([bb.info(n).channels for n in cfg.layers], dim=1)
        pooled = [F.adaptive_avg_pool1d(f.permute(0, 2, 3, 1).reshape(-1, 1, f.shape[1]), cfg.embed_dim) for f in per_layer]
        emb = F.adaptive_avg_pool1d(torch.cat(pooled, dim=2), cfg.embed_dim)  # (B*h*w, 1, D)
        return emb.view(b, h, w, cfg.embed_dim).permute(0, 3, 1, 2)

    def gradcam(self, images, batch_size: int = 16) -> list[np.ndarray]:
        """Grad-CAM (paper Eq. 5) of the image score w.r.t. the deepest layer's activations: one map per image.

        The score is the largest patch distance to the memory; the nearest memory row of each patch is found
        without gradient, then the distance to it is differentiated (the min is piecewise that distance).
        """
        self._check_fitted()
        bb = self._backbone()
        out = []
        for start in range(0, len(images), batch_size):
            arrays, shapes = load_batch(images[start : start + batch_size])
            maps = [None] * len(arrays)
            for idx, hw in self._geometry().groups(shapes):  # whole images, not tiles
                for i, m in zip(idx, self._gradcam_group(bb, [arrays[i] for i in idx], hw, [shapes[i] for i in idx])):
                    maps[i] = m
            out += maps
        return out

    def _gradcam_group(self, bb, arrays, hw, shapes) -> list[np.ndarray]:
        """``gradcam`` of images of one working shape."""
        cfg = self.config
        x = bb.preprocess(arrays, hw)
        with torch.no_grad():
            feats = bb(x, cfg.layers)
        act = feats[cfg.layers[-1]].detach().requires_grad_(True)
        with torch.enable_grad():
            emb = self._project(aggregate({**feats, cfg.layers[-1]: act}, cfg.layers, cfg.neighbourhood))
            b, c, h, w = emb.shape
            flat = emb.permute(0, 2, 3, 1).reshape(-1, c)
            with torch.inference_mode():  # the rows as predict finds them
                _, nearest = self._search(flat.detach().view(b, h * w, c), indices=True)
            score = (flat - self.memory_bank_[nearest.reshape(-1)]).norm(dim=1).view(b, h * w).max(1).values
            cam = grad_cam(score, act)
        return smooth_maps(cam.detach(), hw, cfg.sigma, shapes)

    def _patches(self, images, first: int = 0) -> torch.Tensor:
        """The memory bank's patches of ``images``, references ``first``, ``first + 1``, ..., with their jittered
        copies: (N, C)."""
        cfg = self.config
        parts = []
        for start in range(0, len(images), cfg.batch_size):
            arrays, _ = load_batch(images[start : start + cfg.batch_size])
            arrays += jittered_copies(arrays, cfg.reference_jitter, cfg.seed, first + start)
            for _, emb, _ in self._embed(arrays):
                parts.append(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]))  # (B*h*w, C)
        return torch.cat(parts)

    def _learn_scale(self, images) -> None:
        """``scale_`` of resize=keep (``reference_scale``) from the references' shapes; None when squeezed."""
        cfg = self.config
        self.scale_ = None
        if cfg.resize == "keep":
            shapes = [s for start in range(0, len(images), cfg.batch_size)
                      for s in load_batch(images[start : start + cfg.batch_size])[1]]
            self.scale_ = reference_scale(shapes, cfg.image_size, cfg.zoom)

    def _fit(self, images) -> None:
        cfg = self.config
        t0 = time.perf_counter()
        self._learn_scale(images)
        bank = self._patches(images)  # (N, C)
        t1 = time.perf_counter()
        seen = self._counted(len(bank))
        keep = greedy_coreset(bank, coreset_size(seen, cfg.coreset_ratio), cfg.projection_dim, cfg.seed)
        self.memory_bank_ = bank[keep].contiguous()  # (M, C), in greedy order
        self.index_ = self.probe_index_ = self.search_ = None
        t2 = time.perf_counter()
        left_out = torch.ones(len(bank), dtype=torch.bool)
        left_out[keep] = False
        if int(left_out.sum()) >= KCenterIndex.decide_min:
            # The search index, and its choice of pruning or brute force, made here from bank patches that the
            # coreset left out (real training patches, not memory rows), so the first predict call does neither.
            gen = torch.Generator().manual_seed(cfg.seed)
            rows = left_out.nonzero()[:, 0]
            self._index().decide(bank[rows[torch.randperm(len(rows), generator=gen)[: KCenterIndex.decide_min]]])
        if self._n_probe():
            self._search_index()  # the approximate search's index, built here so the first predict call does not
        self.fit_seconds_ = {"features": t1 - t0, "coreset": t2 - t1, "index": time.perf_counter() - t2}
        self.bank_size_ = seen

    def _counted(self, n_patches: int) -> int:
        """The patches that ``coreset_ratio`` is a fraction of, out of ``n_patches`` references' and copies'."""
        cfg = self.config
        return n_patches if cfg.coreset_of == "bank" else n_patches // (1 + cfg.reference_jitter)

    def _add_references(self, arrays) -> None:
        """The new references' patches join the memory by the greedy k-center rule continued from it
        (``continue_coreset``): as many of them as make the memory ``coreset_ratio`` of all the patches seen, each
        the patch farthest from the memory and those added before it. The search indexes take the new rows
        (``extended``), or are built again once the memory has more than doubled since they were built."""
        cfg = self.config
        new = self._patches(arrays, self.n_references_)  # (K, C)
        total = self.bank_size_ + self._counted(len(new))
        keep = continue_coreset(new, self.memory_bank_, coreset_size(total, cfg.coreset_ratio) - len(self.memory_bank_),
                                cfg.projection_dim, cfg.seed)
        rows = new[keep]
        self.memory_bank_ = torch.cat([self.memory_bank_, rows]).contiguous()  # (M + k, C)
        self.bank_size_ = total
        grown = {name: index for name in ("index_", "probe_index_")
                 if (index := getattr(self, name, None)) is not None and len(self.memory_bank_) <= 2 * index.built_size}
        self.index_ = self.probe_index_ = None
        for name, index in grown.items():
            setattr(self, name, index.extended(rows))
        left_out = torch.ones(len(new), dtype=torch.bool)
        left_out[keep] = False
        if self.index_ is None and int(left_out.sum()) >= KCenterIndex.decide_min:  # as at fit
            gen = torch.Generator().manual_seed(cfg.seed)
            sample = new[left_out][torch.randperm(int(left_out.sum()), generator=gen)[: KCenterIndex.decide_min]]
            self._index().decide(sample)
        if self._n_probe():
            self._search_index()

    def _view_scores(self, views):
        """The scores of the threshold's views (``Detector.fit``), without keeping an index they built: the exact
        search's choice between pruning and brute force is made from left-out patches at fit, or else by the first
        large search of test images (as before the threshold), and predict's numbers are those a loaded model
        gives, since the two searches agree only to float rounding."""
        built = getattr(self, "index_", None) is not None
        try:
            return super()._view_scores(views)
        finally:
            if not built:
                self.index_ = None

    def _n_probe(self) -> int:
        """``n_probe`` where the memory has at least ``probe_min`` rows, else 0 (exact search)."""
        return self.config.n_probe if len(self.memory_bank_) >= self.config.probe_min else 0

    def _index(self) -> KCenterIndex:
        if getattr(self, "index_", None) is None:
            self.index_ = KCenterIndex(self.memory_bank_)
            self.index_.search = getattr(self, "search_", None)  # a loaded model's choice (``_get_state``)
        return self.index_

    def _search_index(self) -> KCenterIndex | ProjectedIVF:
        """The index that predict searches: ``KCenterIndex`` for the exact search, or with ``n_probe`` > 0
        ``ProjectedIVF`` in ``probe_dim`` principal components (``KCenterIndex`` again when ``probe_dim`` is None),
        built on first use and kept until ``probe_dim`` changes."""
        dim = self.config.probe_dim
        if not self._n_probe() or dim is None:
            return self._index()
        probe = getattr(self, "probe_index_", None)
        if probe is None or probe.dim != min(dim, self.memory_bank_.shape[1]):
            probe = self.probe_index_ = ProjectedIVF(self.memory_bank_, dim)
        return probe

    def _predict_batch(self, images):
        """The batch in ``workers`` parts, side by side on threads of one torch thread each (``_predict_part``).

        On 2 cores this beats one call on torch's two threads: the search runs in numpy on threads of its own,
        and after each parallel torch operation OpenMP keeps its idle thread spinning for some milliseconds,
        which took the second core from the search. Split, no OpenMP thread is left waiting. Results are those of one call.
        """
        workers = min(len(images), self.config.workers or torch.get_num_threads())
        self._search_index()  # built here, not by two threads at once
        if workers <= 1:
            return self._predict_part(images)
        self._backbone()
        parts = np.array_split(np.arange(len(images)), workers)
        threads = torch.get_num_threads()
        try:
            with one_blas_thread():
                outs = list(worker_pool(workers).map(lambda part: self._predict_part([images[i] for i in part], 1), parts))
        finally:
            torch.set_num_threads(threads)  # torch's default for new threads, which the parts set to 1
        return np.concatenate([scores for scores, _ in outs]), [m for _, maps in outs for m in maps]

    def _predict_part(self, images, threads: int | None = None):
        """Scores and maps of some images; with ``threads``, on that many torch threads in this thread."""
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            arrays, shapes = load_batch(images)
            scores, maps = np.zeros(len(arrays), np.float32), [None] * len(arrays)
            for idx, emb, hw in self._embed(arrays):  # emb (B_g, C, h, w)
                s, patch = self._score(emb)
                scores[idx] = s.numpy()
                for i, m in zip(idx, smooth_maps(patch, hw, self.config.sigma, [shapes[i] for i in idx])):
                    maps[i] = m
            return scores, maps

    def _score(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch features (B, C, h, w) -> (image scores (B,), patch scores (B, h, w))."""
        b, c, h, w = emb.shape
        flat = emb.permute(0, 2, 3, 1).reshape(b, h * w, c)
        # The nearest rows themselves are needed only by the re-weighting; distances alone are cheaper.
        patch, nearest = self._search(flat, indices=self.config.reweight)
        if self.config.median_baseline:
            patch = patch - patch.median(1, keepdim=True).values  # (B, P)
        scores, where = patch.max(1)  # s* and the position of m_test
        if self.config.reweight:
            rows = torch.arange(b)
            scores = scores * self._reweight(flat[rows, where], nearest[rows, where])
        return scores, patch.view(b, h, w)

    def _search(self, feats: torch.Tensor, indices: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patches (B, P, C) -> (distance to the nearest memory row (B, P), that row (B, P) or None).

        Exact, or with ``n_probe`` approximate, each image's largest distance then made exact (``exact_max``).
        """
        b, p, c = feats.shape
        n_probe, index = self._n_probe(), self._search_index()
        dist, nearest = index.nearest(feats.reshape(-1, c), n_probe, indices=indices)
        dist, nearest = dist.view(b, p), None if nearest is None else nearest.view(b, p)
        if n_probe and self.config.exact_max:
            exact_top(index, feats, dist, nearest)
        return dist, nearest

    def _reweight(self, m_test: torch.Tensor, m_star: torch.Tensor) -> torch.Tensor:
        """Eq. 7: w = 1 - exp|m_test - m*| / sum_b exp|m_test - m_b|, over the b memory items nearest to m*.

        m_test (B, C): the highest-scoring test patch of each image; m_star (B,): its nearest memory row.
        Returns (B,) weights in [0, 1).
        """
        bank = self.memory_bank_
        b = min(self.config.reweight_neighbours, len(bank))
        if b < 2:
            return torch.ones(len(m_star))
        _, support = knn(bank[m_star], bank, k=b)  # (B, b): N_b(m*), m* itself first
        support[:, 0] = m_star
        d = torch.linalg.vector_norm(m_test[:, None] - bank[support], dim=-1)  # (B, b)
        return 1.0 - torch.softmax(d, dim=1)[:, 0]

    def _view_size(self) -> int:
        """resize=keep: the side that the working scale turns into ``image_size``, so that views are at the
        references' own scale."""
        scale = getattr(self, "scale_", None)
        return self.config.image_size if scale is None else max(32, round(self.config.image_size / scale))

    def _view_sources(self, arrays):
        """resize=keep: the centre square of each reference, so that views keep its aspect."""
        if self.config.resize == "squeeze":
            return arrays
        out = []
        for a in arrays:
            h, w = a.shape[:2]
            side = min(h, w)
            out.append(a[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side])
        return out

    def _get_state(self):
        meta = {"bank_size": self.bank_size_}
        if getattr(self, "scale_", None) is not None:
            meta["scale"] = self.scale_
        search = getattr(getattr(self, "index_", None), "search", None) or getattr(self, "search_", None)
        if search is not None:  # pruned or brute: they agree to float rounding only, so a loaded model keeps it
            meta["exact_search"] = search
        return {"memory_bank": self.memory_bank_}, meta

    def _set_state(self, tensors, meta):
        self.memory_bank_ = tensors["memory_bank"].float().contiguous()
        self.index_ = self.probe_index_ = None
        self.bank_size_ = meta.get("bank_size")  # patches seen, for teaching (absent before it)
        self.scale_ = meta.get("scale")
        if self.config.resize == "keep" and not (isinstance(self.scale_, (int, float)) and 0 < self.scale_ < 1e4):
            raise ValueError(f"resize=keep needs a positive scale in the model's meta, got {self.scale_!r}")
        self.search_ = meta.get("exact_search")  # absent: decided by the first large search, as after a fit
        if self.search_ not in (None, "pruned", "brute"):
            raise ValueError(f"exact_search must be 'pruned' or 'brute', got {self.search_!r}")
