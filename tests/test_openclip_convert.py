"""OpenCLIP -> transformers CLIPModel: a state dict in OpenCLIP's layout, run by a hand-written OpenCLIP forward
(torch only), gives the same embeddings as the converted CLIPModel; the tokenizer keeps OpenCLIP's ids."""
from __future__ import annotations

import gzip

import pytest
import torch
import torch.nn.functional as F

from clad.backbones.openclip_convert import _bytes_to_unicode, convert_state_dict, save_hf_clip, write_tokenizer

W, LAYERS, HEADS, PATCH, GRID, EMBED, VOCAB, CTX = 32, 2, 2, 4, 3, 16, 530, 12


def openclip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under OpenCLIP's names and shapes (ViT image tower, text transformer at the top level)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    s = {"visual.class_embedding": r(W), "visual.positional_embedding": r(GRID * GRID + 1, W),
         "visual.conv1.weight": r(W, 3, PATCH, PATCH), "visual.proj": r(W, EMBED), "text_projection": r(W, EMBED),
         "token_embedding.weight": r(VOCAB, W), "positional_embedding": r(CTX, W), "logit_scale": torch.tensor(2.0),
         "attn_mask": torch.full((CTX, CTX), float("-inf")).triu(1)}
    for ln in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        s[f"{ln}.weight"], s[f"{ln}.bias"] = 1 + r(W), r(W)
    for tower in ("visual.transformer", "transformer"):
        for i in range(LAYERS):
            b = f"{tower}.resblocks.{i}"
            for ln in ("ln_1", "ln_2"):
                s[f"{b}.{ln}.weight"], s[f"{b}.{ln}.bias"] = 1 + r(W), r(W)
            s[f"{b}.attn.in_proj_weight"], s[f"{b}.attn.in_proj_bias"] = r(3 * W, W), r(3 * W)
            s[f"{b}.attn.out_proj.weight"], s[f"{b}.attn.out_proj.bias"] = r(W, W), r(W)
            s[f"{b}.mlp.c_fc.weight"], s[f"{b}.mlp.c_fc.bias"] = r(4 * W, W), r(4 * W)
            s[f"{b}.mlp.c_proj.weight"], s[f"{b}.mlp.c_proj.bias"] = r(W, 4 * W), r(W)
    return s


def _blocks(s: dict, tower: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """OpenCLIP's residual attention blocks on (B, L, W), as nn.MultiheadAttention computes them."""
    ln = lambda t, n: F.layer_norm(t, (W,), s[f"{n}.weight"], s[f"{n}.bias"])  # noqa: E731
    for i in range(LAYERS):
        b = f"{tower}.resblocks.{i}"
        h = ln(x, f"{b}.ln_1").transpose(0, 1)  # (L, B, W)
        a, _ = F.multi_head_attention_forward(
            h, h, h, W, HEADS, s[f"{b}.attn.in_proj_weight"], s[f"{b}.attn.in_proj_bias"], None, None, False, 0.0,
            s[f"{b}.attn.out_proj.weight"], s[f"{b}.attn.out_proj.bias"], need_weights=False, attn_mask=mask)
        x = x + a.transpose(0, 1)
        h = F.gelu(F.linear(ln(x, f"{b}.ln_2"), s[f"{b}.mlp.c_fc.weight"], s[f"{b}.mlp.c_fc.bias"]))
        x = x + F.linear(h, s[f"{b}.mlp.c_proj.weight"], s[f"{b}.mlp.c_proj.bias"])
    return x


def openclip_image(s: dict, x: torch.Tensor) -> torch.Tensor:
    t = F.conv2d(x, s["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)  # (B, g*g, W)
    t = torch.cat([s["visual.class_embedding"].expand(len(x), 1, W), t], 1) + s["visual.positional_embedding"]
    t = _blocks(s, "visual.transformer", F.layer_norm(t, (W,), s["visual.ln_pre.weight"], s["visual.ln_pre.bias"]), None)
    return F.layer_norm(t[:, 0], (W,), s["visual.ln_post.weight"], s["visual.ln_post.bias"]) @ s["visual.proj"]


def openclip_text(s: dict, ids: torch.Tensor) -> torch.Tensor:
    n = ids.shape[1]
    t = _blocks(s, "transformer", s["token_embedding.weight"][ids] + s["positional_embedding"][:n], s["attn_mask"][:n, :n])
    t = F.layer_norm(t, (W,), s["ln_final.weight"], s["ln_final.bias"])
    return t[torch.arange(len(ids)), ids.argmax(-1)] @ s["text_projection"]  # at end of text, the largest id


def test_converted_model_gives_openclip_embeddings(tmp_path):
    from transformers import CLIPModel

    s = openclip_state()
    folder = save_hf_clip(tmp_path / "clip", s, vision_heads=HEADS, text_heads=HEADS)
    model = CLIPModel.from_pretrained(str(folder)).eval()
    cfg = model.config
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.projection_dim) == (GRID * PATCH, PATCH, EMBED)
    x = torch.randn(2, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[VOCAB - 2, 5, 9, 7, VOCAB - 1, 0, 0], [VOCAB - 2, 3, VOCAB - 1, 0, 0, 0, 0]])
    with torch.no_grad():
        img = model.get_image_features(pixel_values=x)
        txt = model.get_text_features(input_ids=ids, attention_mask=(torch.arange(7) <= ids.argmax(-1)[:, None]).long())
        img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))  # transformers 5 may return an output object
        want_img, want_txt = openclip_image(s, x), openclip_text(s, ids)
    print("max abs diff: image", (img - want_img).abs().max().item(), "text", (txt - want_txt).abs().max().item())
    torch.testing.assert_close(img, want_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(txt, want_txt, atol=1e-5, rtol=1e-4)


def test_unknown_openclip_keys_are_named():
    s = openclip_state()
    s["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(W)  # layer scale: CLIPModel has none
    with pytest.raises(ValueError, match="ls_1.gamma"):
        convert_state_dict(s)


def test_tokenizer_keeps_openclip_ids(tmp_path):
    from transformers import CLIPTokenizer

    merges = ["t h", "th e</w>", "c a", "ca t</w>"]
    bpe = tmp_path / "bpe.txt.gz"
    bpe.write_bytes(gzip.compress(("header\n" + "\n".join(merges) + "\n").encode()))
    folder = write_tokenizer(tmp_path / "tok", bpe, vocab_size=512 + len(merges) + 2)
    tok = CLIPTokenizer.from_pretrained(str(folder))
    # OpenCLIP's layout: 256 byte characters, their 256 "</w>" forms, one id per merge, start and end of text
    alphabet = list(_bytes_to_unicode().values())
    the, cat = 512 + 1, 512 + 3
    assert tok("the cat a")["input_ids"] == [516, the, cat, 256 + alphabet.index("a"), 517]
