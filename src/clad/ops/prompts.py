"""Prompt ensembles: WinCLIP's compositional prompts (Jeong et al., CVPR 2023, supplementary), and object names.

A prompt is a template filled with a state word filled with the object name, e.g.
"a cropped photo of the {}." <- "flawless {}" <- "metal nut". A class prototype is the mean of its prompts'
normalised embeddings, normalised again. Defect words live in ``clad.vocabulary``.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
TEMPLATES = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)

# MVTec AD and VisA category folder names whose plain reading is not the object's name.
OBJECT_NAMES = {
    "metal_nut": "metal nut",
    "magnetic_tile": "magnetic tile",
    "chewinggum": "chewing gum",
    "pipe_fryum": "pipe fryum",
    "pcb1": "printed circuit board",
    "pcb2": "printed circuit board",
    "pcb3": "printed circuit board",
    "pcb4": "printed circuit board",
    "macaroni1": "macaroni",
    "macaroni2": "macaroni",
}

def object_name_for(category: str) -> str:
    """Dataset category folder -> the noun used in prompts ("metal_nut" -> "metal nut", "pcb1" -> "printed ...")."""
    key = category.strip().lower()
    if key in OBJECT_NAMES:
        return OBJECT_NAMES[key]
    return re.sub(r"\d+$", "", key).replace("_", " ").strip() or key


def state_prompts(object_name: str) -> tuple[list[str], list[str]]:
    """All template x state prompts: (normal (7 * 22), anomalous (5 * 22))."""

    def fill(states: Sequence[str]) -> list[str]:
        return [t.format(s.format(object_name)) for s in states for t in TEMPLATES]

    return fill(NORMAL_STATES), fill(ANOMALOUS_STATES)


def prompt_ensemble(encode_fn: Callable[[list[str]], torch.Tensor], object_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """WinCLIP's two class prototypes. ``encode_fn``: N strings -> (N, D). Returns (normal (D,), anomalous (D,))."""
    normal, anomalous = state_prompts(object_name)
    emb = F.normalize(encode_fn(normal + anomalous).float(), dim=-1)  # (Pn + Pa, D)
    means = emb[: len(normal)].mean(0), emb[len(normal) :].mean(0)
    return F.normalize(means[0], dim=0), F.normalize(means[1], dim=0)
