"""``clad bench``: run every (dataset, category, detector, shots, seed), cache each run, and write the paper's tables.

A bench is a grid of runs (``plan``). Run r uses seed r both to draw the reference images and as the detector's
``seed``. Each finished run is cached as one JSON file under ``DIR/runs/``, keyed by a hash of its full settings,
so an interrupted bench goes on where it stopped (``runner``); a run also records its time and memory
(``measure``). From the runs, ``results.json`` (every figure with its settings) and ``report.md`` (tables, plots,
failures; ``render``), with one aggregation rule for every table (``aggregate``) and the paper's published
numbers beside ours (``paper.json``). Human ratings of the maps, the paper's Table 3: ``ratings``.
The figures shown are declared once, in ``clad.metrics_catalog``.
"""
from clad.bench.aggregate import Stat, aggregate, build_tables, fmt_stat
from clad.bench.cli import add_parser, cmd_bench
from clad.bench.measure import PeakMemory, machine, time_backbone
from clad.bench.paper import published
from clad.bench.plan import Run, cache_key, plan_runs, resolve_categories
from clad.bench.ratings import export_rating_sheet, import_ratings, ratings_markdown
from clad.bench.render import render_report, report_from_results, write_outputs, write_plots
from clad.bench.runner import execute_run, run_bench

__all__ = [
    "PeakMemory",
    "Run",
    "Stat",
    "add_parser",
    "aggregate",
    "build_tables",
    "cache_key",
    "cmd_bench",
    "execute_run",
    "export_rating_sheet",
    "fmt_stat",
    "import_ratings",
    "machine",
    "plan_runs",
    "published",
    "ratings_markdown",
    "render_report",
    "report_from_results",
    "resolve_categories",
    "run_bench",
    "time_backbone",
    "write_outputs",
    "write_plots",
]
