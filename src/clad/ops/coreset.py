"""Greedy k-center coreset selection (Sener & Savarese 2018, as in PatchCore) and pruned nearest-neighbour search.

Both use the same trick to stay fast on a CPU: points are grouped into compact blocks (mean ``mu_b``,
radius ``rho_b``), and the triangle inequality ``|x - c| >= |mu_b - c| - rho_b`` skips every block that a new
centre (or a query) cannot get closer to. The results are those of the plain algorithms; only the work shrinks.
Loops of many small tensor ops run on one thread (``single_thread``): on a busy machine, splitting each small op
over threads costs far more in synchronisation than it saves. ``KCenterIndex.nearest`` uses the cores by splitting
the queries instead, one single-threaded search per thread.
"""
from __future__ import annotations

import copy
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from clad.ops.knn import knn, row_min

# Relative slack on the pruning bounds, so float rounding never skips a block the plain algorithm would update.
_SLACK = 1e-4
# Largest (queries x cluster rows) distance block of KCenterIndex, in floats (64 MB).
_BLOCK = 16 * 1024 * 1024
# Pairs (query, cluster) whose queries KCenterIndex gathers at once (32,768 x 152 floats: 20 MB).
_PAIRS = 32768
# Rows per chunk of the coreset's dense distance updates (chunk x new centres floats).
_ROWS = 32768


@contextmanager
def single_thread():
    """Run torch on one thread: loops of many small ops are much slower when split over busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


_POOL: ThreadPoolExecutor | None = None


def worker_pool(workers: int) -> ThreadPoolExecutor:
    """A thread pool of at least ``workers`` threads, kept for the process. Searches split their queries over it
    once per batch, rather than start new threads each time, which is slow right after the backbone's forward
    (whose OpenMP threads still spin)."""
    global _POOL
    if _POOL is None or _POOL._max_workers < workers:
        old, _POOL = _POOL, ThreadPoolExecutor(workers, thread_name_prefix="clad-search")
        if old is not None:
            old.shutdown(wait=False)
    return _POOL


def random_projection(dim_in: int, dim_out: int, seed: int = 0) -> torch.Tensor:
    """Gaussian random projection matrix (dim_in, dim_out) with N(0, 1/dim_out) entries (Johnson-Lindenstrauss)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim_in, dim_out, generator=gen) / math.sqrt(dim_out)


def _kcenter_plain(z: torch.Tensor, n: int, start: int = 0, init: torch.Tensor | None = None) -> torch.Tensor:
    """Textbook greedy k-center on a small set (n, D): one distance update over all points per centre.

    ``init`` (N,): squared distances to centres chosen before (``continue_coreset``); the first choice is then the
    point farthest from them, not ``start``."""
    sq = (z * z).sum(1)
    mind = torch.full((z.shape[0],), float("inf")) if init is None else init.clone()
    sel = torch.empty(n, dtype=torch.long)
    i = start if init is None else int(mind.argmax())
    for t in range(n):
        sel[t] = i
        c = z[i]
        torch.minimum(mind, torch.addmv(sq + c @ c, z, c, alpha=-2.0), out=mind)
        mind[i] = -1.0  # never pick a point twice, even among exact duplicates
        i = int(mind.argmax())
    return sel


def _blocks(z: torch.Tensor, n_blocks: int, gen: torch.Generator):
    """Group the rows of z into compact blocks: k-center centres of a subsample, then nearest-centre assignment.

    Returns (order (N,) the permutation that makes blocks contiguous, block id per sorted row (N,),
    offsets (B+1,), sizes (B,), means (B, D), radii (B,)).
    """
    n = z.shape[0]
    sub = z[torch.randperm(n, generator=gen)[: min(n, max(4 * n_blocks, 10_000))]]
    with single_thread():
        centres = sub[_kcenter_plain(sub, min(n_blocks, sub.shape[0]))]
    # Block coherence only affects speed, never results: assign in a cheap 32-d random projection.
    if z.shape[1] > 32:
        p = torch.randn(z.shape[1], 32, generator=gen)
        _, a = knn(z @ p, centres @ p, k=1)
    else:
        _, a = knn(z, centres, k=1)
    _, a = torch.unique(a[:, 0], return_inverse=True)  # drop empty blocks
    order = torch.argsort(a, stable=True)
    a = a[order]
    sizes = torch.bincount(a)
    offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    zs = z[order]
    means = torch.zeros(len(sizes), z.shape[1]).index_add_(0, a, zs) / sizes[:, None]
    radii = torch.zeros(len(sizes)).scatter_reduce_(0, a, (zs - means[a]).norm(dim=1), "amax", include_self=False)
    return order, a, offsets, sizes, means, radii


@torch.inference_mode()
def greedy_coreset(
    features: torch.Tensor,
    n: int,
    projection_dim: int | None = 128,
    seed: int = 0,
    n_blocks: int | None = None,
) -> torch.Tensor:
    """Indices of ``n`` rows of ``features`` (N, D) chosen by greedy k-center (farthest-point) selection.

    Each step adds the point farthest from the centres chosen so far, which greedily minimises the coverage
    radius (``coverage_radius``). Distances are taken after an optional Gaussian random projection to
    ``projection_dim`` dims (PatchCore uses 128); the first point is drawn from ``seed``.
    Returns a (n,) long tensor in selection order (so any prefix is itself a k-center coreset).
    """
    num = features.shape[0]
    n = max(0, min(int(n), num))
    if n == num:
        return torch.arange(num)
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    z = features.float()
    if projection_dim is not None and projection_dim < z.shape[1]:
        z = z @ random_projection(z.shape[1], projection_dim, seed)  # (N, projection_dim)
    start = int(torch.randint(num, (1,), generator=gen))
    if num <= 4096:
        with single_thread():
            return _kcenter_plain(z.contiguous(), n, start)
    order, block_of, offsets, sizes, means, radii = _blocks(z, n_blocks or int(4 * math.sqrt(num)), gen)
    first = int(torch.argsort(order)[start])
    return order[_kcenter_blocks(z[order].contiguous(), n, first, block_of, offsets, sizes, means, radii)]


@torch.inference_mode()
def continue_coreset(
    features: torch.Tensor,
    centres: torch.Tensor,
    n: int,
    projection_dim: int | None = 128,
    seed: int = 0,
    n_blocks: int | None = None,
) -> torch.Tensor:
    """Indices of ``n`` rows of ``features`` (N, D) chosen by greedy k-center continued from ``centres`` (M, D),
    the coreset chosen so far: each step adds the row farthest from the centres and the rows already added.

    This is how a coreset grows when new points arrive (PatchCore's teaching): ``greedy_coreset`` run on the
    centres and then on the new points, its choices among the new points only. Distances are taken in the
    random projection of ``greedy_coreset`` with the same ``projection_dim`` and ``seed``. Returns a (n,) long
    tensor in selection order (all rows, in order, when ``n`` >= N; ``greedy_coreset`` when there are no centres).
    """
    num = features.shape[0]
    n = max(0, min(int(n), num))
    if len(centres) == 0:
        return greedy_coreset(features, n, projection_dim, seed, n_blocks)
    if n == num:
        return torch.arange(num)
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    z, c = features.float(), centres.float()
    if projection_dim is not None and projection_dim < z.shape[1]:
        p = random_projection(z.shape[1], projection_dim, seed)
        z, c = z @ p, c @ p  # (N, projection_dim), (M, projection_dim)
    init = knn(z, c, k=1, indices=False)[0][:, 0].square()  # (N,) squared distance to the nearest centre
    if num <= 4096:
        with single_thread():
            return _kcenter_plain(z.contiguous(), n, init=init)
    gen = torch.Generator().manual_seed(seed)
    order, block_of, offsets, sizes, means, radii = _blocks(z, n_blocks or int(4 * math.sqrt(num)), gen)
    return order[_kcenter_blocks(z[order].contiguous(), n, None, block_of, offsets, sizes, means, radii,
                                 init=init[order])]


def _kcenter_blocks(z, n, start, block_of, offsets, sizes, means, radii, n_candidates: int = 4096,
                    init: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy k-center over rows z (N, D) already sorted by block; returns positions in z (n,). With ``init``
    (N,), the squared distances to centres chosen before, the choice continues from them (``start`` unused).

    The same choices as ``_kcenter_plain`` (up to float rounding), with the distance updates batched. Each round
    takes the ``n_candidates`` points farthest from the centres so far, with tau the next-largest distance. The
    greedy choice is then run inside the candidates alone, updating only their distances: as long as the best
    candidate is still at least tau away from every centre, it is the point the plain algorithm would choose,
    because no other point's distance exceeds tau and distances only shrink. When it falls below tau, the round's
    centres update every point's distance at once: one matrix product per block that they can reach (or one
    over the whole bank when most blocks are in reach, as on fine textures), instead of one pass per centre.
    """
    num = z.shape[0]
    sq = (z * z).sum(1)
    bounds = offsets.tolist()
    sel = torch.empty(n, dtype=torch.long)
    if init is None:
        mind = torch.full((num,), float("inf"))  # squared distance of each point to its nearest centre
        block_max = torch.full((len(sizes),), float("inf"))  # largest ``mind`` in each block
        sel[0], t, new = start, 1, torch.tensor([start])
    else:
        mind = init.clone()
        block_max = torch.zeros(len(sizes)).scatter_reduce_(0, block_of, mind, "amax", include_self=False)
        t, new = 0, torch.zeros(0, dtype=torch.long)
    while True:
        if len(new):
            _lower_distances(z, sq, mind, block_max, block_of, bounds, means, radii, new)
            mind[sel[:t]] = -1.0  # chosen points are never chosen again, even among exact duplicates
            for b in block_of[new].unique().tolist():
                block_max[b] = mind[bounds[b] : bounds[b + 1]].max()
        if t == n:
            return sel
        k = min(n_candidates, num - t)
        top, cand = mind.topk(min(k + 1, num))
        tau = float(top[k]) if k < len(top) else -1.0
        with single_thread():
            new = cand[_greedy_among(z[cand[:k]], top[:k].clone(), max(tau, 0.0), n - t)]
        sel[t : t + len(new)] = new
        t += len(new)


def _lower_distances(z, sq, mind, block_max, block_of, bounds, means, radii, new) -> None:
    """Lower ``mind`` (and ``block_max``) in place to the distances to the new centres z[new]."""
    c, csq = z[new], sq[new]
    # Centre c can lower a distance in block b only if |mu_b - c| < rho_b + sqrt(max mind in b) (with slack).
    reach = (radii + block_max.clamp_min(0).sqrt()) * (1 + _SLACK) + _SLACK
    in_reach = torch.cdist(means, c) < reach[:, None]  # (blocks, new centres)
    if int(in_reach.sum()) > in_reach.numel() // 4:  # little to prune: one product over the whole bank, threaded
        for lo in range(0, len(z), _ROWS):
            d = torch.addmm(csq[None, :], z[lo : lo + _ROWS], c.T, alpha=-2.0).add_(sq[lo : lo + _ROWS, None])
            torch.minimum(mind[lo : lo + _ROWS], d.amin(1), out=mind[lo : lo + _ROWS])
        block_max.scatter_reduce_(0, block_of, mind, "amax", include_self=False)
        return
    with single_thread():
        for b in in_reach.any(1).nonzero()[:, 0].tolist():
            lo, hi = bounds[b], bounds[b + 1]
            cols = in_reach[b].nonzero()[:, 0]
            d = torch.addmm(csq[cols][None, :], z[lo:hi], c[cols].T, alpha=-2.0).add_(sq[lo:hi, None])
            block_max[b] = torch.minimum(mind[lo:hi], d.amin(1), out=mind[lo:hi]).max()


def _greedy_among(cz: torch.Tensor, cm: torch.Tensor, tau: float, limit: int) -> torch.Tensor:
    """Greedy choices among candidates cz (k, D) with squared distances cm (k,) to the centres so far.

    Stops after ``limit`` choices, or when no candidate is still at least ``tau`` away (a point outside the
    candidates might then be the farthest). Returns positions in cz; there is always at least one.
    """
    cs = (cz * cz).sum(1)
    out = []
    while len(out) < limit:
        j = int(cm.argmax())
        if out and float(cm[j]) < tau:
            break
        out.append(j)
        torch.minimum(cm, torch.addmv(cs + cs[j], cz, cz[j], alpha=-2.0), out=cm)
        cm[j] = -1.0
    return torch.tensor(out, dtype=torch.long)


def coverage_radius(bank: torch.Tensor, coreset: torch.Tensor, chunk: int = 65536) -> float:
    """Largest distance from any row of ``bank`` (N, D) to its nearest row of ``coreset`` (M, D).

    Brute-force ``knn`` for small coresets; above 2048 rows the exact pruned ``KCenterIndex`` (same result, faster).
    """
    bank, coreset = bank.float(), coreset.float()
    if len(coreset) <= 2048:
        return float(knn(bank, coreset, k=1, indices=False)[0].max())
    index = KCenterIndex(coreset)
    return max(float(index.nearest(bank[i : i + chunk], indices=False)[0].max()) for i in range(0, len(bank), chunk))


class KCenterIndex:
    """Exact nearest-neighbour search in a fixed bank (M, D), pruned with k-center clusters (or brute force).

    The bank is split into ``n_clusters`` (default sqrt(M)) clusters around greedy k-center centres. Each query
    first searches the cluster whose mean is closest, which bounds its nearest-neighbour distance from above;
    ``|q - mu_j| - rho_j`` bounds from below the distance to any row of cluster j, so every cluster whose bound is
    larger is skipped. A few k-means iterations from the k-center start make the clusters more compact, so
    fewer are searched. Results equal ``knn(query, bank, k=1)`` up to float rounding. On object memories the work
    left is a small part of the brute-force search; on fine texture it can be more (see ``nearest``).
    """

    #: the first exact search of at least this many queries (8 images at 256 px) decides between pruning and
    #: brute force
    decide_min = 8192

    def __init__(self, bank: torch.Tensor, n_clusters: int | None = None, refine: int = 8):
        self.search: str | None = None  # "pruned" or "brute" once decided (see ``nearest``)
        self._deciding = threading.Lock()
        bank = bank.float().contiguous()
        m = bank.shape[0]
        self.built_size = m  # rows clustered at build; ``extended`` adds rows to these clusters
        # sqrt(M) balances the query-to-means product against the rows searched (it beat 2 sqrt(M) for both
        # searches; benchmarks/README.md).
        n_clusters = min(m, n_clusters or max(1, round(math.sqrt(m))))
        with single_thread():
            centres = bank[_kcenter_plain(bank, n_clusters)]  # (C, D)
        _, a = knn(bank, centres, k=1)
        # Lloyd (k-means) iterations from the k-center start: more compact clusters, so tighter bounds and fewer
        # rows searched; results are unchanged.
        for _ in range(refine):
            sizes = torch.bincount(a[:, 0], minlength=len(centres))[:, None]
            sums = torch.zeros_like(centres).index_add_(0, a[:, 0], bank)
            centres = torch.where(sizes > 0, sums / sizes.clamp_min(1), centres)
            _, a = knn(bank, centres, k=1)
        _, a = torch.unique(a[:, 0], return_inverse=True)
        order = torch.argsort(a, stable=True)
        self.order = order  # sorted row -> original bank row
        self.bank = bank[order]  # (M, D), rows grouped by cluster
        self.bank_sq = (self.bank * self.bank).sum(1)
        a = a[order]
        sizes = torch.bincount(a)
        starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        self.offsets = starts.tolist()
        self.starts = starts[:-1]  # first sorted row of each cluster
        self.means = torch.zeros(len(sizes), bank.shape[1]).index_add_(0, a, self.bank) / sizes[:, None]
        self.means_sq = (self.means * self.means).sum(1)
        self.radii = torch.zeros(len(sizes)).scatter_reduce_(
            0, a, (self.bank - self.means[a]).norm(dim=1), "amax", include_self=False
        )

    def nearest(
        self, query: torch.Tensor, n_probe: int = 0, workers: int | None = None, indices: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query (N, D) -> (distance (N,), bank row index (N,)) of each query's nearest bank row.

        With ``indices=False`` the row indices are not computed (None): faster, as row minima are cheaper
        than row argmins here (see ``row_min``).

        Exact search (``n_probe=0``) is pruned, or brute force (``knn``) where that is faster: on fine texture
        the clusters overlap so much that pruning costs more than it saves. The first exact search of at least
        ``decide_min`` queries runs both, times them and sets ``search`` to the faster; both give the same
        distances. (A smaller sample would favour brute force: the pruned search has a fixed cost per call.)
        The pruned search splits the queries over ``workers`` threads (default: torch's thread count); results
        do not depend on the split.
        """
        if n_probe == 0:
            if self.search is None and len(query) >= self.decide_min:
                with self._deciding:  # one decision, even when parts of a batch search side by side
                    if self.search is None:
                        return self._decide(query, workers, indices)
            if self.search == "brute":
                return self.brute(query, indices)
        return self._pruned(query, n_probe, workers, indices)

    def brute(self, query: torch.Tensor, indices: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nearest(query)`` by brute force, whatever ``search``: exact, and the faster for a few queries (up to
        some hundreds), where the pruned search costs more in its loop over clusters than it saves in products.
        """
        d, i = knn(query.float(), self.bank, k=1, indices=indices, bank_sq=self.bank_sq)
        return d[:, 0], None if i is None else self.order[i[:, 0]]

    def exact(self, query: torch.Tensor, bound: torch.Tensor, indices: bool = True) -> tuple:
        """``brute(query)``: the exact search of a few queries, as ``exact_top`` asks it of an index (``bound``,
        an upper bound of each query's distance, is not needed here)."""
        return self.brute(query, indices)

    def closer(self, query: torch.Tensor, indices: bool = True) -> tuple:
        """A wider approximate search of a few queries (``n_probe=4``): (distance, row or None), never farther
        than ``nearest(query, 1)``'s (the closest cluster is among the four)."""
        return self._pruned(query, 4, None, indices)

    def decide(self, sample: torch.Tensor, workers: int | None = None) -> str:
        """Set ``search`` now, by timing both exact searches of ``sample`` (N, D): queries like the real ones.

        For a memory chosen out of a larger bank, the rows left out are such a sample, and deciding at fit spares
        the first predict call both the timing and the slower search.
        """
        self._decide(sample, workers, False)
        return self.search

    def extended(self, rows: torch.Tensor) -> "KCenterIndex":
        """A new index of this bank with ``rows`` (K, D) appended (bank rows M .. M + K - 1); this one is unchanged.

        Each new row joins the cluster of the closest mean, whose radius grows to cover it. The means stay where
        they are, so every bound still holds and results stay exact; only the clusters grow less compact, so
        rebuild instead once the bank has grown well past ``built_size``. The search decision is kept.
        """
        rows = rows.detach().float().cpu()
        new = copy.copy(self)
        new._deciding = threading.Lock()
        m, k = len(self.order), len(rows)
        if k == 0:
            return new
        cluster = row_min(torch.addmm(self.means_sq, rows, self.means.T, alpha=-2.0))[1]  # (K,) closest mean
        sizes = torch.tensor(self.offsets).diff()
        old_cluster = torch.repeat_interleave(torch.arange(len(sizes)), sizes)  # (M,) of each sorted row
        every = torch.cat([old_cluster, cluster])
        order = torch.argsort(every, stable=True)  # old rows keep their places within each cluster, new ones last
        new.order = torch.cat([self.order, torch.arange(m, m + k)])[order]
        new.bank = torch.cat([self.bank, rows])[order].contiguous()
        new.bank_sq = torch.cat([self.bank_sq, (rows * rows).sum(1)])[order]
        sizes = torch.bincount(every, minlength=len(sizes))
        starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        new.offsets, new.starts = starts.tolist(), starts[:-1]
        reach = (rows - self.means[cluster]).norm(dim=1)
        new.radii = self.radii.clone().scatter_reduce_(0, cluster, reach, "amax")
        return new

    def _decide(self, query: torch.Tensor, workers: int | None, indices: bool) -> tuple:
        """The exact search of ``query`` by both methods; the faster becomes ``search``. Returns the result."""
        t0 = time.perf_counter()
        out = self._pruned(query, 0, workers, indices)
        t1 = time.perf_counter()
        self.brute(query, indices)
        self.search = "pruned" if t1 - t0 <= time.perf_counter() - t1 else "brute"
        return out

    def _pruned(self, query: torch.Tensor, n_probe: int, workers: int | None, indices: bool = True) -> tuple:
        """The pruned search of ``nearest``, its queries split over ``workers`` threads."""
        workers = max(1, int(workers or torch.get_num_threads()))
        if workers == 1 or len(query) < 2048:
            with single_thread():
                return self._nearest(query, n_probe, indices)
        parts = query.chunk(workers)
        with single_thread():
            outs = list(worker_pool(len(parts)).map(lambda part: self._nearest(part, n_probe, indices), parts))
        return torch.cat([d for d, _ in outs]), torch.cat([i for _, i in outs]) if indices else None

    @torch.inference_mode()
    def _nearest(self, query: torch.Tensor, n_probe: int = 0, indices: bool = True) -> tuple:
        """The search of ``nearest`` on one thread.

        n_probe = 0: exact. n_probe > 0: approximate, each query searches only its ``n_probe`` closest clusters
        (an inverted-file search: faster, and a distance can only come out larger than the exact one).
        """
        q = query.float()
        n = q.shape[0]
        q_sq = (q * q).sum(1)
        best = torch.full((n,), float("inf"))
        best_i = torch.zeros(n, dtype=torch.long) if indices else None
        if n_probe == 1:
            # Only the closest mean is needed: |q|^2, a clamp and a root would not change which it is.
            probe = row_min(torch.addmm(self.means_sq, q, self.means.T, alpha=-2.0))[1]
            self._search(q, q_sq, probe, torch.arange(n), best, best_i)
            return best.clamp_min(0).sqrt(), self.order[best_i] if indices else None
        # Distance to each cluster mean: |q - mu_j| - rho_j bounds the distance to every row of cluster j.
        dm = torch.addmm(self.means_sq, q, self.means.T, alpha=-2.0).add_(q_sq[:, None]).clamp_min_(0).sqrt_()
        # Pass 1: each query searches its closest cluster(s), which gives a tight upper bound.
        if n_probe == 0:
            probe = row_min(dm)[1][:, None]  # (N, 1), cheaper than topk
        else:
            probe = dm.topk(n_probe, dim=1, largest=False).indices  # (N, p)
        rows = torch.arange(n)[:, None].expand_as(probe)
        self._search(q, q_sq, probe.reshape(-1), rows.reshape(-1), best, best_i)
        if n_probe == 0:
            # Pass 2: only the clusters whose lower bound beats that upper bound.
            need = (dm - self.radii).mul_(1 - _SLACK) < best.clamp_min(0).sqrt()[:, None]  # (N, C)
            need[torch.arange(n), probe[:, 0]] = False
            pairs = need.nonzero()  # (P, 2) as (query, cluster)
            self._search(q, q_sq, pairs[:, 1], pairs[:, 0], best, best_i)
        return best.clamp_min(0).sqrt(), self.order[best_i] if indices else None

    def _search(self, q, q_sq, clusters, queries, best, best_i) -> None:
        """Update (best squared distance, best row) of each query with its pairs (query, cluster): (P,), (P,).
        ``best_i`` None: the distances only.

        The pairs are sorted by cluster and their queries gathered once per ``_PAIRS`` of them, so each cluster
        costs one product of a contiguous slice of queries with the cluster's rows and one row-wise minimum.
        """
        if clusters.numel() == 0:
            return
        order = torch.argsort(clusters, stable=True)
        clusters, queries = clusters[order], queries[order]
        v = torch.empty(len(order))
        i = torch.empty(len(order), dtype=torch.long) if best_i is not None else None
        for a in range(0, len(order), _PAIRS):
            qs = q.index_select(0, queries[a : a + _PAIRS])  # several times faster than q[...]
            ids, counts = torch.unique_consecutive(clusters[a : a + _PAIRS], return_counts=True)
            s = 0
            for j, c in zip(ids.tolist(), counts.tolist()):
                lo, hi = self.offsets[j], self.offsets[j + 1]
                step = max(1, _BLOCK // (hi - lo))
                for b in range(s, s + c, step):
                    e = min(s + c, b + step)
                    d2 = torch.addmm(self.bank_sq[lo:hi], qs[b:e], self.bank[lo:hi].T, alpha=-2.0)  # (e - b, S_j)
                    vb, ib = row_min(d2, i is not None, gil=False)  # many small calls, threads side by side
                    v[a + b : a + e] = vb
                    if i is not None:
                        i[a + b : a + e] = ib
                s += c
        v += q_sq.index_select(0, queries)
        if best_i is None:
            best.scatter_reduce_(0, queries, v, "amin")
            return
        i += self.starts[clusters]
        new = best.clone().scatter_reduce_(0, queries, v, "amin")
        won = (v == new[queries]) & (v < best[queries])
        best_i[queries[won]] = i[won]
        best.copy_(new)
