"""OpenCLIP weights -> a Hugging Face ``CLIPModel`` folder that ``clip:/folder`` loads.

An OpenCLIP ``CLIP`` (``open_clip.create_model``: a ``VisionTransformer`` image tower, the text transformer at the
top level) holds the same computation as ``transformers.CLIPModel`` under other names and layouts: fused q/k/v
projections, ``(in, out)`` projection matrices, ``ln_pre``/``ln_post``. ``convert_state_dict`` maps one onto the
other; ``write_tokenizer`` turns OpenCLIP's BPE merges file into the ``vocab.json`` + ``merges.txt`` a
``CLIPTokenizer`` reads, with the same token ids (the byte alphabet, then its ``</w>`` forms, then one token per
merge, then start and end of text). Only torch (and transformers, to build the model) is needed; open_clip is not.
"""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import torch

_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_NAMES = {  # OpenCLIP residual block -> transformers CLIPEncoderLayer
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_TOP_NAMES = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_IGNORED = ("attn_mask",)  # OpenCLIP's causal-mask buffer: transformers builds its own


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP ``CLIP.state_dict()`` -> ``CLIPModel`` state dict. Unknown keys (e.g. layer scale, attentional
    pooling, a logit bias: towers ``CLIPModel`` cannot express) raise ValueError naming them."""
    out, unknown = {}, []
    for key, value in state.items():
        if key in _IGNORED:
            continue
        if key in _TOP_NAMES:
            out[_TOP_NAMES[key]] = value
        elif key in ("visual.proj", "text_projection"):  # (width, embed) matrices applied as x @ P
            out["visual_projection.weight" if key == "visual.proj" else "text_projection.weight"] = value.T
        elif m := _BLOCK.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m.group(2)}", m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}.self_attn.{name}.{kind}"] = part
                continue
            module, _, kind = rest.rpartition(".")
            if module not in _BLOCK_NAMES:
                unknown.append(key)
                continue
            out[f"{prefix}.{_BLOCK_NAMES[module]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"OpenCLIP keys with no transformers CLIPModel counterpart: {sorted(unknown)}")
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def clip_config(state: dict[str, torch.Tensor], vision_heads: int, text_heads: int, quick_gelu: bool = False,
                eos_token_id: int | None = None):
    """The ``CLIPConfig`` of an OpenCLIP state dict: sizes read off the tensors; heads and activation given
    (the state dict does not hold them). ``quick_gelu``: OpenAI's activation (``*-quickgelu`` models) or GELU."""
    from transformers import CLIPConfig

    def n_layers(prefix: str) -> int:
        return 1 + max(int(m.group(2)) for k in state if (m := _BLOCK.match(k)) and bool(m.group(1)) == (prefix == "visual."))

    conv = state["visual.conv1.weight"]  # (width, 3, patch, patch)
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    act = "quick_gelu" if quick_gelu else "gelu"
    vocab, text_width = state["token_embedding.weight"].shape
    eos = vocab - 1 if eos_token_id is None else eos_token_id  # OpenCLIP's end of text is the last token
    return CLIPConfig(
        projection_dim=int(state["visual.proj"].shape[1]),
        vision_config=dict(
            hidden_size=int(conv.shape[0]), patch_size=int(conv.shape[-1]), image_size=int(grid * conv.shape[-1]),
            intermediate_size=int(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            num_hidden_layers=n_layers("visual."), num_attention_heads=vision_heads, hidden_act=act,
        ),
        text_config=dict(
            vocab_size=int(vocab), hidden_size=int(text_width),
            intermediate_size=int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            num_hidden_layers=n_layers(""), num_attention_heads=text_heads, hidden_act=act,
            max_position_embeddings=int(state["positional_embedding"].shape[0]),
            bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos,
        ),
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table (the order defines the first 256 ids)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(folder: str | Path, bpe_path: str | Path, vocab_size: int = 49408) -> Path:
    """OpenCLIP's ``bpe_simple_vocab_16e6.txt.gz`` -> ``vocab.json``, ``merges.txt`` and the tokenizer config of a
    ``CLIPTokenizer`` in ``folder`` giving the same ids as ``open_clip.tokenize`` (OpenAI CLIP's tokenizer)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : vocab_size - 256 * 2 - 2 + 1]  # as open_clip's SimpleTokenizer: line 0 is a header
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != vocab_size:
        raise ValueError(f"{bpe_path}: {len(tokens)} tokens, expected {vocab_size}")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>").save_pretrained(str(folder))
    return folder


def save_hf_clip(folder: str | Path, state: dict[str, torch.Tensor], vision_heads: int, text_heads: int,
                 quick_gelu: bool = False, bpe_path: str | Path | None = None) -> Path:
    """Write an OpenCLIP state dict as a ``CLIPModel`` folder (safetensors + config; the tokenizer from
    ``bpe_path`` when given) that ``create_backbone(f"clip:{folder}")`` loads. Returns the folder."""
    from transformers import CLIPModel

    folder = Path(folder)
    model = CLIPModel(clip_config(state, vision_heads, text_heads, quick_gelu))
    missing, unexpected = model.load_state_dict(convert_state_dict(state), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer transformers fills itself
    if missing or unexpected:
        raise ValueError(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(str(folder))
    if bpe_path is not None:
        write_tokenizer(folder, bpe_path, vocab_size=model.config.text_config.vocab_size)
    return folder
