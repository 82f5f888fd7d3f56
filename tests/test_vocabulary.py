"""One vocabulary of defect kinds: synthesis, CLAD's descriptions, the auxiliary-name mapping and explanation
phrases all use the same kind names."""
from __future__ import annotations

import pytest

from clad import synthesis
from clad.detectors.clad.config import CLADConfig
from clad.detectors.clad.model import training_descriptions
from clad.explain.phrases import defect_descriptions
from clad.vocabulary import (
    DEFECT_TYPES,
    FALLBACK_KIND,
    KIND_WORDS,
    SYNTHETIC_KINDS,
    aux_kind,
    defect_phrase,
    describe,
    imitating_kind,
)


def test_every_kind_named_anywhere_is_a_synthetic_kind():
    assert tuple(synthesis.MAKERS) == SYNTHETIC_KINDS == synthesis.KINDS
    assert {t.kind for t in DEFECT_TYPES.values()} - {None} <= set(SYNTHETIC_KINDS)
    assert {kind for _, kind in KIND_WORDS} | {FALLBACK_KIND} <= set(SYNTHETIC_KINDS)
    assert all(k in DEFECT_TYPES for k in SYNTHETIC_KINDS)  # each synthetic kind has a phrase too
    classes, prompts = training_descriptions(CLADConfig(category="metal_nut"))
    assert classes == ["normal", *SYNTHETIC_KINDS] and ("crack", "a photo of a metal nut with a crack.") in prompts


def test_words_and_descriptions():
    assert defect_phrase("broken_large") == "a large break" and defect_phrase("Broken Large") == "a large break"
    assert defect_phrase("some_new_type") == "some new type"
    assert describe("scratch", "cable") == "cable with a scratch"
    assert describe("deformation", "cable") == "deformed cable" and describe("broken_small", "bottle") == "broken bottle"
    assert describe("some_new_type", "cable") == "cable with some new type"
    assert imitating_kind("blowhole") == "hole" and imitating_kind("cable_swap") is None
    d = defect_descriptions("broken_large", "bottle", [("missing_part", "trained"), ("hole", "other")])
    assert d == ["a photo of a bottle with a large break.", "a close-up photo of a bottle with a large break.",
                 "a photo of a broken bottle.", "trained"]


@pytest.mark.parametrize("name, kind", [("broken_large", "missing_part"), ("contamination", "stain"),
                                        ("blowhole", "hole"), ("fray", "crack"), ("uneven", "texture"),
                                        ("something_else", "texture"), ("cut_inner_insulation", "missing_part")])
def test_aux_kind_reads_words(name, kind):
    assert aux_kind(name, ["normal", *SYNTHETIC_KINDS]) == kind


def test_aux_mapping_and_explanations_differ_only_where_listed():
    """The auxiliary mapping reads words and the explanations read the table; changing either moves measured
    figures (benchmarks/README.md: aux runs, type naming), so their differences are listed here."""
    classes = ["normal", *SYNTHETIC_KINDS]
    differ = {n: (aux_kind(n, classes), t.kind) for n, t in DEFECT_TYPES.items()
              if t.kind is not None and aux_kind(n, classes) != t.kind}
    assert differ == {"break": ("crack", "missing_part"), "cut": ("missing_part", "scratch"),
                      "fray": ("crack", "texture"), "cut_paste": ("missing_part", "cut_paste")}
