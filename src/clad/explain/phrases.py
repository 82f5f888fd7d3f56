"""Defect type names (dataset folder names) -> the words an explanation uses and the descriptions it embeds.

``defect_phrase("broken_large")`` -> "a large break": the phrase a sentence prints. Names not in the table fall
back to their plain reading ("some_new_type" -> "some new type").

``defect_descriptions(name, object_name, detector_prompts)`` -> the description ensemble whose mean embedding is
the type's text embedding:
- "a photo of a {object} with {phrase}." and "a close-up photo of a {object} with {phrase}.";
- the ``clad.ops.prompts.DEFECT_DESCRIPTIONS`` phrase of the type's kind, when it has one ("uneven" ->
  "uneven_surface" -> "magnetic tile with an uneven surface");
- the detector's own training descriptions of the synthetic kind the type resembles (``SYNTHETIC_KINDS``; CLAD
  was trained to pull those kinds' patches towards exactly these sentences), when the detector has that kind.
"""
from __future__ import annotations

from typing import Sequence

from clad.ops.prompts import DEFECT_DESCRIPTIONS

# folder name -> the phrase printed in a sentence (MVTec AD, VisA, magnetic tile and the synthetic kinds)
DEFECT_PHRASES = {
    "bent": "a bend",
    "bent_lead": "a bent lead",
    "bent_wire": "a bent wire",
    "blowhole": "a blowhole",
    "break": "a break",
    "broken": "a break",
    "broken_large": "a large break",
    "broken_small": "a small break",
    "broken_teeth": "broken teeth",
    "burnt": "a burn",
    "cable_swap": "swapped cables",
    "color": "a colour defect",
    "colour_stain": "a colour stain",
    "combined": "several defects",
    "contamination": "contamination",
    "crack": "a crack",
    "cut": "a cut",
    "cut_inner_insulation": "a cut in the inner insulation",
    "cut_lead": "a cut lead",
    "cut_outer_insulation": "a cut in the outer insulation",
    "cut_paste": "a misplaced piece",
    "damaged_case": "a damaged case",
    "deformation": "a deformation",
    "fabric_border": "a fabric border defect",
    "fabric_interior": "a fabric interior defect",
    "faulty_imprint": "a faulty imprint",
    "flip": "a flipped part",
    "fold": "a fold",
    "fray": "fraying",
    "glue": "glue",
    "glue_strip": "a glue strip",
    "gray_stroke": "a grey stroke",
    "hole": "a hole",
    "liquid": "a liquid stain",
    "manipulated_front": "a manipulated front",
    "metal_contamination": "metal contamination",
    "misplaced": "a misplaced part",
    "missing": "a missing part",
    "missing_cable": "a missing cable",
    "missing_part": "a missing part",
    "missing_wire": "a missing wire",
    "oil": "an oil stain",
    "pill_type": "a wrong pill type",
    "poke": "a poke",
    "poke_insulation": "a poked insulation",
    "print": "a misprint",
    "rough": "a rough surface",
    "scratch": "a scratch",
    "scratch_head": "a scratched head",
    "scratch_neck": "a scratched neck",
    "split_teeth": "split teeth",
    "squeeze": "a squeeze",
    "squeezed_teeth": "squeezed teeth",
    "stain": "a stain",
    "texture": "an irregular texture",
    "thread": "a loose thread",
    "thread_side": "a thread on the side",
    "thread_top": "a thread on top",
    "uneven": "an uneven surface",
}

# folder name -> key of clad.ops.prompts.DEFECT_DESCRIPTIONS (where the names differ)
PROMPT_KINDS = {
    "broken_large": "broken",
    "broken_small": "broken",
    "uneven": "uneven_surface",
    "color": "colour_stain",
    "missing": "missing_part",
    "stain": "colour_stain",
}

# folder name -> the synthetic kind (clad.synthesis.KINDS) that imitates it, for CLAD's trained descriptions
SYNTHETIC_KINDS = {
    "blowhole": "hole",
    "hole": "hole",
    "poke": "hole",
    "crack": "crack",
    "fray": "texture",
    "uneven": "texture",
    "rough": "texture",
    "break": "missing_part",
    "broken": "missing_part",
    "broken_large": "missing_part",
    "broken_small": "missing_part",
    "missing": "missing_part",
    "missing_part": "missing_part",
    "contamination": "stain",
    "color": "stain",
    "stain": "stain",
    "oil": "stain",
    "liquid": "stain",
    "glue": "stain",
    "scratch": "scratch",
    "cut": "scratch",
    "bent": "deformation",
    "deformation": "deformation",
    "squeeze": "deformation",
    "fold": "deformation",
    "cut_paste": "cut_paste",
    "misplaced": "cut_paste",
    "texture": "texture",
}

TEMPLATES = ("a photo of a {} with {}.", "a close-up photo of a {} with {}.")


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def defect_phrase(name: str) -> str:
    """The words for a defect type: the table's phrase, else the name with underscores as spaces."""
    return DEFECT_PHRASES.get(_key(name), name.strip().replace("_", " "))


def defect_descriptions(name: str, object_name: str, detector_prompts: Sequence[tuple[str, str]] = ()) -> list[str]:
    """The descriptions whose mean embedding stands for defect type ``name`` (rules in the module docstring).

    detector_prompts: the detector's (kind, description) training pairs (``CLAD.prompts_``), or empty.
    """
    key = _key(name)
    out = [t.format(object_name, defect_phrase(name)) for t in TEMPLATES]
    kind = PROMPT_KINDS.get(key, key)
    if kind in DEFECT_DESCRIPTIONS:
        out.append(f"a photo of a {DEFECT_DESCRIPTIONS[kind].format(object_name)}.")
    synthetic = SYNTHETIC_KINDS.get(key)
    out += [p for k, p in detector_prompts if synthetic is not None and k == synthetic]
    return list(dict.fromkeys(out))  # unique, in order
