"""Every figure that ``clad eval`` prints and ``clad bench`` tabulates, declared once.

``clad eval``'s printout, the bench's ``results.json`` tables and ``report.md``, and ``benchmarks/collect.py``'s
summary in benchmarks/README.md all read ``METRICS`` (through the functions below, at call time): a figure
added here, under the key that ``clad.evaluate.evaluate`` (or the bench) records it with, shows up in each.
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("accuracy", "speed", "memory", "threshold")
TABLES = ("table1", "table4", "speed")


@dataclass(frozen=True)
class MetricSpec:
    """One figure and where it is shown.

    key: its key in ``evaluate``'s result and in a bench run's ``metrics``.
    label: column header of the bench's tables. scale, decimals: how the bench shows it (scale 100: percent).
    kind: "accuracy" (higher is better), "speed" or "memory" (lower is better), "threshold" (a decision
        threshold on the score: neither).
    table: the bench table with a column for it: "table1" (detection and localisation), "table4" (IoU) or
        "speed" (speed and memory); None: recorded in each run only.
    per_category: also a column of the bench's per-category tables.
    bench_only: measured by the bench around ``evaluate`` (not by it), so not in ``clad eval``'s printout.
    long_label: ``clad eval``'s row name, where it says more than ``label``.
    short_label: the README summary's column header, where ``label`` is too wide.
    summary_decimals: decimals in the README summary (accuracy there in percent); None: not in the summary.
    only_when_measured: the bench's column is left out when no run has a value (CUDA memory without a GPU).
    """

    key: str
    label: str
    scale: float = 1
    decimals: int = 3
    kind: str = "accuracy"
    table: str | None = None
    per_category: bool = False
    bench_only: bool = False
    long_label: str | None = None
    short_label: str | None = None
    summary_decimals: int | None = None
    only_when_measured: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.key!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.table is not None and self.table not in TABLES:
            raise ValueError(f"metric {self.key!r}: table must be one of {TABLES} or None, got {self.table!r}")


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("image_auroc", "image AUROC", 100, 1, table="table1", per_category=True, summary_decimals=1),
    MetricSpec("pixel_auroc", "pixel AUROC", 100, 1, table="table1", per_category=True, summary_decimals=1),
    MetricSpec("aupro", "AUPRO", 100, 1, table="table1", per_category=True, long_label="AUPRO (FPR<=0.3)",
               summary_decimals=1),
    MetricSpec("image_f1_max", "image F1-max", 100, 1, table="table1", per_category=True, summary_decimals=1),
    MetricSpec("pixel_f1_max", "pixel F1-max", 100, 1, table="table1", per_category=True),
    MetricSpec("image_ap", "image AP", 100, 1),
    MetricSpec("pixel_ap", "pixel AP", 100, 1),
    MetricSpec("iou", "IoU", 1, 3, table="table4", per_category=True, summary_decimals=1),
    MetricSpec("mean_iou", "mean IoU (defective)", 1, 3, table="table4"),
    # The detector's own label-free threshold (``Detector.fit``) and the F1-max one of the test scores, each with
    # the precision and recall of its decisions on the test split (``evaluate.threshold_figures``).
    MetricSpec("threshold", "threshold", 1, 4, kind="threshold", long_label="label-free threshold"),
    MetricSpec("threshold_precision", "precision at threshold", 100, 1, long_label="  precision"),
    MetricSpec("threshold_recall", "recall at threshold", 100, 1, long_label="  recall"),
    MetricSpec("image_f1_threshold", "F1-max threshold", 1, 4, kind="threshold", long_label="threshold (F1-max)"),
    MetricSpec("image_f1_precision", "precision at F1-max threshold", 100, 1, long_label="  precision"),
    MetricSpec("image_f1_recall", "recall at F1-max threshold", 100, 1, long_label="  recall"),
    MetricSpec("fit_seconds", "fit (s)", 1, 2, kind="speed", table="speed", long_label="fit time (s)",
               summary_decimals=1),
    MetricSpec("predict_ms_per_image", "predict (ms/image)", 1, 1, kind="speed", table="speed",
               short_label="predict (ms/img)", summary_decimals=0),
    MetricSpec("backbone_ms_per_image", "backbone forward (ms/image)", 1, 1, kind="speed", table="speed",
               bench_only=True),
    MetricSpec("predict_over_backbone", "predict / backbone", 1, 2, kind="speed", table="speed", bench_only=True,
               summary_decimals=2),
    MetricSpec("peak_rss_growth_mb", "peak RSS growth (MB)", 1, 0, kind="memory", table="speed", bench_only=True),
    MetricSpec("cuda_peak_mb", "CUDA peak allocated (MB)", 1, 0, kind="memory", table="speed", bench_only=True,
               only_when_measured=True),
)


def metric(key: str) -> MetricSpec | None:
    """The declaration of ``key``; None for a figure that is not declared."""
    return next((m for m in METRICS if m.key == key), None)


def in_table(table: str) -> list[MetricSpec]:
    """The columns of one of the bench's tables (``TABLES``), in declaration order."""
    return [m for m in METRICS if m.table == table]


def per_category() -> list[MetricSpec]:
    """The columns of the bench's per-category tables."""
    return [m for m in METRICS if m.per_category]


def eval_rows() -> list[tuple[str, str]]:
    """(row name, key) of each figure ``clad eval`` prints."""
    return [(m.long_label or m.label, m.key) for m in METRICS if not m.bench_only]


def summary_metrics() -> list[MetricSpec]:
    """The columns of benchmarks/README.md's summary table (``benchmarks/collect.py``)."""
    return [m for m in METRICS if m.summary_decimals is not None]
