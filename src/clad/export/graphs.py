"""Each exportable detector's prediction as one torch module of a fixed-size input, for the ONNX exporter.

The module computes what the detector's ``_predict_batch`` computes, from the resized pixels on:

- input ``images``: uint8 (B, 3, S, S), RGB, S the detector's ``image_size``, resized as clad resizes
  (``clad.backbones.base.resized``: bilinear with antialiasing); the normalisation of ``Backbone.preprocess``
  (x * scale + shift) is the graph's first step;
- outputs ``scores`` (B,): the image scores; ``maps`` (B, S, S): the anomaly maps at the working size, upsampled and
  Gaussian-smoothed as the detector does; ``patch_maps`` (B, h, w): the same maps on the feature grid, before that.

The resize of a map to its image's own resolution depends on the image's size, which a fixed-size input no longer
carries: it stays outside the graph (``clad.ops.smoothing.smooth_maps`` on ``patch_maps``, as every detector does).

Nearest-neighbour search is exact, over the whole memory (initializers, in blocks of rows): the nearest row by a
matrix product and a minimum, as ``clad.ops.knn.knn`` finds it, then its distance |q - m| (``NearestDistance``). The
graph has no pruned or approximate search, so a PatchCore with ``n_probe`` > 0 exports its exact search.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clad.detectors.clad.model import language_score
from clad.ops.features import aggregate
from clad.ops.smoothing import _axis_operator

# Memory rows searched per matrix product, times the patches of one image: 2 M distances (8 MB) per image, so that
# a batch's block of distances stays small whatever the memory's size.
BLOCK_DISTANCES = 1 << 21


def pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_in, n_out): ``x @ pool_matrix`` is ``F.adaptive_avg_pool1d`` of x's last axis to ``n_out``."""
    return F.adaptive_avg_pool1d(torch.eye(n_in, dtype=torch.float64)[:, None, :], n_out)[:, 0, :]


class NearestDistance(nn.Module):
    """Exact Euclidean distance of each query to its nearest memory row, and that row.

    The memory is searched in blocks of ``block`` rows (each an initializer: the memory is stored once). In each
    block the nearest row is found as ``knn`` finds it, by |m|^2 - 2 q.m (a matrix product and a minimum), and its
    distance then measured directly, |q - m|; the blocks' nearest rows are compared by that distance. Computed as
    |q|^2 - 2 q.m + |m|^2, a small distance among large features loses up to 1e-3 of itself to cancellation in
    float32 (EfficientNet-Lite0 features, full-shot bottle), which would be the difference between two runtimes;
    measured directly, only torch's own rounding remains (benchmarks/README.md, "ONNX export").

    forward: (B, P, C) -> (distance (B, P), row (B, P)).
    """

    def __init__(self, bank: torch.Tensor, block: int):
        super().__init__()
        bank = bank.float()
        self.starts = list(range(0, len(bank), block))
        for k, lo in enumerate(self.starts):
            part = bank[lo : lo + block]
            self.register_buffer(f"bank_t{k}", part.T.contiguous())  # (C, rows of the block)
            self.register_buffer(f"bank_sq{k}", (part * part).sum(1))

    def blocks(self):
        """(first row, rows (C, n), their squared norms (n,)) of each block."""
        return [(lo, getattr(self, f"bank_t{k}"), getattr(self, f"bank_sq{k}")) for k, lo in enumerate(self.starts)]

    def forward(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p, c = q.shape[1:]
        flat, q2 = q.reshape(-1, c), q * -2.0  # -2 q: exactly -2 times q, one pass over q instead of the distances
        best, rows = None, None
        for lo, bank_t, bank_sq in self.blocks():
            i = (torch.matmul(q2, bank_t) + bank_sq).argmin(-1).reshape(-1)  # nearest by |m|^2 - 2 q.m: (B * P,)
            d = (flat - bank_t.index_select(1, i).T).norm(dim=1)  # its distance, measured directly
            if best is None:
                best, rows = d, i
            else:
                better = d < best  # on a tie the earlier row stays
                best, rows = torch.where(better, d, best), torch.where(better, i + lo, rows)
        return best.reshape(-1, p), rows.reshape(-1, p)

    def rows_at(self, index: torch.Tensor) -> torch.Tensor:
        """Memory rows (N, C) at ``index`` (N,)."""
        out = 0
        for lo, bank_t, _ in self.blocks():
            n = bank_t.shape[1]
            inside = (index >= lo) & (index < lo + n)
            out = out + torch.where(inside[:, None], bank_t.index_select(1, (index - lo).clamp(0, n - 1)).T, 0.0)
        return out


class Graph(nn.Module):
    """What every graph shares: the input's normalisation and the map's smoothing at the working size."""

    def __init__(self, backbone, image_size: int, sigma: float, grid: tuple[int, int]):
        super().__init__()
        self.backbone, self.image_size, self.grid = backbone, image_size, tuple(grid)
        scale, shift = backbone.normalization()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        # upsampling to S x S and Gaussian blur, folded into one matrix per axis (``smooth_working``)
        h, w = self.grid
        self.register_buffer("smooth_h", _axis_operator(h, image_size, float(sigma), image_size))  # (S, h)
        self.register_buffer("smooth_w_t", _axis_operator(w, image_size, float(sigma), image_size).T.contiguous())

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() * self.scale + self.shift  # (B, 3, S, S)

    def smooth(self, patch: torch.Tensor) -> torch.Tensor:
        return self.smooth_h @ patch @ self.smooth_w_t  # (B, h, w) -> (B, S, S)

    def outputs(self, scores, patch):
        return scores, self.smooth(patch), patch


class PatchCoreGraph(Graph):
    """PatchCore and PatchKNN: locally aggregated patch features, nearest memory row, image score = largest patch
    distance (PatchCore's Eq. 7 re-weighting when configured)."""

    def __init__(self, det, block_distances: int = BLOCK_DISTANCES):
        cfg, bb = det.config, det._backbone()
        layers = tuple(cfg.layers)
        with torch.no_grad():
            probe = bb(torch.zeros(1, 3, cfg.image_size, cfg.image_size), [layers[0]])[layers[0]]
        super().__init__(bb, cfg.image_size, cfg.sigma, probe.shape[-2:])
        self.layers, self.neighbourhood = layers, getattr(cfg, "neighbourhood", 3)
        embed_dim = getattr(cfg, "embed_dim", None)
        pool = None
        if embed_dim is not None:  # PatchCore's channel pooling (``_project``) as one matrix
            per_layer = torch.block_diag(*(pool_matrix(bb.info(n).channels, embed_dim) for n in self.layers))
            pool = (per_layer @ pool_matrix(per_layer.shape[1], embed_dim)).float()
        self.register_buffer("pool", pool)  # None: all channels kept
        self.reweight = bool(getattr(cfg, "reweight", False))
        self.neighbours = min(getattr(cfg, "reweight_neighbours", 1), len(det.memory_bank_))
        h, w = self.grid
        self.search = NearestDistance(det.memory_bank_, max(1, block_distances // (h * w)))

    def forward(self, images):
        h, w = self.grid
        emb = aggregate(self.backbone(self.normalize(images), self.layers), self.layers, self.neighbourhood)
        flat = emb.permute(0, 2, 3, 1).reshape(-1, h * w, emb.shape[1])  # (B, P, C)
        if self.pool is not None:
            flat = flat @ self.pool  # (B, P, D)
        dist, nearest = self.search(flat)  # (B, P)
        scores, where = dist.max(1)
        if self.reweight and self.neighbours >= 2:
            scores = scores * self._reweight(flat, nearest, where)
        return self.outputs(scores, dist.reshape(-1, h, w))

    def _reweight(self, flat, nearest, where):
        """PatchCore's Eq. 7, as ``PatchCore._reweight``: (B,) weights."""
        m_test = flat.gather(1, where[:, None, None].expand(-1, 1, flat.shape[2]))[:, 0]  # (B, C)
        m_star = nearest.gather(1, where[:, None])[:, 0]  # (B,)
        star = self.search.rows_at(m_star)  # (B, C)
        d2 = torch.cat([bank_sq - 2.0 * star @ bank_t for _, bank_t, bank_sq in self.search.blocks()], 1)  # (B, M)
        support = d2.topk(self.neighbours, dim=1, largest=False).indices  # N_b(m*), less |m*|^2 as in knn
        support = torch.cat([m_star[:, None], support[:, 1:]], 1)  # m* itself first
        near = self.search.rows_at(support.reshape(-1)).reshape(-1, self.neighbours, flat.shape[2])
        d = (m_test[:, None] - near).norm(dim=-1)  # (B, b)
        return 1.0 - torch.softmax(d, dim=1)[:, 0]


class PaDiMGraph(Graph):
    """PaDiM: Mahalanobis distance of each grid position to its Gaussian; image score = the smoothed map's maximum."""

    def __init__(self, det):
        cfg, bb = det.config, det._backbone()
        super().__init__(bb, cfg.image_size, cfg.sigma, det.grid_)
        self.layers, self.grid_layer = tuple(cfg.layers), cfg.grid_layer
        self.register_buffer("channels", det.channels_.long())
        self.register_buffer("mean", det.mean_.float())  # (P, d)
        self.register_buffer("precision", det.precision_.float())  # (P, d, d)
        with torch.no_grad():
            probe = bb(torch.zeros(1, 3, cfg.image_size, cfg.image_size), self.layers)
        # finer maps average-pooled into the grid's cells (``on_grid``), as a product per axis
        h, w = self.grid
        for name in self.layers:
            fh, fw = probe[name].shape[-2:]
            if fw > w:
                self.register_buffer(f"pool_{name}_h", pool_matrix(fh, h).T.float().contiguous())  # (h, fh)
                self.register_buffer(f"pool_{name}_w", pool_matrix(fw, w).float())  # (fw, w)

    def forward(self, images):
        h, w = self.grid
        feats = self.backbone(self.normalize(images), self.layers)
        maps = []
        for name in self.layers:
            f = feats[name]
            if hasattr(self, f"pool_{name}_h"):
                f = getattr(self, f"pool_{name}_h") @ f @ getattr(self, f"pool_{name}_w")
            elif f.shape[-2:] != (h, w):
                f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
            maps.append(f)
        x = torch.cat(maps, 1).index_select(1, self.channels).flatten(2).transpose(1, 2)  # (B, P, d)
        diff = (x - self.mean).transpose(0, 1)  # (P, B, d)
        m2 = (torch.matmul(diff, self.precision) * diff).sum(2)  # (P, B) squared Mahalanobis
        patch = m2.clamp_min(0).sqrt().T.reshape(-1, h, w)
        maps = self.smooth(patch)
        return maps.flatten(1).amax(1), maps, patch


class CLADGraph(Graph):
    """CLAD and CLAD+: the language map of each patch against the class embeddings (``language_score``; constants
    of the fit: no text encoder runs at prediction), with CLAD+ fused with the patch memory's distances."""

    def __init__(self, det, block_distances: int = BLOCK_DISTANCES):
        cfg, m = det.config, det.model_
        with torch.no_grad():
            h1, _ = m.stage_features(torch.zeros(1, 3, cfg.image_size, cfg.image_size), tuned=True)
        super().__init__(m.backbone, cfg.image_size, cfg.map_sigma, h1.shape[-2:])
        self.model = m
        self.heads, self.tail = m.heads, m.tail  # registered, so that the exporter sees them as parameters
        self.register_buffer("classes", det.text_embeddings_.float())  # (C, D), normal first
        for name in ("sigma", "sigma_image", "scale_lang", "scale_mem"):
            self.register_buffer(name, torch.as_tensor(getattr(det, f"{name}_")).float())
        self.memory, self.memory_weight, self.pooled = cfg.memory, det.memory_weight(), cfg.image_score == "pooled"
        self.rule = cfg.language_score
        if cfg.memory:
            h, w = self.grid
            self.search = NearestDistance(det.memory_bank_, max(1, block_distances // (h * w)))

    def forward(self, images):
        m, (h, w) = self.model, self.grid
        h1, h2 = m.stage_features(self.normalize(images), tuned=True)
        z = m.project(m.combine(h1, h2))  # (B, D, h, w)
        patch = language_score(z, self.classes, self.sigma, self.rule)  # (B, h, w) language map
        if self.memory:
            feat = m.combine(h1, m.frozen_last(h1, h2))
            mem = self.search(feat.permute(0, 2, 3, 1).reshape(-1, h * w, feat.shape[1]))[0].reshape(-1, h, w)
            wt = self.memory_weight
            patch = wt * mem / self.scale_mem + (1 - wt) * patch / self.scale_lang
        maps = self.smooth(patch)
        if self.pooled:
            z_img = F.normalize(z.mean(dim=(2, 3)), dim=-1)
            scores = language_score(z_img, self.classes, self.sigma_image, self.rule)
        else:
            scores = maps.flatten(1).amax(1)
        return scores, maps, patch
