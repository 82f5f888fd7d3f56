"""Human rating of the anomaly maps (the paper's Table 3): blind rating sheets out, filled sheets in.

``export_rating_sheet`` writes blind overlays and a sheet for the raters, and a separate key; ``import_ratings``
turns the filled sheets (one per rater) and the key into the table, ``ratings_markdown`` into its markdown.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from clad.bench.aggregate import fmt, mean_std
from clad.bench.files import read_json, write_json
from clad.bench.paper import published
from clad.bench.plan import Run, dataset_kind, resolve_categories
from clad.bench.render import md_table
from clad.errors import SpecError
from clad.specs import dataset_name, parse_data_specs, parse_detector_specs, parse_shots, shots_text, split_top

KEY_FORMAT = "clad-rating-key"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def export_rating_sheet(out: str | Path, data, categories="all", detectors="patchcore", shots="1",
                        n_images: int = 20, seed: int = 0, scale: str = "per_map", batch_size: int = 16) -> dict:
    """Blind overlays of each detector's map on a seeded sample of defective test images, and a sheet to fill.

    Per (dataset, category): every detector is fitted on ``shots`` references drawn with ``seed`` (and seeded with
    it); ``n_images`` defective test images are drawn with ``seed``. For each image and detector,
    ``images/<image_id>_<letter>.png``, the letters shuffled per image (seeded) so the detector is hidden;
    ``ground_truth/<image_id>.png`` outlines the true defect in red. ``sheet.csv`` lists (image_id, option, rating
    (blank), ground_truth, image); ``key.json`` maps each (image_id, option) to the detector label: keep it away
    from the raters.

    scale: "per_map" (default) min-max scales each map over its own image before colouring, so every option of an
    image is drawn on the same [0, 1] colour scale whatever its detector's score units (raw scores of different
    detectors are not comparable, and one shared raw range would blank the maps of the detectors with small
    scores); "shared" colours every option of an image with the min and max of the raw maps of all its options.
    """
    from clad.data import open_dataset
    from clad.evaluate import load_split
    from clad.registry import create_detector
    from clad.viz import draw_contour, overlay, save_png

    if scale not in ("per_map", "shared"):
        raise ValueError(f"scale must be 'per_map' or 'shared', got {scale!r}")
    out = Path(out)
    data_specs = parse_data_specs(data)
    det_specs = parse_detector_specs(detectors)
    if len(det_specs) > len(LETTERS):
        raise SpecError(f"at most {len(LETTERS)} detectors per sheet")
    n_shots = parse_shots(shots)[0]
    cats = resolve_categories(data_specs, categories)
    rows, key = [], {}
    for ds in data_specs:
        for cat in cats[ds]:
            test = open_dataset(ds, cat, "test")
            defective = np.flatnonzero(test.labels == 1)
            if not len(defective):
                continue
            rng = np.random.default_rng(seed)
            pick = np.sort(rng.choice(defective, size=min(n_images, len(defective)), replace=False))
            samples, failures = load_split(_Subset(test, pick), progress=False)
            for f in failures:
                print(f"skipped {f['path']}: {f['error']}", file=sys.stderr)
            train_samples, _ = load_split(open_dataset(ds, cat, "train", n_shots=n_shots, seed=seed), progress=False)
            maps = {}
            for spec in det_specs:
                run = Run(ds, cat, spec, n_shots, seed)
                det = create_detector(spec.name, **run.detector_params()).fit([s.image for s in train_samples])
                maps[spec.label] = det.predict([s.image for s in samples], batch_size=batch_size).anomaly_maps
                print(f"rating sheet: {dataset_name(ds)}/{run.category_name}: {spec.label} fitted and applied")
            for j, s in enumerate(samples):
                cat_name = Run(ds, cat, det_specs[0], n_shots, seed).category_name
                image_id = re.sub(r"[^A-Za-z0-9_.-]+", "_",
                                  f"{dataset_kind(ds)}-{cat_name}-{s.defect_type}-{Path(s.path).stem}")
                gt = f"ground_truth/{image_id}.png"
                save_png(draw_contour(s.image, s.mask, colour=(255, 0, 0), width=2), out / gt)
                order = np.random.default_rng([seed, len(key)]).permutation(len(det_specs))  # hides the detector
                raw = [maps[det_specs[k].label][j] for k in range(len(det_specs))]
                lo, hi = float(min(m.min() for m in raw)), float(max(m.max() for m in raw))
                key[image_id] = {}
                for letter, k in zip(LETTERS, order):
                    amap = maps[det_specs[k].label][j]
                    if scale == "per_map":
                        amap = (amap - amap.min()) / max(float(amap.max() - amap.min()), 1e-12)
                        vmin, vmax = 0.0, 1.0
                    else:
                        vmin, vmax = lo, hi
                    name = f"images/{image_id}_{letter}.png"
                    save_png(overlay(s.image, amap, vmin, vmax), out / name)
                    key[image_id][letter] = det_specs[k].label
                    rows.append({"image_id": image_id, "option": letter, "rating": "", "ground_truth": gt,
                                 "image": name})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sheet.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image_id", "option", "rating", "ground_truth", "image"])
        w.writeheader()
        w.writerows(rows)
    write_json(out / "key.json", {
        "format": KEY_FORMAT,
        "settings": {"data": data_specs, "categories": {dataset_name(k): v for k, v in cats.items()},
                     "detectors": [dataclasses.asdict(d) for d in det_specs], "shots": shots_text(n_shots),
                     "n_images": n_images, "seed": seed, "scale": scale},
        "options": key,
    })
    print(f"rating sheet: {len(key)} image(s) x {len(det_specs)} option(s) -> {out / 'sheet.csv'}; "
          f"the key is {out / 'key.json'}: keep it from the raters")
    return {"sheet": str(out / "sheet.csv"), "key": str(out / "key.json"), "n_images": len(key), "rows": rows}


class _Subset:
    """Samples ``indices`` of a dataset, lazily, with their paths (for load_split's failure messages)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        self.paths = [dataset.paths[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


def import_ratings(sheets: str | Sequence[str], key_path: str | Path) -> dict:
    """Filled sheets (one CSV per rater) + key.json -> per detector: mean, std (ddof=1), raters, images.

    Each non-blank rating must be an integer 1-5; blank ones are skipped (counted as ``n_blank``). Mean and std
    are over all individual ratings of the detector (every rater, every image).
    """
    from clad.errors import ConfigError

    paths = split_top(sheets, ",") if isinstance(sheets, str) else [str(s) for s in sheets]
    key = read_json(Path(key_path))
    if not key or key.get("format") != KEY_FORMAT:
        raise ConfigError(f"{key_path}: not a rating key written by `clad bench --rating-sheet`")
    options = key["options"]
    labels = list(dict.fromkeys(d["label"] for d in key["settings"]["detectors"]))
    ratings: dict[str, list[tuple[str, str, int]]] = {lab: [] for lab in labels}
    n_blank = 0
    for p in paths:
        rater = Path(p).stem
        with open(p, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"image_id", "option", "rating"} - set(reader.fieldnames or [])
            if missing:
                raise ConfigError(f"{p}: missing column(s) {sorted(missing)}")
            for line, row in enumerate(reader, start=2):
                text = (row["rating"] or "").strip()
                if not text:
                    n_blank += 1
                    continue
                label = options.get(row["image_id"], {}).get(row["option"])
                if label is None:
                    raise ConfigError(f"{p}, line {line}: image {row['image_id']!r} option {row['option']!r} "
                                      "is not in the key")
                try:
                    value = float(text)
                except ValueError:
                    value = math.nan
                if not (value == int(value) if math.isfinite(value) else False) or not 1 <= value <= 5:
                    raise ConfigError(f"{p}, line {line}: rating must be an integer 1-5, got {text!r}")
                ratings[label].append((rater, row["image_id"], int(value)))
    rows = []
    for lab in labels:
        vals = [v for _, _, v in ratings[lab]]
        mean, std = mean_std(vals)
        rows.append({"detector": lab, "mean": mean, "std": std, "n_ratings": len(vals),
                     "n_raters": len({r for r, _, _ in ratings[lab]}), "n_images": len({i for _, i, _ in ratings[lab]}),
                     "published": published()["table3"].get(lab)})
    return {"rows": rows, "n_blank": n_blank, "sheets": paths, "key": str(key_path)}


def ratings_markdown(table: dict) -> str:
    rows = [[r["detector"], fmt(r["mean"], 1, 2), fmt(r["std"], 1, 2), r["n_raters"], r["n_images"],
             r["n_ratings"], "—" if r["published"] is None else f"{r['published']:.1f}"] for r in table["rows"]]
    return "\n".join([
        "## Table 3: human rating of the anomaly maps (1 = useless, 5 = exact)", "",
        md_table(["detector", "mean", "std", "raters", "images", "ratings", f"mean, {published()['note']}"], rows), "",
        f"Mean and sample std (ddof = 1) over every individual rating of the detector. Sheets: "
        f"{', '.join(Path(s).name for s in table['sheets'])}; {table['n_blank']} blank rating(s) skipped. "
        "The paper's ratings cover its own images and raters.", ""])
