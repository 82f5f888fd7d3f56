"""Approximate nearest-neighbour search in a large memory: an inverted file over its leading principal components.

``ProjectedIVF`` finds each query's candidate row cheaply in a few dimensions, then measures the distance to that
row in all of them. So every distance it returns is a true distance to a memory row: never below the exact
nearest-neighbour distance, which is what ``clad.detectors.patchcore.exact_top`` needs to make image scores exact.

Why numpy here: the work is a few hundred small matrix products and row minima per batch. numpy's calls cost
a few microseconds where torch's cost tens, and its OpenBLAS ran these products 1.3-1.6x faster than torch's MKL
on the AMD CPU of one of our 2-core machines (benchmarks/README.md, "Session 10").
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch

from clad.ops.coreset import KCenterIndex, worker_pool

# clusters that ``closer`` searches in all dimensions
_CLOSER = 2
# Rows given a full-dimension distance first by ``exact`` (those of lowest bound), before the others are pruned.
_FIRST = 32
_BLAS = None  # a threadpoolctl controller, made on first use (making one inspects the loaded libraries)


def one_blas_thread():
    """Context: numpy's BLAS on one thread, so that the search's own threads do not each start more."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


class ProjectedIVF:
    """Inverted-file search of a bank (M, D) in its ``dim`` leading principal components.

    Built once per memory: the principal axes of the centred bank, then ``n_clusters`` clusters of the projected
    rows (k-center start refined by k-means, as in ``KCenterIndex``; default sqrt(M) / 2). A query is projected,
    compared with the cluster means, and searched in its ``n_probe`` closest clusters there; its candidate is
    the projected-nearest row of each, and its distance the full-dimension distance to the best of them.

    Against ``KCenterIndex.nearest(query, n_probe=1)`` it is faster at nearly the same distances and pixel AUROC
    (benchmarks/README.md, "Session 10").
    """

    def __init__(self, bank: torch.Tensor, dim: int = 32, n_clusters: int | None = None, refine: int = 8):
        bank = bank.detach().float().cpu().contiguous()
        m, channels = bank.shape
        dim = max(1, min(dim, channels))
        mean = bank.mean(0)
        centred = (bank - mean).double()
        _, axes = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
        basis = axes[:, channels - dim :].flip(1).float().contiguous()  # (D, dim), largest variance first
        shift = -(mean @ basis)
        n_clusters = n_clusters or max(1, round(math.sqrt(m) / 2))
        clusters = KCenterIndex(torch.addmm(shift, bank, basis), n_clusters=n_clusters, refine=refine)
        self.dim = dim
        self.built_size = m  # rows clustered at build; ``extended`` adds rows to these clusters
        self.rows = clusters.order.numpy()  # cluster-sorted position -> bank row
        self.basis, self.shift = basis.numpy(), shift.numpy()
        # the projection with a column of ones after it: q @ basis_aug + shift_aug = [z, 1]
        self.basis_aug = np.hstack([self.basis, np.zeros((channels, 1), np.float32)])
        self.shift_aug = np.append(self.shift, np.float32(1.0))
        self.proj_t = np.ascontiguousarray(clusters.bank.numpy().T)  # (dim, M) projected rows, cluster-sorted
        self.proj_sq = clusters.bank_sq.numpy()
        self.proj_aug = np.ascontiguousarray(np.vstack([-2.0 * self.proj_t, self.proj_sq[None]]))  # (dim + 1, M)
        self.full = bank[clusters.order].numpy()  # (M, D) the rows themselves, cluster-sorted
        self.full_sq = np.einsum("ij,ij->i", self.full, self.full)
        self.means_sq = clusters.means_sq.numpy()
        self.means_aug = np.ascontiguousarray(np.vstack([-2.0 * clusters.means.numpy().T, self.means_sq[None]]))  # (dim + 1, C)
        self.offsets = np.asarray(clusters.offsets)
        # norm of each row's part outside the principal subspace, for the lower bounds of ``exact``
        self.mean = mean.numpy()
        self.resid = self._residual(self.full, self.proj_t.T)
        self.spread = float(np.max(self.proj_sq + self.resid**2))  # largest |b - mean|^2, for float tolerances

    def nearest(
        self, query: torch.Tensor, n_probe: int = 1, indices: bool = True, workers: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query (N, D) -> (distance (N,) to each query's candidate row, that bank row (N,) or None).

        The queries are split over ``workers`` threads (default: torch's thread count); results do not depend
        on the split. ``indices`` only decides whether the rows are returned: they are found either way.
        """
        if n_probe < 1:
            raise ValueError(f"n_probe must be >= 1 for the approximate search, got {n_probe}")
        q = query.detach().float().cpu().contiguous().numpy()
        workers = max(1, int(workers or torch.get_num_threads()))
        parts = np.array_split(q, workers) if workers > 1 and len(q) >= 2048 else [q]
        with one_blas_thread():
            if len(parts) == 1:
                outs = [self._search(q, n_probe)]
            else:
                outs = list(worker_pool(len(parts)).map(lambda part: self._search(part, n_probe), parts))
        dist = torch.from_numpy(np.concatenate([d for d, _ in outs]))
        return dist, torch.from_numpy(np.concatenate([r for _, r in outs])) if indices else None

    def closer(self, query: torch.Tensor, indices: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A wider search of a few queries: every row of their ``_CLOSER`` closest clusters, in all dimensions;
        (distance, row or None), never farther than ``nearest(query, 1)``'s (its cluster is among these).

        On bottle's full-shot memory this leaves about 1.5 patches per image to ``exact`` in ``exact_top``,
        against 6.5 without it.
        """
        q = query.detach().float().cpu().contiguous().numpy()
        with one_blas_thread():
            dist, rows = self._search(q, _CLOSER, full=True)
        return torch.from_numpy(dist), torch.from_numpy(rows) if indices else None

    def exact(self, query: torch.Tensor, bound: torch.Tensor, indices: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Exact nearest neighbour of each query (N, D), given an upper bound (N,) of its distance (one that
        ``nearest`` returned): (distance (N,), bank row (N,) or None), as brute force gives them.

        Only rows whose lower bound is below the query's bound get a full-dimension distance. The bound is
        |z_q - z_b|^2 + (r_q - r_b)^2 <= |q - b|^2, with z the principal components and r the norm of the rest:
        a product in ``dim`` dimensions for every row, then in all of them for a few hundred rows per query,
        instead of a product in all of them for every row.
        """
        q = query.detach().float().cpu().contiguous().numpy()
        u = bound.detach().float().cpu().numpy()
        dist, rows = np.empty(len(q), np.float32), np.empty(len(q), np.int64)
        if len(q):
            with one_blas_thread():
                z = q @ self.basis
                z += self.shift
                z_sq = np.einsum("ij,ij->i", z, z)
                q_sq = np.einsum("ij,ij->i", q, q)
                r_q = self._residual(q, z)
                lb = z @ self.proj_t  # (N, M): |z_q - z_b|^2 + (r_q - r_b)^2 = |z_q|^2 + r_q^2 + (|z_b|^2 + r_b^2) - 2 (z_q.z_b + r_q r_b)
                lb += r_q[:, None] * self.resid
                lb *= -2.0
                lb += self.proj_sq + self.resid**2
                lb += (z_sq + r_q**2)[:, None]
                # Slack for float rounding, far above float32's (6e-8 of the squared norms in play), so the
                # nearest row is never dropped; the rows it adds cost little.
                limit = u**2 * (1 + 1e-4) + 1e-5 * (z_sq + r_q**2 + self.spread)
                tol = limit - u**2
                for i in range(len(q)):
                    cand = np.flatnonzero(lb[i] <= limit[i])
                    if len(cand) == 0:  # a bound below the true distance
                        cand = np.arange(len(self.full))
                    if len(cand) > _FIRST:
                        # The approximate bound can be loose; the rows of lowest bound first give a tight one,
                        # and only rows whose bound is below it are searched after them.
                        cand = cand[np.argsort(lb[i, cand])]
                        best = self._distances(q[i], cand[:_FIRST]).min() + q_sq[i]
                        cand = cand[: np.searchsorted(lb[i, cand], best * (1 + 1e-4) + tol[i], side="right")]
                    d2 = self._distances(q[i], cand)
                    if d2.min() + q_sq[i] > limit[i]:  # the bound was below the true distance: every row
                        cand = np.arange(len(self.full))
                        d2 = self._distances(q[i], cand)
                    k = int(d2.argmin())
                    dist[i], rows[i] = d2[k] + q_sq[i], cand[k]
        dist = torch.from_numpy(np.sqrt(np.maximum(dist, 0.0)))
        return dist, torch.from_numpy(self.rows[rows]) if indices else None

    def extended(self, rows: torch.Tensor) -> "ProjectedIVF":
        """A new index of this bank with ``rows`` (K, D) appended (bank rows M .. M + K - 1); this one is unchanged.

        The new rows are projected on the same axes and each joins the cluster of the closest mean. The lower
        bounds of ``exact`` hold for any axes, so it stays exact; the approximate search grows less precise as
        the axes and clusters fit the bank less well, so rebuild instead once the bank has grown well past
        ``built_size``.
        """
        x = rows.detach().float().cpu().contiguous().numpy()
        new = copy.copy(self)
        m, k = len(self.rows), len(x)
        if k == 0:
            return new
        z = x @ self.basis
        z += self.shift  # (K, dim)
        z_aug = np.hstack([z, np.ones((k, 1), np.float32)])
        cluster = (z_aug @ self.means_aug).argmin(1)  # (K,) closest mean
        sizes = np.diff(self.offsets)
        every = np.concatenate([np.repeat(np.arange(len(sizes)), sizes), cluster])
        order = np.argsort(every, kind="stable")  # old rows keep their places within each cluster, new ones last
        new.rows = np.concatenate([self.rows, np.arange(m, m + k)])[order]
        new.proj_t = np.ascontiguousarray(np.hstack([self.proj_t, z.T])[:, order])
        new.proj_sq = np.concatenate([self.proj_sq, np.einsum("ij,ij->i", z, z)])[order]
        new.proj_aug = np.ascontiguousarray(np.vstack([-2.0 * new.proj_t, new.proj_sq[None]]))
        new.full = np.ascontiguousarray(np.vstack([self.full, x])[order])
        new.full_sq = np.concatenate([self.full_sq, np.einsum("ij,ij->i", x, x)])[order]
        new.offsets = np.concatenate([[0], np.cumsum(np.bincount(every, minlength=len(sizes)))])
        resid = self._residual(x, z)
        new.resid = np.concatenate([self.resid, resid])[order]
        new.spread = max(self.spread, float(np.max(np.einsum("ij,ij->i", z, z) + resid**2)))
        return new

    def _distances(self, q: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """|b|^2 - 2 q.b for the rows ``cand`` (cluster-sorted positions) of one query q (D,)."""
        d2 = self.full[cand] @ q
        d2 *= -2.0
        d2 += self.full_sq[cand]
        return d2

    def _residual(self, x: np.ndarray, z: np.ndarray) -> np.ndarray:
        """|x - mean - z basis^T| of each row of x (n, D), z its principal components (n, dim): the norm of
        what the components leave out, computed directly (not as a difference of squares, which cancels)."""
        rest = x - self.mean
        rest -= z @ self.basis.T
        return np.sqrt(np.einsum("ij,ij->i", rest, rest))

    def _search(self, q: np.ndarray, n_probe: int, full: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The search of ``nearest`` on one thread, in numpy: (distances (n,), bank rows (n,)).

        Each query's probed clusters are searched in the projection, and the nearest row there gets a full
        distance; with ``full`` they are searched in all dimensions (the nearest row of those clusters).
        """
        n = len(q)
        if n == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        # Projected queries with a column of ones, against stored rows [-2 b; |b|^2]: one product gives
        # |b|^2 - 2 z.b, which orders a query's rows (or means) as the distance does, with no pass after it.
        z = q @ self.basis_aug  # (n, dim + 1), its last column 0 until the shift adds 1
        z += self.shift_aug
        dm = z @ self.means_aug
        p = min(n_probe, dm.shape[1])
        probe = dm.argmin(1)[:, None] if p == 1 else np.argpartition(dm, p - 1, axis=1)[:, :p]
        # (query, cluster) pairs sorted by cluster: one product per cluster, of contiguous rows on both sides
        pairs = probe.ravel()
        order = np.argsort(pairs, kind="stable")
        counts = np.bincount(pairs, minlength=len(self.means_sq))
        ends = np.cumsum(counts)
        who = order // p  # the query of each sorted pair
        xs = np.take(q if full else z, who, axis=0)  # np.take: faster than fancy indexing
        cand = np.empty(len(order), np.int64)
        for j in np.flatnonzero(counts):
            a, b = ends[j] - counts[j], ends[j]
            lo, hi = self.offsets[j], self.offsets[j + 1]
            if full:
                d2 = xs[a:b] @ self.full[lo:hi].T
                d2 *= -2.0
                d2 += self.full_sq[lo:hi]
            else:
                d2 = xs[a:b] @ self.proj_aug[:, lo:hi]
            cand[a:b] = d2.argmin(1) + lo
        # full-dimension squared distance to each candidate, in query order: |q|^2 + |b|^2 - 2 q.b
        by_pair = np.empty(n * p, np.int64)
        by_pair[order] = cand
        by_pair = by_pair.reshape(n, p)
        if p > 1:
            d2 = np.einsum("ij,ikj->ik", q, np.take(self.full, by_pair, axis=0))
        else:
            d2 = np.einsum("ij,ij->i", q, np.take(self.full, by_pair[:, 0], axis=0))[:, None]
        d2 *= -2.0
        d2 += self.full_sq[by_pair]
        d2 += np.einsum("ij,ij->i", q, q)[:, None]
        k = d2.argmin(1) if p > 1 else np.zeros(n, np.int64)
        dist, best = d2[np.arange(n), k], by_pair[np.arange(n), k]
        return np.sqrt(np.maximum(dist, 0.0)), self.rows[best]
