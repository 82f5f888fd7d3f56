"""The explanation of one image: a plain structure, and a sentence written from that structure alone.

Sentence rules (``Explanation.sentence``; numbers: scores and thresholds with 3 significant digits, similarities
with 2 decimals, areas as a percentage with 2 significant digits below 10 % and none above):
- "Normal (score S <= T)." when the image's score is at or below the decision threshold;
- otherwise "Anomalous (score S > T)" (or "Score S (no decision threshold)" when none is set), then
  - one region: ": one region, about A% of the image, LOCATION; TYPES.";
  - n regions: ": n regions; the strongest, about A% of the image, LOCATION: TYPES; others LOC, LOC.";
  - none: ": no region above the pixel threshold P" and, when types are known, "; for the whole image, TYPES";
- a region found only around the map's peak (``Region.peak_only``) adds ", the area around the map's peak (nothing
  above the pixel threshold P)" to its place;
- TYPES: "most likely PHRASE (sim), else PHRASE (sim)" from the region's ranking, "type uncertain (closest:
  PHRASE (sim) or PHRASE (sim))" when the ranking abstains (``type_uncertain``), or "type unknown".
Regions are ordered by peak value, so "the strongest" is the first; at most three other locations are named.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def fmt_value(v: float) -> str:
    """Scores and thresholds in sentences."""
    return f"{v:.3g}"


def fmt_similarity(v: float) -> str:
    return f"{v:.2f}".replace("-0.00", "0.00")


def fmt_percent(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"


@dataclass
class TypeScore:
    """A defect type and how similar the region is to it (cosine similarity in the ranking space)."""

    name: str  # the defect type, e.g. the dataset's folder name "broken_large"
    phrase: str  # its words, e.g. "a large break"
    similarity: float


@dataclass
class NormalMatch:
    """The most similar patch of the normal references: what this place looks like when it is fine."""

    reference: int  # index of the reference image
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the patch in that reference's pixels, end-exclusive
    similarity: float


@dataclass
class Region:
    """A connected component of the thresholded anomaly map."""

    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) in image pixels, end-exclusive
    area_percent: float  # share of the image, in percent
    location: str  # e.g. "upper left", "along the right edge"
    peak: float  # largest map value inside
    types: list[TypeScore] = field(default_factory=list)  # most similar first; empty when types are unknown
    nearest_normal: NormalMatch | None = None
    peak_only: bool = False  # nothing passed the pixel threshold: the component around the map's maximum


@dataclass
class Explanation:
    """Why one image got its decision. ``sentence`` is written from these fields only."""

    score: float
    threshold: float | None  # decision threshold on ``score`` (None: no decision)
    anomalous: bool | None
    pixel_threshold: float | None  # the map threshold that cut out the regions
    pixel_threshold_source: str  # "argument", "detector", "normal images" or "batch"
    image_size: tuple[int, int]  # (H, W)
    regions: list[Region] = field(default_factory=list)  # highest peak first
    image_types: list[TypeScore] = field(default_factory=list)  # ranking of the whole image
    path: str = ""
    type_confidence: float | None = None  # the named type's lead, in the region and the whole image (type_confidence)
    confidence_threshold: float | None = None  # below it the type is uncertain (learnt from the catalogue)
    type_uncertain: bool = False  # the ranking abstains: ``named_type`` is None, the ranking stays

    @property
    def ranking(self) -> list[TypeScore]:
        """The ranking the explanation names from: of the strongest region, else of the whole image."""
        return self.regions[0].types if self.regions else self.image_types

    @property
    def named_type(self) -> str | None:
        """The type the explanation names: top type of the strongest region, else of the whole image; None when
        types are unknown or uncertain (``type_uncertain``)."""
        return self.ranking[0].name if (self.ranking and not self.type_uncertain) else None

    def ranked_types(self, whole_image: bool = False) -> list[str]:
        """Type names, most similar first: of the strongest region (else the whole image), or of the whole image."""
        return [t.name for t in (self.image_types if whole_image else self.ranking)]

    @property
    def sentence(self) -> str:
        s = fmt_value(self.score)
        if self.anomalous is False:
            return f"Normal (score {s} <= {fmt_value(self.threshold)})."
        head = f"Anomalous (score {s} > {fmt_value(self.threshold)})" if self.anomalous else f"Score {s} (no decision threshold)"
        n = len(self.regions)
        if n == 0:
            p = "none set" if self.pixel_threshold is None else fmt_value(self.pixel_threshold)
            text = f"{head}: no region above the pixel threshold {p}"
            if self.image_types:
                text += f"; for the whole image, {_types(self.image_types, self.type_uncertain)}"
            return text + "."
        r = self.regions[0]
        where = f"about {fmt_percent(r.area_percent)}% of the image, {r.location}"
        if r.peak_only:
            where += f", the area around the map's peak (nothing above the pixel threshold {fmt_value(self.pixel_threshold)})"
        types = _types(r.types, self.type_uncertain)
        if n == 1:
            return f"{head}: one region, {where}; {types}."
        count = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
        others = ", ".join(o.location for o in self.regions[1:4]) + (", ..." if n > 4 else "")
        return f"{head}: {count} regions; the strongest, {where}: {types}; others {others}."

    def to_dict(self) -> dict:
        """JSON-ready fields plus the sentence."""
        d = dataclasses.asdict(self)
        d["sentence"] = self.sentence
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Explanation":
        """Inverse of ``to_dict`` (the sentence is written again from the fields)."""

        def types(items):
            return [TypeScore(**t) for t in items]

        regions = []
        for r in d.get("regions", []):
            nn = r.get("nearest_normal")
            regions.append(Region(
                bbox=tuple(r["bbox"]), area_percent=r["area_percent"], location=r["location"], peak=r["peak"],
                types=types(r.get("types", [])),
                nearest_normal=None if nn is None else NormalMatch(nn["reference"], tuple(nn["box"]), nn["similarity"]),
                peak_only=bool(r.get("peak_only", False)),
            ))
        return cls(score=d["score"], threshold=d["threshold"], anomalous=d["anomalous"],
                   pixel_threshold=d["pixel_threshold"], pixel_threshold_source=d["pixel_threshold_source"],
                   image_size=tuple(d["image_size"]), regions=regions, image_types=types(d.get("image_types", [])),
                   path=d.get("path", ""), type_confidence=d.get("type_confidence"),
                   confidence_threshold=d.get("confidence_threshold"), type_uncertain=bool(d.get("type_uncertain", False)))


def _types(ranking: list[TypeScore], uncertain: bool = False) -> str:
    if not ranking:
        return "type unknown"
    pair = f"{ranking[0].phrase} ({fmt_similarity(ranking[0].similarity)})"
    if len(ranking) > 1:
        pair += f"{' or' if uncertain else ', else'} {ranking[1].phrase} ({fmt_similarity(ranking[1].similarity)})"
    return f"type uncertain (closest: {pair})" if uncertain else f"most likely {pair}"
