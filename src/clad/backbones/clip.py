"""CLIP (Hugging Face ``transformers.CLIPModel``) behind the feature contract, plus its text tower.

``create_backbone("clip:/path/to/folder")`` loads a saved CLIP (e.g. ``openai/clip-vit-base-patch16``) from a local
folder; ``clip:HUB_ID`` from the Hugging Face cache, else from the hub unless ``HF_HUB_OFFLINE`` is set. The weights are never bundled: the user
supplies them. Besides the contract (``forward(x, layers)`` -> patch-token grids of chosen transformer blocks), the
backbone gives what the language-guided detectors need: projected image, patch, window and text embeddings.
"""
from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from clad.backbones.base import Backbone, FeatureInfo
from clad.errors import ModelNotFoundError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HOW = "pass --backbone clip:/path/to/a/huggingface/clip/folder (e.g. a saved openai/clip-vit-base-patch16)"
# Tokens sent through the image tower in one window pass (sequences x length); bounds the activation memory.
WINDOW_TOKENS_PER_PASS = 32768


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_help(hub_id: str) -> str:
    return (f"on a machine with access run `huggingface-cli download {hub_id} --local-dir DIR`, copy DIR here and "
            f"pass --backbone clip:DIR")


def _from_pretrained(where: str, local_only: bool):
    from transformers import AutoTokenizer, CLIPModel

    return (CLIPModel.from_pretrained(where, local_files_only=local_only),
            AutoTokenizer.from_pretrained(where, local_files_only=local_only))


def _cached_file(hub_id: str, name: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id, name)
    return Path(found) if isinstance(found, str) else None


def _load(source: str):
    """``source``: a folder, or a hub name looked up in the Hugging Face cache, then (unless ``HF_HUB_OFFLINE``)
    on the hub -> (CLIPModel, tokenizer, preprocessing mean/std or None)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        try:
            model, tokenizer = _from_pretrained(str(folder), True)
        except (OSError, ValueError) as e:  # missing or unreadable files
            raise ModelNotFoundError(f"cannot load a CLIP model and tokenizer from {source!r} ({e}); {_HOW}") from e
    elif _HUB_ID.match(source) and not source.startswith((".", "~")):
        try:
            model, tokenizer = _from_pretrained(source, True)  # the Hugging Face cache (HF_HOME / HF_HUB_CACHE)
        except (OSError, ValueError) as cached:
            if _offline():
                raise ModelNotFoundError(f"CLIP model {source!r} is not a folder nor in the Hugging Face cache and "
                                         f"HF_HUB_OFFLINE is set; {_hub_help(source)}") from cached
            try:
                model, tokenizer = _from_pretrained(source, False)
            except Exception as e:  # noqa: BLE001 - no network (any client's error), unknown name, gated model
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ModelNotFoundError(f"CLIP model {source!r} is not a folder, not in the Hugging Face cache, and "
                                         f"the hub did not give it ({reason}); {_hub_help(source)}") from e
    else:
        raise ModelNotFoundError(f"CLIP model folder {source!r} does not exist; {_HOW}")
    norm = None
    pre = folder / "preprocessor_config.json" if folder.is_dir() else _cached_file(source, "preprocessor_config.json")
    if pre is not None and pre.is_file():
        doc = json.loads(pre.read_text())
        if "image_mean" in doc and "image_std" in doc:
            norm = (tuple(doc["image_mean"]), tuple(doc["image_std"]))
    return model, tokenizer, norm


class CLIPBackbone(Backbone):
    """CLIP's image tower as named patch-token grids, and its projected image / patch / window / text embeddings.

    Feature names: ``block1`` .. ``blockL`` (the tokens after that transformer block) and ``last`` (the last
    block's tokens after the final layer norm), all at stride = patch size with channels = hidden size.
    """

    def __init__(self, source: str):
        super().__init__()
        self.spec = f"clip:{source}"
        self.model, self.tokenizer, norm = _load(source)
        self.model.eval()
        self.vision = self.model.vision_model
        vc = self.model.config.vision_config
        self.patch_size = int(vc.patch_size)
        self.default_size = int(vc.image_size)
        self.embed_dim = int(self.model.config.projection_dim)
        self.mean, self.std = norm or (CLIP_MEAN, CLIP_STD)
        n = len(self.vision.encoder.layers)
        self.feature_info = [FeatureInfo(f"block{i + 1}", vc.hidden_size, self.patch_size) for i in range(n)]
        self.feature_info.append(FeatureInfo("last", vc.hidden_size, self.patch_size))
        # transformers 4.x encoder layers take a causal mask too and return a tuple; 5.x take one mask.
        params = inspect.signature(type(self.vision.encoder.layers[0]).forward).parameters
        self._layer_kwargs = {"causal_attention_mask": None} if "causal_attention_mask" in params else {}
        self.max_text_length = int(self.model.config.text_config.max_position_embeddings)

    # -- image tower ----------------------------------------------------------------------------------------
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + h*w, C) input tokens: [CLS, patches] + positions (interpolated off-size), pre-LN."""
        return self.vision.pre_layrnorm(self.vision.embeddings(x, interpolate_pos_encoding=True))

    def transformer(self, h: torch.Tensor, n_blocks: int | None = None) -> list[torch.Tensor]:
        """Run token sequences (N, T, C) through the first ``n_blocks`` blocks; returns every block's output."""
        outs = []
        for layer in self.vision.encoder.layers[: n_blocks or len(self.vision.encoder.layers)]:
            h = layer(h, None, **self._layer_kwargs)
            h = h[0] if isinstance(h, tuple) else h
            outs.append(h)
        return outs

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        """(..., C) last-block tokens -> (..., D) projected, L2-normalised embeddings."""
        return F.normalize(self.model.visual_projection(self.vision.post_layernorm(h)), dim=-1)

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def forward(self, x: torch.Tensor, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        names = [f.name for f in self.feature_info]
        layers = list(layers or names)
        for name in layers:
            self.info(name)  # unknown names raise, naming the valid ones
        depth = max(len(names) - 1 if n == "last" else names.index(n) + 1 for n in layers)
        outs = self.transformer(self.tokens(x), depth)
        b, (gh, gw) = x.shape[0], self._grid(x)
        result = {}
        for name in layers:
            h = self.vision.post_layernorm(outs[-1]) if name == "last" else outs[names.index(name)]
            result[name] = h[:, 1:].transpose(1, 2).reshape(b, -1, gh, gw)  # (B, C, h, w)
        return result

    @torch.inference_mode()
    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) projected, L2-normalised image (class) embeddings."""
        return self._project(self.transformer(self.tokens(x))[-1][:, 0])

    @torch.inference_mode()
    def patch_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, h*w, D) projected, L2-normalised patch-token embeddings (row-major grid)."""
        return self._project(self.transformer(self.tokens(x))[-1][:, 1:])

    @torch.inference_mode()
    def encode_windows(self, x: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """Class embedding of each window, computed from that window's tokens only.

        x: (B, 3, H, W); windows: (K, h*w) bool, True on the patches each window keeps. Returns (B, K, D).
        """
        return self._windows(self.tokens(x), windows)

    @torch.inference_mode()
    def encode_dense(self, x: torch.Tensor, windows: Sequence[torch.Tensor] = ()) -> tuple:
        """Everything WinCLIP needs from one image batch, sharing the token embedding and the full pass.

        Returns (image (B, D), patches (B, h*w, D), [windows (B, K_s, D) for each mask set in ``windows``]).
        """
        tok = self.tokens(x)
        last = self.transformer(tok)[-1]
        emb = self._project(last)  # (B, 1 + h*w, D)
        return emb[:, 0], emb[:, 1:], [self._windows(tok, w) for w in windows]

    def _windows(self, tok: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        b, t, c = tok.shape
        windows = windows.to(tok.device, torch.bool)
        if windows.dim() != 2 or windows.shape[1] != t - 1:
            raise ValueError(f"windows must be (K, {t - 1}) bool over the patch grid, got {tuple(windows.shape)}")
        sizes = windows.sum(1)
        if (sizes == 0).any():
            raise ValueError("every window must keep at least one patch")
        out = tok.new_empty(b, windows.shape[0], self.embed_dim)
        # Windows with the same number of patches form one batch of equal-length sequences: [CLS, its patches].
        for n in sizes.unique().tolist():
            ks = (sizes == n).nonzero()[:, 0]  # (Kn,)
            idx = windows[ks].nonzero()[:, 1].view(len(ks), n) + 1  # (Kn, n) token indices, CLS is token 0
            idx = torch.cat([idx.new_zeros(len(ks), 1), idx], 1)  # (Kn, 1 + n)
            seqs = tok[:, idx].reshape(b * len(ks), n + 1, c)  # (B*Kn, 1 + n, C), image-major
            step = max(1, WINDOW_TOKENS_PER_PASS // (n + 1))
            cls = torch.cat([self.transformer(seqs[i : i + step])[-1][:, 0] for i in range(0, len(seqs), step)])
            out[:, ks] = self._project(cls).view(b, len(ks), -1)
        return out

    # -- text tower -----------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        return {k: tok[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenised texts -> (N, D) projected text embeddings (not normalised; differentiable)."""
        out = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return self.model.text_projection(out.pooler_output)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """list of N strings -> (N, D) projected, L2-normalised text embeddings."""
        return F.normalize(self.text_features(self.tokenize(texts)), dim=-1)


def clip(source: str | None = None) -> CLIPBackbone:
    if not source:
        raise ModelNotFoundError(f"the clip backbone needs the weights' location; {_HOW}")
    return CLIPBackbone(source)


def build_random_clip(
    folder: str | Path,
    image_size: int = 32,
    patch_size: int = 4,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    text_hidden: int = 32,
    text_layers: int = 2,
    text_heads: int = 2,
    projection: int = 16,
    words: Sequence[str] = (),
    seed: int = 0,
) -> Path:
    """Write a random-initialised CLIP folder (model + a byte-level tokenizer), offline: for tests and benchmarks.

    The tokenizer spells every word byte by byte, except ``words`` (lowercase ASCII), which get merges that make
    each one token, as a real CLIP vocabulary does for common words (so sequence lengths are realistic).
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from tokenizers.pre_tokenizers import ByteLevel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(ByteLevel.alphabet())  # the 256 characters byte-level BPE spells bytes with
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in dict.fromkeys(w for w in words if len(w) > 1):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: "a b", "ab c</w>", ...
            merges.append(f"{parts[0]} {parts[1]}")
            parts[:2] = [parts[0] + parts[1]]
            tokens.append(parts[0])
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *dict.fromkeys(merges)]) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=text_hidden, intermediate_size=4 * text_hidden,
                         num_hidden_layers=text_layers, num_attention_heads=text_heads, max_position_embeddings=77,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden, intermediate_size=4 * hidden,
                           num_hidden_layers=layers, num_attention_heads=heads),
        projection_dim=projection,
    )
    state = torch.random.get_rng_state()  # CLIPModel initialises from the global RNG: seed it, then restore it
    try:
        torch.manual_seed(seed)
        model = CLIPModel(config)
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
