"""How often an explanation names the right defect type, against a labelled test set.

The named type of an image is the top-ranked type of its highest-peak region, or of the whole image when it has
no region (``Explanation.named_type``). top-1: the named type is the defect folder of the image; top-3: the folder
is among the first three. Chance levels: 1 / n_types and min(1, 3 / n_types). Only defective images count.

With ``catalogue_shots=N``, N examples per defect type are drawn from the test set (``few_shot_paths`` on their
paths, with ``seed``) as the catalogue, and both rankings (descriptions only, descriptions + catalogue) are
measured on the remaining defective images, so the two figures share one image set.

Abstention (``coverage_curve``): the images are sorted by their explanation's confidence (``type_confidence``:
the named type's lead over the best other type in its strongest region's ranking and in the whole image's, the
smaller; ``clad.explain.explainer.type_confidence``), most confident first; the top-1 accuracy of the first
10 %, 20 %, ..., 100 % is the accuracy at that coverage (the first ceil(c * n) images; ties in confidence keep
the images' order). ``at_threshold``: the accuracy and coverage of the images the explanations answered (not
``type_uncertain``), with the threshold the explainer learnt from its catalogue alone. ``calibration``: the
catalogue's leave-one-out (confidence, right) pairs it was learnt from; ``confidence_right``: the same per measured
image.
"""
from __future__ import annotations

import math
from typing import Sequence

from clad.data.datasets import few_shot_paths
from clad.explain.catalogue import Catalogue
from clad.explain.explainer import Explainer
from clad.explain.explanation import Explanation
from clad.types import AnomalyResult, ImageLike, Sample


def split_catalogue(samples: Sequence[Sample], n_shots: int, seed: int = 0) -> tuple[Catalogue, list[int]]:
    """Draw ``n_shots`` defective samples per type as a catalogue; returns it and the indices of the others."""
    by_type: dict[str, list[str]] = {}
    for s in samples:
        if s.label and s.defect_type != "good":
            by_type.setdefault(s.defect_type, []).append(s.path)
    chosen = set()
    for t, paths in sorted(by_type.items()):
        if len(paths) <= n_shots:
            raise ValueError(f"defect type {t!r} has {len(paths)} image(s): too few to keep {n_shots} as catalogue")
        chosen.update(few_shot_paths(paths, n_shots, seed))
    picked = [s for s in samples if s.path in chosen]
    return Catalogue.from_samples(picked), [i for i, s in enumerate(samples) if s.path not in chosen]


def naming_accuracy(explanations: Sequence[Explanation], truth: Sequence[str], n_types: int) -> dict:
    """top-1 / top-3 accuracy of the named types against ``truth``, with chance levels; ``image_top1`` /
    ``image_top3``: the same for the whole-image ranking (``Explanation.image_types``)."""
    n = len(explanations)

    def hits(ranked, k):
        return sum(t in r[:k] for r, t in zip(ranked, truth)) / n if n else float("nan")

    by_region = [e.ranked_types() for e in explanations]
    whole = [e.ranked_types(whole_image=True) for e in explanations]
    return {
        "top1": hits(by_region, 1),
        "top3": hits(by_region, 3),
        "image_top1": hits(whole, 1),
        "image_top3": hits(whole, 3),
        "chance_top1": 1.0 / n_types if n_types else float("nan"),
        "chance_top3": min(1.0, 3.0 / n_types) if n_types else float("nan"),
        "n_images": n,
        "n_types": n_types,
    }


COVERAGES = tuple(round(0.1 * k, 1) for k in range(1, 11))


def coverage_curve(explanations: Sequence[Explanation], truth: Sequence[str],
                   coverages: Sequence[float] = COVERAGES) -> list[dict]:
    """top-1 accuracy of the most confident share of the images, per coverage (rule in the module docstring);
    images without a confidence (fewer than two ranked types) come last."""
    order = sorted(range(len(explanations)), key=lambda i: -(explanations[i].type_confidence
                                                             if explanations[i].type_confidence is not None else -math.inf))
    right = [bool(explanations[i].ranked_types()[:1] == [truth[i]]) for i in order]
    out = []
    for c in coverages:
        k = max(1, math.ceil(c * len(right) - 1e-9)) if right else 0
        out.append({"coverage": c, "top1": sum(right[:k]) / k if k else float("nan"), "n_images": k})
    return out


def abstention(explanations: Sequence[Explanation], truth: Sequence[str]) -> dict:
    """The curve, and the accuracy and coverage of the answered images at the explainer's learnt threshold."""
    answered = [i for i, e in enumerate(explanations) if not e.type_uncertain]
    hits = sum(explanations[i].named_type == truth[i] for i in answered)
    return {
        "coverage_curve": coverage_curve(explanations, truth),
        "at_threshold": {
            "threshold": explanations[0].confidence_threshold if explanations else None,
            "coverage": len(answered) / len(explanations) if explanations else float("nan"),
            "top1": hits / len(answered) if answered else float("nan"),
            "n_images": len(answered),
        },
    }


def evaluate_naming(detector, samples: Sequence[Sample], result: AnomalyResult, catalogue_shots: int | None = None,
                    catalogue: Catalogue | None = None, seed: int = 0, references: Sequence[ImageLike] | None = None,
                    normal_images: Sequence[ImageLike] | None = None, keep_rankings: bool = False, **options) -> dict:
    """Measure type naming on the defective ``samples`` (with their ``result``), with and without a catalogue.

    catalogue_shots: draw the catalogue from ``samples`` (see the module docstring); catalogue: a given one
    (e.g. ``Catalogue.from_folder``); references / normal_images / options: as for ``Explainer``.
    Returns {"types", "descriptions": accuracy or None, "catalogue": accuracy or None, "pixel_threshold", ...}.
    """
    keep = list(range(len(samples)))
    if catalogue_shots:
        if catalogue is not None:
            raise ValueError("give catalogue_shots or a catalogue, not both")
        catalogue, keep = split_catalogue(samples, catalogue_shots, seed)
    keep = [i for i in keep if samples[i].label and samples[i].defect_type != "good"]
    if not keep:
        raise ValueError("no defective image left to measure type naming on")
    types = sorted({samples[i].defect_type for i in keep} | set(catalogue.defect_types if catalogue else []))
    images = [samples[i].image for i in keep]
    truth = [samples[i].defect_type for i in keep]
    sub = AnomalyResult(result.scores[keep], [result.anomaly_maps[i] for i in keep], threshold=result.threshold)
    out = {"types": types, "n_catalogue": len(catalogue) if catalogue else 0, "descriptions": None, "catalogue": None}
    for key, cat in (("descriptions", None), ("catalogue", catalogue)):
        if key == "catalogue" and cat is None:
            continue
        ex = Explainer(detector, catalogue=cat, defect_types=types, **options).fit(references, normal_images)
        if key == "descriptions" and ex.text_ is None:
            continue
        explanations = ex.explain(images, sub)
        out[key] = naming_accuracy(explanations, truth, len(types))
        out[key]["space"] = ex.space_ if cat is not None else "shared"
        out["pixel_threshold"], out["pixel_threshold_source"] = explanations[0].pixel_threshold, explanations[0].pixel_threshold_source
        out[key]["with_region"] = sum(bool(e.regions) for e in explanations) / max(1, len(explanations))
        out[key]["peak_only"] = sum(bool(e.regions) and e.regions[0].peak_only for e in explanations) / max(1, len(explanations))
        out[key].update(abstention(explanations, truth))
        out[key]["calibration"] = [[c, bool(r)] for c, r in ex.calibration_]  # the catalogue's leave-one-out
        if keep_rankings and key == "catalogue":
            def rankings(e):
                return [[[t.name, t.similarity] for t in e.ranking], [[t.name, t.similarity] for t in e.image_types]]

            out["_rankings"] = {"test": [[rankings(e), t] for e, t in zip(explanations, truth)],
                                "catalogue": [[rankings(e), t] for e, t in getattr(ex, "calibration_explanations_", [])]}
        out[key]["confidence_right"] = [[e.type_confidence, e.ranked_types()[:1] == [t]] for e, t in zip(explanations, truth)]
    return out


def held_out_normals(all_normals, references, n: int = 4, seed: int = 0) -> list:
    """Up to ``n`` images of ``all_normals`` (a dataset of normal images) that are not among ``references``
    (a dataset too), drawn with ``seed``: normal images the detector never saw, for the pixel threshold."""
    from clad.data.io import load_image

    used = set(getattr(references, "paths", []))
    free = [p for p in all_normals.paths if p not in used]
    if not free:
        return []
    return [load_image(p) for p in few_shot_paths(free, min(n, len(free)), seed)]


def format_naming(res: dict) -> str:
    """The naming figures as printed by ``clad eval --explain``."""
    lines = [f"  defect types ({len(res['types'])}): {', '.join(res['types'])}"]
    for key, label in (("descriptions", "descriptions only"), ("catalogue", f"+ catalogue ({res['n_catalogue']} examples)")):
        r = res.get(key)
        if r is None:
            lines.append(f"  {label:<30} n/a" + (" (no shared image-text space)" if key == "descriptions" else ""))
            continue
        lines.append(f"  {label:<30} top-1 {r['top1']:.3f} (chance {r['chance_top1']:.3f})  "
                     f"top-3 {r['top3']:.3f} (chance {r['chance_top3']:.3f})  on {r['n_images']} images; "
                     f"whole-image ranking: top-1 {r['image_top1']:.3f}, top-3 {r['image_top3']:.3f}")
        curve = "  ".join(f"{p['coverage']:.0%} {p['top1']:.2f}" for p in r["coverage_curve"])
        lines.append(f"  {'':<30} top-1 by coverage: {curve}")
        a = r["at_threshold"]
        if a["threshold"] is None:
            n = len(r.get("calibration", []))
            why = "it answered all of them" if n >= 2 else "needs two examples of a type"
            lines.append(f"  {'':<30} no abstention threshold from the catalogue's {n} leave-one-out examples ({why})")
        else:
            lines.append(f"  {'':<30} at the catalogue's threshold {a['threshold']:.3g}: top-1 {a['top1']:.3f} "
                         f"on {a['coverage']:.0%} of the images ({a['n_images']}), the rest 'type uncertain'")
    return "\n".join(lines)
