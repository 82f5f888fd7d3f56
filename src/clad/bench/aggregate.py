"""From run records to figures: one aggregation rule for every table, and how a figure is written.

For each seed, the mean over the categories of that seed's values (only when every category's run of that seed
succeeded with a finite value), then mean +- sample std (ddof=1) over seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from clad import metrics_catalog
from clad.bench.paper import published
from clad.bench.plan import dataset_kind
from clad.specs import DetectorSpec, shots_order


@dataclass
class Stat:
    """Mean +- sample std over seeds; ``n`` seeds used of ``n_seeds`` seen; ``values`` per seed used."""

    mean: float
    std: float
    n: int
    n_seeds: int
    values: dict = field(default_factory=dict)


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of ``values``; nan for what one value (or none) cannot give."""
    if not values:
        return math.nan, math.nan
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else math.nan


def aggregate(records: Iterable[dict], metric: str, by: Sequence[str] = ("dataset", "label", "shots")) -> dict:
    """Group the run records by ``by`` (settings keys); per group, per seed, the mean over the group's categories.

    A seed counts only when every category of the group has an "ok" run of that seed with a finite value (so
    that no seed's average silently covers fewer categories); then mean +- std (ddof=1) over the seeds that count.
    Returns ``{group tuple: Stat}``; with ``category`` in ``by`` this is the per-category mean +- std over seeds.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r["settings"][k] for k in by), []).append(r)
    out = {}
    for g, recs in groups.items():
        categories = sorted({str(r["settings"]["category"]) for r in recs})
        seeds = sorted({r["settings"]["seed"] for r in recs})
        per_seed = {}
        for seed in seeds:
            vals = {}
            for r in recs:
                s = r["settings"]
                v = r.get("metrics", {}).get(metric) if r.get("status") == "ok" else None
                if s["seed"] == seed and finite(v):
                    vals[str(s["category"])] = float(v)
            if len(vals) == len(categories):
                per_seed[seed] = float(np.mean([vals[c] for c in categories]))
        mean, std = mean_std(list(per_seed.values()))
        out[g] = Stat(mean, std, len(per_seed), len(seeds), per_seed)
    return out


# ------------------------------------------------------------------------------------------------ writing


def fmt(x, scale: float = 1, decimals: int = 1) -> str:
    return f"{x * scale:.{decimals}f}" if finite(x) else "—"


def _display(metric: str) -> tuple[float, int]:
    """(scale, decimals) of a declared figure (``clad.metrics_catalog``); (1, 3) for any other."""
    spec = metrics_catalog.metric(metric)
    return (spec.scale, spec.decimals) if spec else (1, 3)


def fmt_value(x, metric: str) -> str:
    """One value of ``metric`` as the tables show it (AUROC-like figures in percent)."""
    return fmt(x, *_display(metric))


def fmt_stat(st: Stat | None, metric: str) -> str:
    """``mean ± std`` as the metric is shown (AUROC-like ones in percent); ``(k/N runs)`` when some seeds did not
    count."""
    if st is None or st.n == 0:
        return "—" if st is None else f"— (0/{st.n_seeds} runs)"
    scale, dec = _display(metric)
    text = fmt(st.mean, scale, dec) + (f" ± {fmt(st.std, scale, dec)}" if finite(st.std) else "")
    return text + (f" ({st.n}/{st.n_seeds} runs)" if st.n < st.n_seeds else "")


# ------------------------------------------------------------------------------------------------- tables


def build_tables(records: Sequence[dict], det_specs: Sequence[DetectorSpec]) -> dict:
    """Every aggregated figure, as JSON-ready rows (the markdown tables are made from these).

    ``table1``: the metrics of Table 1 and Table 4 per (dataset, label, shots), with the published 1-shot AUROC
    of the registry detectors with their defaults; ``speed``: the speed table's; ``per_category``: per (dataset,
    category, label, shots). ``_raw`` holds the same as (group, {metric: Stat}) pairs for the renderer.
    """
    order = {d.label: i for i, d in enumerate(det_specs)}
    plain = {d.label for d in det_specs if d.is_plain}

    def sort_key(g):
        *head, label, shots = g
        return (*head, order.get(label, 99), shots_order(shots))

    def stats(metrics, by):
        agg = {m: aggregate(records, m, by) for m in metrics}
        groups = sorted({g for a in agg.values() for g in a}, key=sort_key)
        return [(g, {m: agg[m].get(g) for m in metrics}) for g in groups]

    def row(g, st, by):
        out = dict(zip(by, g))
        for m, s in st.items():
            out[m] = None if s is None else {"mean": s.mean, "std": s.std, "n_runs": s.n, "n_seeds": s.n_seeds,
                                             "per_seed": s.values}
        return out

    def keys(*tables):
        return [m.key for t in tables for m in metrics_catalog.in_table(t)]

    by = ("dataset", "label", "shots")
    by_cat = ("dataset", "category", "label", "shots")
    table1 = stats(keys("table1", "table4"), by)
    speed = stats(keys("speed"), by)
    per_cat = stats([m.key for m in metrics_catalog.per_category()], by_cat)
    tables = {
        "table1": [row(g, st, by) for g, st in table1],
        "speed": [row(g, st, by) for g, st in speed],
        "per_category": [row(g, st, by_cat) for g, st in per_cat],
        "_raw": {"table1": table1, "speed": speed, "per_category": per_cat},
    }
    paper = published()["table1"]
    for r in tables["table1"]:
        spec = next((d for d in det_specs if d.label == r["label"]), None)
        pub = paper.get(dataset_kind(r["dataset"]), {}).get(r["label"]) if r["label"] in plain else None
        r["published_1shot"] = None if pub is None else {"image_auroc": pub[0], "pixel_auroc": pub[1]}
        r["detector"] = spec.name if spec else None
    return tables
