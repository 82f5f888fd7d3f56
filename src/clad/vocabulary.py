"""The one vocabulary of defect kinds: what synthesis draws, what CLAD trains with, what auxiliary defects and
dataset folder names map to, and the words an explanation prints. Pure data and small lookups (no torch).

- ``SYNTHETIC_KINDS``: the kinds ``clad.synthesis`` draws and CLAD learns, each with its training descriptions
  (``KIND_DESCRIPTIONS``; ``NORMAL_DESCRIPTIONS`` for defect-free patches), "{}" standing for the object name.
- ``DEFECT_TYPES``: defect-type names (MVTec AD, VisA and magnetic tile folders, and the synthetic kinds) ->
  ``DefectType``: the phrase a sentence prints, the wording of an object with that defect, and the synthetic kind
  that imitates it. ``defect_phrase``, ``describe`` and ``imitating_kind`` read it, with a plain reading for names
  it does not hold.
- ``KIND_WORDS``: words in any defect-type name -> the synthetic kind an auxiliary defect of that name trains with
  (``aux_kind``). It reads names by their words, so it also covers folders no table lists; for a few names
  ("cut", "fray", "break") it picks another kind than ``imitating_kind``: tests/test_vocabulary.py lists them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

NORMAL_DESCRIPTIONS = (
    "a photo of a flawless {}.",
    "a photo of a perfect {}.",
    "a photo of an unblemished {}.",
    "a photo of a {} without defect.",
    "a photo of a {} without damage.",
    "a close-up photo of a normal {}.",
)
# synthetic kind -> the descriptions CLAD trains its anomalies with
KIND_DESCRIPTIONS = {
    "scratch": ("a photo of a {} with a scratch.", "a photo of a scratched {}."),
    "crack": ("a photo of a {} with a crack.", "a photo of a cracked {}."),
    "hole": ("a photo of a {} with a hole.", "a photo of a {} with a small pit."),
    "stain": ("a photo of a {} with a colour stain.", "a photo of a {} with contamination."),
    "cut_paste": ("a photo of a {} with a misplaced piece.", "a photo of a {} with a foreign fragment."),
    "texture": ("a photo of a {} with an irregular texture.", "a photo of a {} with an uneven surface."),
    "deformation": ("a photo of a deformed {}.", "a photo of a bent {}."),
    "missing_part": ("a photo of a {} with a missing part.", "a photo of a broken {}."),
}
SYNTHETIC_KINDS = tuple(KIND_DESCRIPTIONS)


@dataclass(frozen=True)
class DefectType:
    """phrase: printed in a sentence ("a large break"); kind: the synthetic kind that imitates it, or None;
    description: an object with the defect, "{}" for the object, when not "{} with <phrase>"."""

    phrase: str
    kind: str | None = None
    description: str | None = None


_T = DefectType
DEFECT_TYPES = {
    "bent": _T("a bend", "deformation"),
    "bent_lead": _T("a bent lead"),
    "bent_wire": _T("a bent wire"),
    "blowhole": _T("a blowhole", "hole"),
    "break": _T("a break", "missing_part"),
    "broken": _T("a break", "missing_part", "broken {}"),
    "broken_large": _T("a large break", "missing_part", "broken {}"),
    "broken_small": _T("a small break", "missing_part", "broken {}"),
    "broken_teeth": _T("broken teeth"),
    "burnt": _T("a burn"),
    "cable_swap": _T("swapped cables"),
    "color": _T("a colour defect", "stain", "{} with a colour stain"),
    "colour_stain": _T("a colour stain"),
    "combined": _T("several defects"),
    "contamination": _T("contamination", "stain"),
    "crack": _T("a crack", "crack"),
    "cut": _T("a cut", "scratch"),
    "cut_inner_insulation": _T("a cut in the inner insulation"),
    "cut_lead": _T("a cut lead"),
    "cut_outer_insulation": _T("a cut in the outer insulation"),
    "cut_paste": _T("a misplaced piece", "cut_paste"),
    "damaged_case": _T("a damaged case"),
    "deformation": _T("a deformation", "deformation", "deformed {}"),
    "fabric_border": _T("a fabric border defect"),
    "fabric_interior": _T("a fabric interior defect"),
    "faulty_imprint": _T("a faulty imprint"),
    "flip": _T("a flipped part"),
    "fold": _T("a fold", "deformation"),
    "fray": _T("fraying", "texture", "{} with frayed threads"),
    "glue": _T("glue", "stain"),
    "glue_strip": _T("a glue strip"),
    "gray_stroke": _T("a grey stroke"),
    "hole": _T("a hole", "hole"),
    "liquid": _T("a liquid stain", "stain"),
    "manipulated_front": _T("a manipulated front"),
    "metal_contamination": _T("metal contamination"),
    "misplaced": _T("a misplaced part", "cut_paste"),
    "missing": _T("a missing part", "missing_part"),
    "missing_cable": _T("a missing cable"),
    "missing_part": _T("a missing part", "missing_part"),
    "missing_wire": _T("a missing wire"),
    "oil": _T("an oil stain", "stain"),
    "pill_type": _T("a wrong pill type"),
    "poke": _T("a poke", "hole"),
    "poke_insulation": _T("a poked insulation"),
    "print": _T("a misprint"),
    "rough": _T("a rough surface", "texture"),
    "scratch": _T("a scratch", "scratch"),
    "scratch_head": _T("a scratched head"),
    "scratch_neck": _T("a scratched neck"),
    "split_teeth": _T("split teeth"),
    "squeeze": _T("a squeeze", "deformation"),
    "squeezed_teeth": _T("squeezed teeth"),
    "stain": _T("a stain", "stain", "{} with a colour stain"),
    "texture": _T("an irregular texture", "texture"),
    "thread": _T("a loose thread"),
    "thread_side": _T("a thread on the side"),
    "thread_top": _T("a thread on top"),
    "uneven": _T("an uneven surface", "texture"),
    "uneven_surface": _T("an uneven surface"),
}

# Words in a defect-type name -> the kind an auxiliary defect of that name trains with; the first match wins.
KIND_WORDS = (
    ("scratch", "scratch"), ("crack", "crack"), ("fray", "crack"), ("break", "crack"), ("split", "crack"),
    ("hole", "hole"), ("pit", "hole"), ("poke", "hole"), ("dent", "hole"),
    ("broken", "missing_part"), ("missing", "missing_part"), ("cut", "missing_part"), ("chip", "missing_part"),
    ("contamina", "stain"), ("stain", "stain"), ("colo", "stain"), ("oil", "stain"), ("liquid", "stain"),
    ("glue", "stain"), ("print", "stain"), ("spot", "stain"),
    ("bent", "deformation"), ("deform", "deformation"), ("squeez", "deformation"), ("fold", "deformation"),
    ("flip", "deformation"), ("misplaced", "cut_paste"), ("fabric", "cut_paste"), ("thread", "cut_paste"),
    ("uneven", "texture"), ("rough", "texture"),
)
FALLBACK_KIND = "texture"  # the most generic surface description, for names no word matches


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def defect_phrase(name: str) -> str:
    """The words for a defect type: the table's phrase, else the name with underscores as spaces."""
    entry = DEFECT_TYPES.get(_key(name))
    return entry.phrase if entry else name.strip().replace("_", " ")


def describe(name: str, object_name: str) -> str:
    """An ``object_name`` with defect ``name``: "cable with a scratch", "deformed cable"."""
    entry = DEFECT_TYPES.get(_key(name))
    wording = entry.description if entry and entry.description else "{} with " + defect_phrase(name)
    return wording.format(object_name)


def imitating_kind(name: str) -> str | None:
    """The synthetic kind that imitates defect type ``name``, or None."""
    entry = DEFECT_TYPES.get(_key(name))
    return entry.kind if entry else None


def aux_kind(defect_type: str, classes: Sequence[str]) -> str:
    """The training class of an auxiliary defect named ``defect_type`` among ``classes`` ("broken_large" ->
    "missing_part"): the first ``KIND_WORDS`` match, else ``FALLBACK_KIND``, else the last class."""
    name = defect_type.lower()
    for word, kind in KIND_WORDS:
        if word in name and kind in classes:
            return kind
    return FALLBACK_KIND if FALLBACK_KIND in classes else classes[-1]


def defect_prompts(object_name: str, kinds: Sequence[str],
                   templates: Sequence[str] = ("a photo of a {}.",)) -> dict[str, list[str]]:
    """Descriptions of each defect kind of ``object_name``: {kind: [template(describe(kind)) per template]}.

    Kinds are ``DEFECT_TYPES`` names; spaces may stand for underscores ("missing part"). An unknown kind is a
    ``KeyError`` that names it.
    """
    out = {}
    for kind in kinds:
        if _key(kind) not in DEFECT_TYPES:
            raise KeyError(f"unknown defect kind {kind!r}; known: {', '.join(DEFECT_TYPES)}")
        out[kind] = [t.format(describe(kind, object_name)) for t in templates]
    return out
