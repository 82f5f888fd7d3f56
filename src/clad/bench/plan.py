"""The bench's grid: which categories, which runs, and the settings (hence the cache key) of each run.

Parsing of what the user typed (datasets, detectors, shots) is ``clad.specs``'s; this module turns the parsed
specs into ``Run`` cells. A run's cache key hashes its full settings, so a changed default is a different run and a
rerun finds exactly the runs it already has.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from clad.bench.files import plain
from clad.errors import SpecError
from clad.specs import DetectorSpec, dataset_name, detector_params, shots_text, split_top


def resolve_categories(data_specs: Sequence[str], categories: str | Sequence[str]) -> dict[str, list[str | None]]:
    """Categories per dataset. ``all`` lists each dataset's; a list keeps, per dataset, the names it has.

    Folder datasets have one unnamed category (None). A listed name that no dataset has is an error.
    """
    from clad.data import list_categories, resolve_dataset_spec

    wanted = None if categories in ("all", ["all"], None) else (
        split_top(categories, ",") if isinstance(categories, str) else list(categories))
    out, seen = {}, set()
    for spec in data_specs:
        if resolve_dataset_spec(spec)[1].categories is None:  # one unnamed category
            out[spec] = [None]
            continue
        have = list_categories(spec)
        cats = have if wanted is None else [c for c in wanted if c in have]
        seen.update(cats)
        out[spec] = cats
    if wanted is not None:
        missing = [c for c in wanted if c not in seen]
        if missing and any(not s.startswith("folder:") for s in data_specs):
            raise SpecError(f"--categories: {missing} not found in {', '.join(map(dataset_name, data_specs))}")
    return out


def cache_key(settings: dict, pixel_eval_size: int | None) -> str:
    """16 hex digits of the SHA-256 of a run's settings plus the pixel evaluation size (the runs/ file name)."""
    doc = dict(settings, pixel_eval_size=pixel_eval_size)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Run:
    """One cell of the grid."""

    dataset: str
    category: str | None
    detector: DetectorSpec
    shots: int | None
    seed: int
    corruption: tuple[str, int] | None = None  # (name, severity) applied to the test images (clad.data.corruptions)

    @property
    def category_name(self) -> str:
        if self.category is not None:
            return self.category
        return Path(self.dataset.partition(":")[2].split(",")[0]).name

    def detector_params(self) -> dict:
        """The parameters the detector is built with: the spec's, plus this run's seed and category."""
        return detector_params(self.detector.name, self.detector.params, seed=self.seed, category=self.category,
                               shots=self.shots)

    def settings(self) -> dict:
        """Everything that determines this run's figures; its hash is the cache key."""
        import clad
        from clad.detectors.base import make_config
        from clad.registry import detector_class

        params = self.detector_params()
        try:  # the resolved config, so that a changed default is a different run
            config = make_config(detector_class(self.detector.name).Config, params, "")
            resolved = dataclasses.asdict(config)
        except Exception:  # noqa: BLE001 - the run itself reports the error; the key needs only the given params
            resolved = None
        else:  # a field that changes nothing at these values (metadata ``omit_from_key_when``) is left out
            full = dict(resolved)  # conditions read the whole config, not what an earlier field's omission left
            for f in dataclasses.fields(config):
                when = f.metadata.get("omit_from_key_when")
                if when and all(full.get(k) == v for k, v in when.items()):
                    resolved.pop(f.name)
        settings = {
            "dataset": self.dataset,
            "category": self.category_name,
            "detector": self.detector.name,
            "params": plain(params),
            "resolved_params": plain(resolved),
            "shots": shots_text(self.shots),
            "seed": self.seed,
            "clad_version": clad.__version__,
        }
        if self.corruption is not None:  # only then: a clean run keeps the key it had before corruptions existed
            settings["corruption"] = self.corruption_text
        return settings

    @property
    def corruption_text(self) -> str:
        """``name:severity``, or ``none`` for the clean test set."""
        return "none" if self.corruption is None else f"{self.corruption[0]}:{self.corruption[1]}"

    def key(self, pixel_eval_size: int | None) -> str:
        return cache_key(self.settings(), pixel_eval_size)

    def filename(self, pixel_eval_size: int | None) -> str:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.category_name}-{self.detector.name}")
        corrupted = "" if self.corruption is None else f"-{self.corruption[0]}{self.corruption[1]}"
        return f"{slug}-shots{shots_text(self.shots)}-seed{self.seed}{corrupted}-{self.key(pixel_eval_size)}.json"

    def title(self) -> str:
        return (f"{dataset_name(self.dataset)}/{self.category_name} {self.detector.label} "
                f"shots={shots_text(self.shots)} seed={self.seed}"
                + ("" if self.corruption is None else f" corruption={self.corruption_text}"))


def plan_runs(data_specs, categories: dict, detectors: Sequence[DetectorSpec], shots: Sequence, seeds,
              corruptions: Sequence[tuple[str, int]] = ()) -> list[Run]:
    """The grid, category-major so that one category's test images are decoded once for all its runs, and the
    detectors of one (shots, seed) next to each other so that those of one fit share it (``Detector.adopt``).
    With ``corruptions``, each detector's clean run is followed by one run per (name, severity), on the same fit."""
    versions = [None, *corruptions] if corruptions else [None]
    return [Run(d, c, det, s, seed, corr) for d in data_specs for c in categories[d] for s in shots
            for seed in seeds for det in detectors for corr in versions]


def n_planned_runs(settings: dict) -> int:
    """How many runs the grid of a results.json's ``settings`` has (datasets x categories x detectors x shots x
    seeds x test sets: the clean one and each corruption), whether or not they all finished."""
    n_cats = sum(len(settings["categories"][dataset_name(d)]) for d in settings["data"])
    n_versions = 1 + len(settings.get("corruptions") or ())  # the clean test set and each corrupted one
    return n_cats * len(settings["detectors"]) * len(settings["shots"]) * len(settings["seeds"]) * n_versions


def dataset_kind(dataset: str) -> str:
    """``mvtec``, ``visa`` or ``folder``: the scheme of a dataset spec."""
    return dataset.partition(":")[0]
