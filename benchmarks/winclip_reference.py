"""WinCLIP against anomalib's (issue 23, part 6): the same random CLIP, the same images, matched settings.

Not part of CI: it needs anomalib and open_clip, which clad does not depend on, in a venv of their own (see
benchmarks/README.md, "WinCLIP against anomalib's"). Nothing is downloaded:

1. A small OpenCLIP ViT (custom config: image 240, patch 16 as WinCLIP's ViT-B-16-plus-240, width 128, 3 layers)
   is built with a fixed seed, converted by ``clad.backbones.openclip_convert`` into a transformers ``CLIPModel``
   folder (with OpenCLIP's own BPE vocabulary as the tokenizer) and loaded by clad as ``clip:FOLDER``; the two
   towers' embeddings are compared (max abs difference printed).
2. anomalib's ``WinClipModel`` builds its CLIP with ``open_clip.create_model_and_transforms(BACKBONE,
   pretrained=PRETRAINED)`` in ``__init__`` (torch_model.py), i.e. it would download ViT-B-16-plus-240 /
   laion400m_e31. The script sets those two module constants to the custom config's name and ``None`` (random
   init, no download), then loads the seeded weights into ``model.clip`` before ``setup`` encodes the prompts.
3. Both get the same normalised 240 x 240 tensors (clad's ``preprocess``), the same scales (2, 3), class name and
   temperature; anomalib's references are the same images clad fits on. Spearman rank correlations of the image
   scores and of the maps (flattened, both at 240 x 240) are printed per category and setting as markdown.

Variants: ``matched`` gives clad anomalib's prompt lists, prototype (the mean of raw text embeddings) and patch
embeddings (unprojected tokens), so any remaining difference is in the computation; ``clad`` is clad as it is;
``clad -X`` matches all but X (``prompts``, ``prototype``, ``patches``), which stays clad's; ``matched+own-
resize`` is ``matched`` with anomalib given its own pre-processing (bicubic resize of the float image) instead
of clad's tensors. The last map column
uses clad's final map (upsampled and smoothed with sigma 4, at 240 x 240) instead of its patch grid.

    /work/venvs/anomalib/bin/python benchmarks/winclip_reference.py --data ../shared/data --n-test 40
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# torchvision's PyPI wheel is a CUDA build whose operators do not load against the CPU torch; its import then
# fails registering fake kernels of two undefined operators. Defining their schemas lets it import (WinCLIP uses
# only torchvision's transforms, never these operators).
_TV = torch.library.Library("torchvision", "DEF")
for _op in ("nms", "qnms"):
    _TV.define(_op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

import open_clip  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from anomalib.models.image.winclip import torch_model as anomalib_winclip  # noqa: E402
from anomalib.models.image.winclip.prompting import (  # noqa: E402
    ANOMALOUS_STATES as A_ANOMALOUS, NORMAL_STATES as A_NORMAL, TEMPLATES as A_TEMPLATES)
from scipy.stats import spearmanr  # noqa: E402

import clad  # noqa: E402
import clad.ops.prompts as clad_prompts  # noqa: E402
from clad.backbones.openclip_convert import save_hf_clip  # noqa: E402
from clad.data.datasets import few_shot_paths  # noqa: E402
from clad.data.io import load_batch, load_image  # noqa: E402
from clad.ops.smoothing import smooth_working  # noqa: E402

MODEL = "winclip-ref-tiny"
MODEL_CFG = {
    "embed_dim": 64,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 240, "layers": 3, "width": 128, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3},
}
SIZE, SCALES, SEED = 240, (2, 3), 0
# What each variant takes from anomalib: its prompt lists, its prototype (mean of raw text embeddings), its patch
# embeddings (unprojected tokens). "clad -X": everything matched but X, which stays clad's.
ALL = {"prompts", "prototype", "patches"}
MATCHED = {"matched": ALL, "clad": set(), **{f"clad -{x}": ALL - {x} for x in sorted(ALL)},
           "matched+own-resize": ALL | {"own resize"}}
CATEGORIES = {"bottle": "mvtec_ad/bottle", "magnetic_tile": "magnetic_tile"}


def build_openclip(folder: Path) -> torch.nn.Module:
    (folder / "cfg").mkdir(parents=True, exist_ok=True)
    (folder / "cfg" / f"{MODEL}.json").write_text(json.dumps(MODEL_CFG))
    open_clip.add_model_config(folder / "cfg")
    torch.manual_seed(SEED)
    return open_clip.create_model(MODEL, pretrained=None).eval()


def anomalib_model(state: dict, class_name: str, refs: torch.Tensor | None) -> torch.nn.Module:
    anomalib_winclip.BACKBONE, anomalib_winclip.PRETRAINED = MODEL, None  # random init, nothing downloaded
    model = anomalib_winclip.WinClipModel(class_name=None, scales=SCALES).eval()
    model.clip.load_state_dict(state)
    model.setup(class_name, refs)
    return model


def tower_check(oc: torch.nn.Module, bb, x: torch.Tensor) -> dict:
    texts = ["a photo of a flawless bottle.", "a jpeg corrupted photo of the damaged magnetic tile."]
    with torch.no_grad():
        ids_oc = open_clip.tokenize(texts)
        tok = bb.tokenize(texts)  # padded with end-of-text (OpenCLIP pads with 0): compare the unpadded ids
        same_ids = all(ids_oc[i, : int(m.sum())].tolist() == ids[m.bool()].tolist()
                       for i, (ids, m) in enumerate(zip(tok["input_ids"], tok["attention_mask"])))
        img = (F.normalize(oc.encode_image(x), dim=-1) - bb.pooled(x)).abs().max().item()
        txt = (F.normalize(oc.encode_text(ids_oc), dim=-1) - bb.encode_text(texts)).abs().max().item()
    return {"token_ids_equal": same_ids, "image_max_abs": img, "text_max_abs": txt}


def pick(root: Path, n_test: int) -> list[Path]:
    paths = sorted(p for p in (root / "test").glob("*/*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    return [paths[i] for i in np.linspace(0, len(paths) - 1, n_test).round().astype(int)]


def use_anomalib_prompts(on: bool, saved={}) -> None:  # noqa: B006 - keeps clad's lists between calls
    names = ("NORMAL_STATES", "ANOMALOUS_STATES", "TEMPLATES")
    if not saved:
        saved.update({n: getattr(clad_prompts, n) for n in names})
    for n, theirs in zip(names, (A_NORMAL, A_ANOMALOUS, A_TEMPLATES)):
        setattr(clad_prompts, n, tuple(theirs) if on else saved[n])


def raw_mean_prototypes(det, class_name: str) -> None:
    """anomalib's prototype: the mean of the raw (unnormalised) prompt embeddings, normalised at scoring."""
    bb = det._backbone()
    normal, anomalous = clad_prompts.state_prompts(class_name)
    with torch.no_grad():
        raw = [bb.text_features(bb.tokenize(p)).mean(0) for p in (normal, anomalous)]
    det.text_prototypes_ = F.normalize(torch.stack(raw).detach(), dim=-1)


def unprojected_patch_memory(bb) -> None:
    """anomalib's patch embeddings: OpenCLIP's ``output_tokens``, the last block's patch tokens after ``ln_post``
    but not projected (width-d, not embed-d); normalised here, as its cosine similarity does."""
    encode = bb.encode_dense

    def encode_dense(x, windows=()):
        image, _, win = encode(x, windows)
        with torch.inference_mode():
            tokens = bb.vision.post_layernorm(bb.transformer(bb.tokens(x))[-1][:, 1:])  # (B, h*w, C)
        return image, F.normalize(tokens, dim=-1), win

    bb.encode_dense = encode_dense


def anomalib_preprocess(arrays) -> torch.Tensor:
    """anomalib's WinClip pre-processor (lightning_model.py): Resize((240, 240), bicubic, antialias), Normalize
    with OpenAI's mean and std, on the [0, 1] float image; clad resizes the uint8 image bilinearly."""
    from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

    t = Compose([Resize((SIZE, SIZE), antialias=True, interpolation=InterpolationMode.BICUBIC),
                 Normalize(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))])
    return torch.stack([t(torch.from_numpy(a).permute(2, 0, 1).float() / 255) for a in arrays])


def rho(a, b) -> float:
    return float(spearmanr(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()).statistic)


def run(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="winclip_ref_"))
    oc = build_openclip(work)
    state = oc.state_dict()
    heads_v = MODEL_CFG["vision_cfg"]["width"] // MODEL_CFG["vision_cfg"]["head_width"]
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    folder = save_hf_clip(work / "hf_clip", state, heads_v, MODEL_CFG["text_cfg"]["heads"],
                          quick_gelu=MODEL_CFG["quick_gelu"], bpe_path=bpe)
    print(f"OpenCLIP {MODEL} {json.dumps(MODEL_CFG)} seed {SEED} -> {folder}")
    rows, checked = [], False
    for cat, sub in CATEGORIES.items():
        root = Path(args.data) / sub
        test = pick(root, args.n_test)
        train = sorted((root / "train" / "good").iterdir())
        class_name = clad_prompts.object_name_for(cat)
        for shots in args.shots:
            refs = [load_image(p) for p in few_shot_paths(train, shots, SEED)] if shots else [load_image(train[0])]
            for variant in args.variants:
                matched = MATCHED[variant]
                use_anomalib_prompts("prompts" in matched)
                det = clad.create_detector("winclip", backbone=f"clip:{folder}", category=cat, few_shot=shots > 0,
                                           image_size=SIZE, window_sizes=SCALES, seed=SEED)
                if "patches" in matched:
                    unprojected_patch_memory(det._backbone())
                det.fit(refs)
                if "prototype" in matched:
                    raw_mean_prototypes(det, class_name)
                bb = det._backbone()
                x_ref = bb.preprocess(load_batch(refs)[0], SIZE)
                if not checked:
                    print("towers:", tower_check(oc, bb, x_ref[:1]))
                    checked = True
                own = "own resize" in matched
                if own:
                    x_ref = anomalib_preprocess(load_batch(refs)[0])
                model = anomalib_model(state, class_name, x_ref if shots else None)
                s_c, m_c, m_a, s_a, m_final = [], [], [], [], []
                t0 = time.perf_counter()
                for i in range(0, len(test), 8):
                    arrays, shapes = load_batch([load_image(p) for p in test[i : i + 8]])
                    x = bb.preprocess(arrays, SIZE)
                    with torch.inference_mode():
                        out = det.score_maps(*det._encode(arrays))
                        res = model(anomalib_preprocess(arrays) if own else x)

                    g = SIZE // bb.patch_size
                    s_c.append(out["score"])
                    m_c.append(F.interpolate(out["map"].view(-1, 1, g, g), size=(SIZE, SIZE), mode="bilinear")[:, 0])
                    s_a.append(res.pred_score)
                    m_a.append(res.anomaly_map)
                    # clad's final map (what predict returns), at the working size instead of each image's own
                    m_final.append(smooth_working(out["map"].view(-1, g, g), SIZE, det.config.sigma))
                s_c, s_a = torch.cat(s_c), torch.cat(s_a)
                m_c, m_a, m_final = torch.cat(m_c), torch.cat(m_a), torch.cat(m_final)
                rows.append([cat, shots, variant, rho(s_c, s_a), rho(m_c, m_a), rho(m_final, m_a),
                             (s_c - s_a).abs().max().item(), (m_c - m_a).abs().max().item(), time.perf_counter() - t0])
                print(" | ".join(str(v) if not isinstance(v, float) else f"{v:.4g}" for v in rows[-1]), flush=True)
    use_anomalib_prompts(False)
    head = ["category", "shots", "variant", "image score rho", "map rho (grid, bilinear)", "map rho (clad's final map)",
            "max abs score diff", "max abs map diff"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join([r[0], str(r[1]), r[2], *(f"{v:.4f}" for v in r[3:6]), *(f"{v:.2g}" for v in r[6:8])]) + " |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    p.add_argument("--n-test", type=int, default=40)
    p.add_argument("--variants", type=lambda s: s.split(","), default=["matched", "clad"],
                   help=f"comma-separated, of {sorted(MATCHED)}")
    p.add_argument("--shots", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2, 4])
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run(args)


if __name__ == "__main__":
    sys.exit(main())
