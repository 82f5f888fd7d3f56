"""CLAD's networks: the encoders f_v and f_t, the heads g_v and g_t into the shared space, the decoders of Eq. 7,
and the descriptions the text side embeds."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from clad.detectors.clad.config import CLADConfig
from clad.ops.features import aggregate
from clad.ops.prompts import object_name_for
from clad.registry import create_backbone
from clad.vocabulary import KIND_DESCRIPTIONS, NORMAL_DESCRIPTIONS, SYNTHETIC_KINDS


class Heads(nn.Module):
    """Projection heads into the shared space and the inverse maps of Eq. 7; the visual side standardises its
    input by ``feat_mean`` / ``feat_std`` (set from the training views)."""

    def __init__(self, c_vis: int, c_txt: int, d: int, hidden: int):
        super().__init__()
        self.g_v = nn.Sequential(nn.Conv2d(c_vis, hidden, 1), nn.GELU(), nn.Conv2d(hidden, d, 1))
        self.g_t = nn.Sequential(nn.Linear(c_txt, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.dec_v = nn.Sequential(nn.Conv2d(d, hidden, 1), nn.GELU(), nn.Conv2d(hidden, c_vis, 1))
        self.dec_t = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, c_txt))
        self.register_buffer("feat_mean", torch.zeros(1, c_vis, 1, 1))
        self.register_buffer("feat_std", torch.ones(1, c_vis, 1, 1))


def language_score(z: torch.Tensor, classes: torch.Tensor, sigma: torch.Tensor, rule: str) -> torch.Tensor:
    """The language half's anomaly score of embeddings z (B, D, ...) against the class embeddings (C, D), normal
    first, with Eq. 4's kernel exp(-||z - t||^2 / sigma): (B, ...) in [0, 1].

    "contrast": 1 - the normal class's share of the kernel over all classes (a softmax over the descriptions), so a
    patch scores high only when it is nearer a defect description than the normal one. "normal": 1 - S against the
    normal description alone (Eq. 4 as the paper writes it), which ignores the defect descriptions it trained with.
    """
    if rule == "normal":
        d2 = ((z - classes[0].view(1, -1, *([1] * (z.dim() - 2)))) ** 2).sum(1)
        return 1 - torch.exp(-d2 / sigma)
    # -||z - t||^2 / sigma = (2 z.t - 2) / sigma for unit vectors; the constant cancels in the softmax
    logits = torch.einsum("bd...,cd->bc...", z, classes) * (2 / sigma)  # (B, C, ...)
    # 1 - softmax at the normal class = sigmoid(logsumexp(defect logits) - normal logit): exact in the tails
    return torch.sigmoid(torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0])


def training_descriptions(cfg: CLADConfig) -> tuple[list[str], list[tuple[str, str]]]:
    """The classes ("normal", then the synthetic kinds) and their (class, description) pairs for ``cfg``'s object:
    ``clad.vocabulary``'s descriptions, replaced class by class by ``cfg.descriptions``."""
    name = cfg.object_name or (object_name_for(cfg.category) if cfg.category else "object")
    table = {"normal": NORMAL_DESCRIPTIONS, **KIND_DESCRIPTIONS, **(cfg.descriptions or {})}
    classes = ["normal"] + [k for k in SYNTHETIC_KINDS if k in table]
    return classes, [(c, t.format(name)) for c in classes for t in table[c]]


class CLADModel:
    """f_v: a frozen backbone, and (``finetune_stages`` = 1) a trainable copy of its stage ``layers[1]`` (``tail``);
    f_t: a text encoder whose last ``finetune_text_layers`` layers train (``text_trainable``); ``heads``.

    Patch features are both stages' maps, 3x3-aggregated on the ``layers[0]`` grid (``combine``).
    """

    def __init__(self, cfg: CLADConfig):
        from clad.backbones.text import create_text_encoder

        self.layers = cfg.layers
        self.backbone = create_backbone(cfg.backbone)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        first, last = cfg.layers
        tunable = cfg.finetune_stages and hasattr(self.backbone, "run_stage")
        self.tail = nn.ModuleList(copy.deepcopy(self.backbone.blocks_of_stage(last))) if tunable else None
        text_spec = cfg.text_encoder
        if text_spec == "auto":  # the CLIP text tower beside a CLIP image tower, else MiniLM
            text_spec = cfg.backbone if cfg.backbone.startswith("clip:") else "minilm"
        self.text = create_text_encoder(text_spec)
        for p in self.text.parameters():
            p.requires_grad_(False)
        self.text_trainable = [p for m in self.text.layers_for_finetuning(cfg.finetune_text_layers) for p in m.parameters()]
        c_vis = self.backbone.info(first).channels + self.backbone.info(last).channels
        self.heads = Heads(c_vis, self.text.dim, cfg.embed_dim, cfg.hidden)
        self.classes, self.prompts = training_descriptions(cfg)

    def stage_features(self, x: torch.Tensor, tuned: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> (first-stage map, last-stage map); the last uses the fine-tuned copy when ``tuned``."""
        first, last = self.layers
        if not hasattr(self.backbone, "run_stage"):  # e.g. a CLIP ViT: frozen, both maps from one pass
            with torch.no_grad():
                f = self.backbone(x, [first, last])
            return f[first], f[last]
        with torch.no_grad():
            h1 = self.backbone(x, [first])[first]
        blocks = self.tail if tuned else None
        if blocks is None:
            with torch.no_grad():
                return h1, self.backbone.run_stage(last, h1)
        return h1, self.backbone.run_stage(last, h1, blocks)

    @torch.no_grad()
    def frozen_last(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        """The frozen last-stage map (the memory's features) from the first-stage map ``h1`` already computed;
        ``h2`` is the last-stage map of ``stage_features``, the frozen one when nothing was fine-tuned."""
        return h2 if self.tail is None else self.backbone.run_stage(self.layers[1], h1)

    @staticmethod
    def combine(h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        """3x3 aggregation of both maps, the deeper one upsampled to the first grid: (B, C1 + C2, h, w)."""
        return aggregate({"first": h1, "last": h2}, ("first", "last"), 3)

    def project(self, feat: torch.Tensor) -> torch.Tensor:
        """g_v: patch features (B, C, h, w) -> (B, D, h, w) L2-normalised embeddings."""
        h = self.heads
        return F.normalize(h.g_v((feat - h.feat_mean) / h.feat_std), dim=1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """g_t(f_t(texts)): (N, D) L2-normalised."""
        return F.normalize(self.heads.g_t(self.text(self.text.tokenize(list(texts)))), dim=-1)

    def class_embeddings(self, train: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-prompt projected embeddings (P, D) and per-class embeddings (C, D), both L2-normalised."""
        tokens = self.text.tokenize([p for _, p in self.prompts])
        with torch.set_grad_enabled(train):
            raw = self.text(tokens)  # (P, Dt)
            per_prompt = F.normalize(self.heads.g_t(raw), dim=-1)
            owner = torch.tensor([self.classes.index(c) for c, _ in self.prompts])
            sums = torch.zeros(len(self.classes), per_prompt.shape[1]).index_add_(0, owner, per_prompt)
            return per_prompt, F.normalize(sums, dim=-1)

    def train(self, mode: bool = True) -> None:
        """Training mode for the heads and the fine-tuned stage (the frozen parts keep theirs)."""
        self.heads.train(mode)
        if self.tail is not None:
            self.tail.train(mode)
