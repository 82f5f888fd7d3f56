"""Defect type names (dataset folder names) -> the words an explanation uses and the descriptions it embeds.

``defect_phrase("broken_large")`` -> "a large break": the phrase a sentence prints (``clad.vocabulary``). Names
the vocabulary does not hold fall back to their plain reading ("some_new_type" -> "some new type").

``defect_descriptions(name, object_name, detector_prompts)`` -> the description ensemble whose mean embedding is
the type's text embedding:
- "a photo of a {object} with {phrase}." and "a close-up photo of a {object} with {phrase}.";
- "a photo of a {object with the defect}." where the vocabulary words it otherwise ("uneven" -> "magnetic tile
  with an uneven surface", "broken_large" -> "broken bottle");
- the detector's own training descriptions of the synthetic kind that imitates the type
  (``clad.vocabulary.imitating_kind``; CLAD was trained to pull those kinds' patches towards exactly these
  sentences), when the detector has that kind.
"""
from __future__ import annotations

from typing import Sequence

from clad.vocabulary import DEFECT_TYPES, defect_phrase, describe, imitating_kind

DEFECT_PHRASES = {name: t.phrase for name, t in DEFECT_TYPES.items()}
TEMPLATES = ("a photo of a {} with {}.", "a close-up photo of a {} with {}.")

__all__ = ["DEFECT_PHRASES", "TEMPLATES", "defect_descriptions", "defect_phrase"]


def defect_descriptions(name: str, object_name: str, detector_prompts: Sequence[tuple[str, str]] = ()) -> list[str]:
    """The descriptions whose mean embedding stands for defect type ``name`` (rules in the module docstring).

    detector_prompts: the detector's (kind, description) training pairs (``ImageTextSpace.trained_descriptions``),
    or empty.
    """
    out = [t.format(object_name, defect_phrase(name)) for t in TEMPLATES]
    out.append(f"a photo of a {describe(name, object_name)}.")  # the same as the first unless worded otherwise
    kind = imitating_kind(name)
    out += [p for k, p in detector_prompts if kind is not None and k == kind]
    return list(dict.fromkeys(out))  # unique, in order
