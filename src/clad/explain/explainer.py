"""Explanations from a detector's anomaly maps: regions, where they are, what defect they resemble, what normal
looks like there.

For each image (``Explainer.explain``):
1. regions: connected components of ``map >= pixel_threshold`` of at least ``min_area`` of the image
   (``clad.explain.regions``). The pixel threshold is, in this order: the ``pixel_threshold`` argument; the
   99.5th percentile of the maps of the normal images given to ``fit`` (``normal_images``, else ``references``;
   memory-based detectors hold the references themselves, so pass other normal images when there are some); the
   detector's ``threshold_`` when it declares that its score is the map's maximum (``score_is_map_max``); else
   the 99.5th percentile of the maps explained in that call ("batch"). An image flagged anomalous (score above
   the decision threshold, or no threshold: the explanation was asked for) with no such component gets the
   component around its map's maximum (``regions.peak_component``: map >= half-way from its median to its
   peak), flagged ``peak_only``; an image judged normal gets none.
2. region descriptors: the mean of the patch embeddings inside the region, each patch weighted by the share of
   it the region covers (``weighting="area"``), or by the region's map excess over the pixel threshold in it
   (``weighting="anomaly"``, which favours the defect's core). Two spaces: "shared" (``detector.embed_patches``
   of a detector with an image-text space, ``ImageTextSpace``) and "features" (``detector.patch_features`` of a
   ``PatchFeatures`` detector, standardised by the mean and standard deviation of normal patches: of the
   references when given, else of the catalogue's unmasked patches). ``space="auto"``: features for the
   catalogue when the detector has them (they named magnetic-tile types better than the shared space, measured
   with ``clad.explain.quality``), else shared; without a shared space, features only when a catalogue or
   references will read them (else none: no second forward per batch for descriptors nothing uses).
3. defect types, ranked by similarity s_t of the region to each type t:
   - text (shared space only): cosine of the region descriptor to the type's text embedding, the normalised mean
     of ``detector.embed_texts`` over the type's descriptions (``clad.explain.phrases.defect_descriptions``);
   - catalogue, rule "patches" (default): each patch of the region gets the margin between its largest cosine to
     the type's defect patches (catalogue cells >= 30 % inside the mask) and its largest cosine to normal patches
     (the catalogue's unmasked cells and the references' patches); the catalogue term is the mean of the region's
     ``top_k`` largest margins. Rule "prototype": cosine of the region descriptor to the normalised mean of the
     type's example descriptors (masked patches of each example); rule "knn": the largest cosine to any example;
   - both known: s_t = (1 - w) * text + w * catalogue, w = ``catalogue_weight`` (0.5); one known: that one (so a
     type without examples keeps its text score); no shared space and no catalogue: no ranking ("type unknown").
   The types are ``defect_types`` (e.g. the test set's folder names) plus the catalogue's, else the kinds the
   detector's image-text space was trained with (``trained_descriptions``, without "normal"). The whole image is
   ranked the same way (``image_types``).
4. nearest normal (when ``references`` were given to ``fit``): the reference patch whose descriptor (in the
   catalogue space) has the largest cosine with the region descriptor; its image index and grid-cell box.
5. abstention: the confidence of an explanation (``type_confidence``) is the named type's lead over the best
   other type in two views of the image, its strongest region (the ranking it names from) and the whole image,
   whichever lead is smaller: min(s_1 - s_2 of the region, s_named - max of the others on the whole image). When
   both views name the same type it is the smaller of their two margins; when the whole image prefers another
   type it is negative, so below every explanation whose views agree; without a region the two views are one and
   it is the margin s_1 - s_2. With a catalogue, ``fit`` explains each catalogue example as a
   flagged image (the detector's map, its regions) with one example of every type left out of the catalogue per
   round (``_leave_one_out``: 2 examples per type give 2 rounds of 1 example per type), which gives (confidence,
   right) pairs from the catalogue alone; ``confidence_threshold`` turns them into the confidence below which
   the catalogue's own accuracy falls under chance + ``abstain_gain`` (0.2). Below it the explanation is
   ``type_uncertain``: ``named_type`` is None, the sentence says "type uncertain", the ranking stays. No
   threshold (never uncertain) without a catalogue, with fewer than two examples of every type, or when the
   catalogue keeps the target at all its confidences.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clad.data.io import load_batch
from clad.detectors.capabilities import GradCAM, ImageTextSpace, PatchFeatures
from clad.explain.catalogue import Catalogue
from clad.explain.explanation import Explanation, NormalMatch, Region, TypeScore
from clad.explain.phrases import defect_descriptions, defect_phrase
from clad.explain.regions import MIN_AREA, extract_regions, location_words, peak_component
from clad.ops.features import patch_embeddings
from clad.types import AnomalyResult, ImageLike

NORMAL_QUANTILE = 99.5
ABSTAIN_GAIN = 0.2  # the type is named when the catalogue's own accuracy at that confidence is >= chance + this
SPACES = ("auto", "shared", "features")
RULES = ("patches", "prototype", "knn")


def _name(detector) -> str:
    return getattr(detector, "name", "") or type(detector).__name__


def gradcam_maps(detector, images: Sequence[ImageLike], batch_size: int = 16) -> list[np.ndarray]:
    """Grad-CAM maps (paper Eq. 5) of the detector's score, one (H_i, W_i) map per image at its own size, from a
    detector that has them (``clad.detectors.capabilities.GradCAM``). The detector itself is left unchanged."""
    if not isinstance(detector, GradCAM):
        raise TypeError(f"{_name(detector)}: no Grad-CAM maps (a detector has them when its score is differentiable "
                        "through its backbone and it defines gradcam(images, batch_size))")
    return detector.gradcam(list(images), batch_size=batch_size)


class FeatureSpace:
    """A ``PatchFeatures`` detector's patch features (B, C, h, w), standardised once ``standardise`` has run."""

    def __init__(self, detector):
        if not isinstance(detector, PatchFeatures):
            raise TypeError(f"{_name(detector)}: no patch features (patch_features(images))")
        self.detector = detector
        self.mean = self.std = None

    def __call__(self, arrays: list[np.ndarray]) -> torch.Tensor:
        f = self.detector.patch_features(arrays)  # (B, C, h, w)
        if self.mean is not None:
            f = (f - self.mean[None, :, None, None]) / self.std[None, :, None, None]
        return f

    def standardise(self, patches: torch.Tensor) -> None:
        """Set the statistics from normal patches (N, C)."""
        self.mean = patches.mean(0)
        self.std = patches.std(0).clamp_min(1e-6) if len(patches) > 1 else torch.ones_like(self.mean)


def cell_weights(mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool mask (or float weights) -> (h, w) mean over each grid cell (the grid spans the whole image)."""
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.adaptive_avg_pool2d(m, grid)[0, 0]


def pooled(grid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(D, h, w) patch embeddings, (h, w) weights -> (D,) weighted mean."""
    w = weights.to(grid.dtype)
    return (grid * w).sum((1, 2)) / w.sum().clamp_min(1e-12)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(D,) x (N, D) -> (N,) cosine similarities."""
    return F.normalize(b, dim=-1) @ F.normalize(a, dim=0)


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


class Explainer:
    """Turns a detector's result into one ``Explanation`` per image (the rules are in the module docstring).

    Args: detector (fitted); catalogue: annotated examples per defect type; defect_types: names to rank (e.g. the
    test set's defect folders); pixel_threshold: the map threshold for regions; min_area: smallest region, as a
    share of the image; space: the catalogue and nearest-normal space, "auto", "shared" or "features"; rule:
    "patches", "prototype" or "knn"; catalogue_weight: w above; n_types: how many ranked types each region keeps;
    gradcam: calibrate on Grad-CAM maps (explain results of ``gradcam_maps``); object_name: the noun in
    descriptions (default: from the detector's category); weighting: "area" or "anomaly" (how a region's patches
    are averaged); top_k: patches averaged by the "patches" rule; abstain: learn the confidence threshold from
    the catalogue (step 5); abstain_gain: how far above chance the catalogue's accuracy must stay.
    """

    def __init__(self, detector, catalogue: Catalogue | None = None, defect_types: Sequence[str] | None = None,
                 pixel_threshold: float | None = None, min_area: float = MIN_AREA, space: str = "auto",
                 rule: str = "patches", catalogue_weight: float = 0.5, n_types: int = 3, gradcam: bool = False,
                 object_name: str | None = None, weighting: str = "area", top_k: int = 3, batch_size: int = 16,
                 abstain: bool = True, abstain_gain: float = ABSTAIN_GAIN):
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if weighting not in ("area", "anomaly"):
            raise ValueError(f"weighting must be 'area' or 'anomaly', got {weighting!r}")
        if not 0.0 <= catalogue_weight <= 1.0:
            raise ValueError(f"catalogue_weight must be in [0, 1], got {catalogue_weight}")
        self.detector, self.catalogue, self.defect_types = detector, catalogue, defect_types
        self.pixel_threshold, self.min_area, self.space, self.rule = pixel_threshold, min_area, space, rule
        self.catalogue_weight, self.n_types, self.gradcam = catalogue_weight, n_types, gradcam
        self.object_name, self.weighting, self.top_k, self.batch_size = object_name, weighting, top_k, batch_size
        self.abstain, self.abstain_gain = abstain, abstain_gain

    # -- fit ------------------------------------------------------------------------------------------------
    def fit(self, references: Sequence[ImageLike] | None = None,
            normal_images: Sequence[ImageLike] | None = None) -> "Explainer":
        """Prepare type embeddings, catalogue banks, the reference memory and the pixel threshold.

        references: the detector's normal references (for the nearest normal patch, the feature statistics and
        the normal patches of the "patches" rule); normal_images: normal images for the pixel threshold (default:
        the references).
        """
        det = self.detector
        self.shared_ = isinstance(det, ImageTextSpace)
        refs = load_batch(references)[0] if references is not None else []
        self.space_ = self._resolve_space(bool(refs))
        self.features_ = FeatureSpace(det) if self.space_ == "features" else None
        if self.features_ is not None:
            self._standardise(refs)
        self.types_ = self._resolve_types()
        self.text_ = self._text_embeddings() if self.shared_ and self.types_ else None
        self.memory_ = self._reference_memory(refs) if refs else None
        self.reference_shapes_ = [r.shape[:2] for r in refs]
        self.parts_ = self._catalogue_parts()
        self.examples_, self.banks_, self.normal_bank_ = self._assemble()
        self.pixel_threshold_, self.pixel_threshold_source_ = self._resolve_pixel_threshold(normal_images or references)
        self.confidence_threshold_ = None  # the leave-one-out explains without abstaining
        self.calibration_ = self._leave_one_out() if (self.abstain and self.catalogue is not None) else []
        self.confidence_threshold_ = confidence_threshold(self.calibration_, len(self.types_), self.abstain_gain)
        return self

    def _resolve_space(self, has_references: bool) -> str:
        if self.space == "shared" and not self.shared_:
            raise TypeError(f"{_name(self.detector)}: has no shared image-text space (embed_patches/embed_texts)")
        if self.space != "auto":
            return self.space
        has_features = isinstance(self.detector, PatchFeatures)
        if self.shared_ and (self.catalogue is None or not has_features):
            return "shared"
        # Features serve only the catalogue and the nearest normal patch: without either, a second forward per
        # batch would compute descriptors nothing reads (the explanation is the same without them).
        return "features" if has_features and (self.catalogue is not None or has_references) else "none"

    def _visual(self, arrays: list[np.ndarray]) -> torch.Tensor | None:
        """(B, D, h, w) patch descriptors in the catalogue space."""
        if self.space_ == "shared":
            return self.detector.embed_patches(arrays)
        if self.space_ == "features":
            return self.features_(arrays)
        return None

    def _standardise(self, refs: list[np.ndarray]) -> None:
        parts = []
        if refs:
            for _, chunk in _batches(refs, self.batch_size):
                f = self.features_(chunk)
                parts.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
        elif self.catalogue is not None:
            for e in self.catalogue.examples:
                f = self.features_([e.image])[0]  # (C, h, w)
                parts.append(f.permute(1, 2, 0)[cell_weights(e.mask, f.shape[-2:]) == 0])
        if parts:
            self.features_.standardise(torch.cat(parts))

    def _resolve_types(self) -> list[str]:
        names = list(self.defect_types or [])
        if self.catalogue is not None:
            names += [t for t in self.catalogue.defect_types if t not in names]
        if not names and self.shared_:
            names = list(dict.fromkeys(k for k, _ in self.detector.trained_descriptions() if k != "normal"))
        return [n for n in names if n != "good"]

    def _object(self) -> str:
        if self.object_name:
            return self.object_name
        category = getattr(getattr(self.detector, "config", None), "category", None)
        if not category:
            return "object"
        from clad.ops.prompts import object_name_for

        return object_name_for(category)

    def _text_embeddings(self) -> torch.Tensor:
        """(T, D): per type, the normalised mean of its descriptions' embeddings."""
        prompts = self.detector.trained_descriptions()
        rows = []
        for t in self.types_:
            texts = defect_descriptions(t, self._object(), prompts)
            emb = F.normalize(torch.as_tensor(self.detector.embed_texts(texts)).float(), dim=-1)  # (n, D)
            rows.append(F.normalize(emb.mean(0), dim=0))
        return torch.stack(rows)

    def _catalogue_parts(self) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per catalogue example (in ``catalogue.examples`` order): its type, its descriptor (D,), its defect
        patches (m, D) and its normal patches (N, D), all normalised.

        A defect patch is a grid cell at least 30 % covered by its example's mask (the most covered cell when
        none is); normal patches are the example's cells the mask does not touch.
        """
        if self.catalogue is None or self.space_ == "none":
            return []
        parts = []
        for e in self.catalogue.examples:
            grid = self._visual([e.image])[0]  # (D, h, w)
            w = cell_weights(e.mask, grid.shape[-2:])
            flat = F.normalize(grid.permute(1, 2, 0), dim=-1)  # (h, w, D)
            parts.append((e.defect_type, F.normalize(pooled(grid, w), dim=0), flat[w >= min(0.3, float(w.max()))], flat[w == 0]))
        return parts

    def _assemble(self, leave_out: frozenset = frozenset()):
        """Per type: example descriptors (n, D) and defect patches (m, D); normal patches (N, D): the examples'
        unmasked cells plus the references' patches. ``leave_out``: example indices to leave out of all three."""
        if not self.parts_:
            return {}, {}, None
        rows, cells, normal = {}, {}, []
        for i, (t, row, defect, clean) in enumerate(self.parts_):
            if i in leave_out:
                continue
            rows.setdefault(t, []).append(row)
            cells.setdefault(t, []).append(defect)
            normal.append(clean)
        if self.memory_ is not None:
            normal.append(self.memory_[0])
        return ({t: torch.stack(r) for t, r in rows.items()}, {t: torch.cat(c) for t, c in cells.items()},
                torch.cat(normal))

    def _leave_one_out(self) -> list[tuple[float, bool]]:
        """(confidence, named right) of each catalogue example explained as a flagged image (its map from the
        detector, its regions, its ranking) by the catalogue less one example of every type: in round j the j-th
        example of each type is left out, so every type keeps as many examples (leaving out one example alone
        would make its type the only one with fewer examples, and rank it lower); only types with another
        example take part, so that theirs can be named at all."""
        examples = self.catalogue.examples
        position, seen = {}, {}
        for i, e in enumerate(examples):
            position[i] = seen.get(e.defect_type, 0)
            seen[e.defect_type] = position[i] + 1
        keep = [i for i, e in enumerate(examples) if seen[e.defect_type] > 1]
        if not keep or not (self.parts_ or self.text_ is not None):
            return []
        images = [examples[i].image for i in keep]
        maps = self._maps(images)
        pix = self.pixel_threshold_
        if pix is None:
            pix = float(np.percentile(np.concatenate([m.ravel() for m in maps]), NORMAL_QUANTILE))
        out = []
        full = self.examples_, self.banks_, self.normal_bank_
        self.calibration_explanations_ = []  # (explanation, true type), for studies of the rule
        try:
            for i, amap in zip(keep, maps):
                held = frozenset(k for k in keep if position[k] == position[i])  # this round's left-out examples
                self.examples_, self.banks_, self.normal_bank_ = self._assemble(leave_out=held)
                shared = self.detector.embed_patches([examples[i].image])[0] if self.text_ is not None else None
                visual = shared if (self.space_ == "shared" and shared is not None) else self._visual([examples[i].image])
                visual = visual[0] if visual is not None and visual.dim() == 4 else visual
                e = self._explain_one(amap, float(amap.max()), None, pix, "", shared, visual, "")
                if e.type_confidence is not None:
                    out.append((e.type_confidence, e.ranking[0].name == examples[i].defect_type))
                    self.calibration_explanations_.append((e, examples[i].defect_type))
        finally:
            self.examples_, self.banks_, self.normal_bank_ = full
        return out

    def _reference_memory(self, refs: list[np.ndarray]):
        """(N, D) normalised reference patch descriptors, with (image index, row, column, h, w) per row."""
        parts, where = [], []
        for start, chunk in _batches(refs, self.batch_size):
            grid = self._visual(chunk)
            if grid is None:
                return None
            b, d, h, w = grid.shape
            parts.append(F.normalize(grid.permute(0, 2, 3, 1).reshape(-1, d), dim=-1))
            idx = np.stack(np.meshgrid(np.arange(b) + start, np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 3)
            where.append(np.concatenate([idx, np.tile([h, w], (len(idx), 1))], 1))
        return torch.cat(parts), np.concatenate(where)

    def _maps(self, images) -> list[np.ndarray]:
        if self.gradcam:
            return gradcam_maps(self.detector, images, self.batch_size)
        return self.detector.predict(list(images), batch_size=self.batch_size).anomaly_maps

    def _resolve_pixel_threshold(self, normal_images) -> tuple[float | None, str]:
        if self.pixel_threshold is not None:
            return float(self.pixel_threshold), "argument"
        if normal_images is not None and len(normal_images):
            values = np.concatenate([m.ravel() for m in self._maps(normal_images)])
            return float(np.percentile(values, NORMAL_QUANTILE)), "normal images"
        if getattr(self.detector, "threshold_", None) is not None and getattr(self.detector, "score_is_map_max", False):
            return float(self.detector.threshold_), "detector"
        return None, "batch"

    # -- explain --------------------------------------------------------------------------------------------
    def margins(self, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        """The "patches" rule's per-patch evidence: type -> (h, w) margin between the patch's largest cosine to the
        type's defect patches and its largest cosine to the normal patches, for a (D, h, w) grid."""
        cells = F.normalize(visual.permute(1, 2, 0).reshape(-1, visual.shape[0]), dim=-1)  # (h*w, D)
        nb = self.normal_bank_
        base = (cells @ nb.T).max(1).values if len(nb) else torch.zeros(len(cells))  # masks may cover whole examples
        return {t: ((cells @ bank.T).max(1).values - base).view(visual.shape[1:]) for t, bank in self.banks_.items()}

    def _catalogue_similarity(self, t: str, visual: torch.Tensor, weights: torch.Tensor, margins=None) -> float:
        """Similarity of a part of an image (its (D, h, w) grid and (h, w) weights) to type t's examples."""
        if self.rule == "patches":
            margin = (margins if margins is not None else self.margins(visual))[t][weights > 0]
            return float(margin.topk(min(self.top_k, len(margin))).values.mean())
        v = pooled(visual, weights)
        ex = self.examples_[t]
        if self.rule == "prototype":
            return float(_cos(v, F.normalize(ex.mean(0, keepdim=True), dim=-1))[0])
        return float(_cos(v, ex).max())

    def rank(self, shared: torch.Tensor | None, visual: torch.Tensor | None, inside: np.ndarray | None = None,
             margins: dict | None = None) -> list[TypeScore]:
        """Types ranked for the part ``inside`` ((H, W) weights or mask; None: the whole image) of one image, from
        its patch grids ``shared`` (shared space) and ``visual`` (catalogue space), each (D, h, w) or None;
        ``margins``: ``self.margins(visual)`` when already computed."""
        return self._scores(shared, visual, inside, margins)[: self.n_types]

    def _scores(self, shared, visual, inside, margins) -> list[TypeScore]:
        """``rank`` with every type (the confidence reads the types past ``n_types`` too)."""
        if not self.types_:
            return []

        def weights(grid):
            return torch.ones(grid.shape[-2:]) if inside is None else cell_weights(inside, grid.shape[-2:])

        text = None
        if self.text_ is not None and shared is not None:
            text = _cos(pooled(shared, weights(shared)), self.text_)  # (T,)
        w = self.catalogue_weight
        scores = []
        for i, t in enumerate(self.types_):
            cat = None
            if visual is not None and t in self.banks_:
                cat = self._catalogue_similarity(t, visual, weights(visual), margins)
            if text is None and cat is None:
                continue
            s = float(text[i]) if cat is None else cat if (text is None or w == 1.0) else (1 - w) * float(text[i]) + w * cat
            scores.append((s, i, t))
        scores.sort(key=lambda x: (-x[0], x[1]))
        return [TypeScore(t, defect_phrase(t), float(s)) for s, _, t in scores]

    def _nearest_normal(self, visual: torch.Tensor, inside: np.ndarray) -> NormalMatch | None:
        if self.memory_ is None:
            return None
        bank, where = self.memory_
        sims = bank @ F.normalize(pooled(visual, cell_weights(inside, visual.shape[-2:])), dim=0)
        k = int(sims.argmax())
        ref, i, j, h, w = (int(v) for v in where[k])
        rh, rw = self.reference_shapes_[ref]
        box = (math.floor(j * rw / w), math.floor(i * rh / h), math.ceil((j + 1) * rw / w), math.ceil((i + 1) * rh / h))
        return NormalMatch(ref, box, float(sims[k]))

    def explain(self, images: Sequence[ImageLike], result: AnomalyResult | None = None,
                paths: Sequence[str] | None = None) -> list[Explanation]:
        """One ``Explanation`` per image of ``result`` (predicted here when None; Grad-CAM when ``gradcam``)."""
        if not hasattr(self, "space_"):
            raise RuntimeError("Explainer: call fit() before explain()")
        arrays, _ = load_batch(images)
        if result is None:
            result = self.detector.predict(arrays, batch_size=self.batch_size)
            if self.gradcam:
                result.anomaly_maps = gradcam_maps(self.detector, arrays, self.batch_size)
        if len(result) != len(arrays):
            raise ValueError(f"{len(arrays)} images but the result has {len(result)}")
        threshold = result.threshold if result.threshold is not None else getattr(self.detector, "threshold_", None)
        pix, source = self.pixel_threshold_, self.pixel_threshold_source_
        if pix is None:
            pix = float(np.percentile(np.concatenate([m.ravel() for m in result.anomaly_maps]), NORMAL_QUANTILE))
        out = []
        for start, chunk in _batches(arrays, self.batch_size):
            shared = self.detector.embed_patches(chunk) if self.text_ is not None else None
            visual = shared if (self.space_ == "shared" and shared is not None) else self._visual(chunk)
            for k in range(len(chunk)):
                i = start + k
                out.append(self._explain_one(
                    result.anomaly_maps[i], float(result.scores[i]), threshold, pix, source,
                    None if shared is None else shared[k], None if visual is None else visual[k],
                    paths[i] if paths is not None else "",
                ))
        return out

    def _explain_one(self, amap, score, threshold, pix, source, shared, visual, path) -> Explanation:
        margins = self.margins(visual) if (self.rule == "patches" and visual is not None and self.banks_) else None
        anomalous = None if threshold is None else bool(score > threshold)
        components = extract_regions(amap, pix, self.min_area)
        peak_only = not components and anomalous is not False
        if peak_only:  # a flagged image always shows where it is most anomalous
            components = [peak_component(amap)]
        regions, rankings = [], []  # rankings: each region's, with every type
        for c in components:
            inside = c.mask if (self.weighting == "area" or peak_only) else c.mask * (amap - pix).clip(0)
            ranked = self._scores(shared, visual, inside, margins)
            rankings.append(ranked)
            regions.append(Region(
                bbox=tuple(int(b) for b in c.bbox), area_percent=100.0 * c.area,
                location=location_words(c.bbox, amap.shape), peak=c.peak, types=ranked[: self.n_types],
                nearest_normal=None if visual is None else self._nearest_normal(visual, inside), peak_only=peak_only,
            ))
        whole = self._scores(shared, visual, None, margins)
        e = Explanation(
            score=score, threshold=None if threshold is None else float(threshold), anomalous=anomalous,
            pixel_threshold=pix, pixel_threshold_source=source, image_size=tuple(int(v) for v in amap.shape),
            regions=regions, image_types=whole[: self.n_types], path=path,
        )
        e.type_confidence = type_confidence(rankings[0] if rankings else whole, whole)  # highest peak first
        if e.type_confidence is not None:
            e.confidence_threshold = getattr(self, "confidence_threshold_", None)
            e.type_uncertain = e.confidence_threshold is not None and e.type_confidence < e.confidence_threshold
        return e


def explain(detector, images: Sequence[ImageLike], result: AnomalyResult | None = None,
            pixel_threshold: float | None = None, catalogue: Catalogue | None = None,
            defect_types: Sequence[str] | None = None, references: Sequence[ImageLike] | None = None,
            **options) -> list[Explanation]:
    """Explain each image of ``result`` (predicted here when None): see ``Explainer`` for the rules and options.

    references: the detector's normal references; they give the nearest normal patch of each region and, without a
    ``pixel_threshold`` or a detector threshold, the pixel threshold (99.5th percentile of their maps).
    """
    ex = Explainer(detector, catalogue=catalogue, defect_types=defect_types, pixel_threshold=pixel_threshold, **options)
    return ex.fit(references=references).explain(images, result)


def type_confidence(named_from: Sequence[TypeScore], whole_image: Sequence[TypeScore]) -> float | None:
    """How surely a ranking names its first type (step 5 of the module docstring): that type's lead over the best
    other type in ``named_from`` (the strongest region's ranking) and in ``whole_image`` (the whole image's), the
    smaller of the two. Negative when the whole image ranks another type first. None when ``named_from`` has
    fewer than two types; the region's margin alone when the whole image has no score for the named type or none
    for another.

    Both rankings come with every type: a lead measured on a truncated ranking would be too large.
    """
    if len(named_from) < 2:
        return None
    named = named_from[0].name
    lead = named_from[0].similarity - named_from[1].similarity
    own = [t.similarity for t in whole_image if t.name == named]
    others = [t.similarity for t in whole_image if t.name != named]
    if own and others:
        lead = min(lead, own[0] - max(others))
    return float(lead)


def confidence_threshold(pairs: Sequence[tuple[float, bool]], n_types: int, gain: float = ABSTAIN_GAIN) -> float | None:
    """The confidence below which a type ranking abstains, from (confidence, named right) pairs of labelled
    examples (the catalogue's leave-one-out, ``Explainer._leave_one_out``).

    Sort the pairs by confidence, highest first; the accuracy of the first k, with one pseudo-example at chance
    (``(hits + chance) / (k + 1)``, chance = 1 / n_types, so a few lucky examples do not count as proof), is
    compared with chance + ``gain``; k* is the largest k that reaches it (0 when none does). The threshold lies
    half-way between the k*-th and the next confidence; None (never abstain) when every pair is kept or there are
    fewer than two pairs or types; at the highest confidence when none is kept (answer only above it).
    """
    if len(pairs) < 2 or n_types < 2:
        return None
    chance = 1.0 / n_types
    ordered = sorted(pairs, key=lambda p: -p[0])
    best, hits = 0, 0
    for k, (_, right) in enumerate(ordered, start=1):
        hits += bool(right)
        if (hits + chance) / (k + 1) >= chance + gain:
            best = k
    if best == len(ordered):
        return None
    if best == 0:
        return math.nextafter(float(ordered[0][0]), math.inf)
    return 0.5 * (ordered[best - 1][0] + ordered[best][0])
