"""CLAD's training (Eq. 3 + Eq. 6-7): training views made from the references, their patch labels, and the loop.

The views: up to n // 4 references as they are, then mildly augmented views, about ``anomaly_ratio`` of them with
a synthetic anomaly (``clad.synthesis``) whose kind is its description; with ``aux``, real defects of other
categories (``clad.data.auxiliary``), each with the kind its defect type maps to (``clad.vocabulary.aux_kind``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from clad.data.auxiliary import load_aux
from clad.detectors.clad.config import CLADConfig
from clad.detectors.clad.model import CLADModel
from clad.ops.losses import contrastive_loss, supervised_loss
from clad.synthesis import make_anomaly
from clad.vocabulary import aux_kind


def augment(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A mild, label-preserving view of a reference: small shift and rotation, brightness and contrast."""
    img = Image.fromarray(image).resize((size, size), Image.BILINEAR)
    shift = rng.uniform(-0.03, 0.03, 2) * size
    img = img.rotate(float(rng.uniform(-3, 3)), resample=Image.BILINEAR, translate=tuple(shift), fillcolor=None)
    a = np.asarray(img).astype(np.float32)
    a = (a - a.mean()) * rng.uniform(0.92, 1.08) + a.mean() * rng.uniform(0.92, 1.08)
    return np.clip(a, 0, 255).astype(np.uint8)


def make_pool(refs: list[np.ndarray], n: int, rng: np.random.Generator, size: int, anomaly_ratio: float,
              kinds: list[str]):
    """``n`` training images (size, size, 3), their masks and kinds ("normal" or a synthetic kind of ``kinds``):
    up to n // 4 references as they are, then augmented views of the references (a seeded order through them)."""
    order = rng.permutation(len(refs))
    n_plain = min(len(refs), max(1, n // 4))
    images, masks, labels = [], [], []
    for i in range(n):
        ref = refs[order[i % len(refs)]]
        if i < n_plain:
            images.append(np.asarray(Image.fromarray(ref).resize((size, size), Image.BILINEAR)))
            masks.append(np.zeros((size, size), bool)), labels.append("normal")
            continue
        base = augment(ref, rng, size)
        if rng.random() < anomaly_ratio:
            a = make_anomaly(base, rng, kinds=kinds)
            images.append(a.image), masks.append(a.mask), labels.append(a.kind)
        else:
            images.append(base), masks.append(np.zeros((size, size), bool)), labels.append("normal")
    return images, masks, labels


def patch_targets(masks: list[np.ndarray], kinds: list[str], classes: list[str], grid) -> torch.Tensor:
    """(N, h, w) class index per patch: its kind where >= 25% of the patch is defective, normal (0) where none of
    it is, -1 (ignored) in between."""
    m = torch.from_numpy(np.stack(masks)).float()[:, None]
    frac = F.adaptive_avg_pool2d(m, grid)[:, 0]
    kind_idx = torch.tensor([classes.index(k) for k in kinds])[:, None, None].expand_as(frac)
    out = torch.full(frac.shape, -1, dtype=torch.long)
    out[frac == 0] = 0
    out[frac >= 0.25] = kind_idx[frac >= 0.25]
    return out


def train(model: CLADModel, cfg: CLADConfig, refs: list[np.ndarray], rng: np.random.Generator) -> list[str]:
    """Train ``model``'s heads (and fine-tuned parts) on views of the references ``refs`` (RGB arrays).
    Returns the defect types of the auxiliary images trained on (empty without ``cfg.aux``)."""
    kinds = [k for k in model.classes if k != "normal"]
    pool, masks, labels = make_pool(refs, cfg.n_train_images, rng, cfg.image_size, cfg.anomaly_ratio, kinds)
    n_own = len(pool)
    aux_types = []
    if cfg.aux:
        aux_images, aux_masks, aux_types = load_aux(cfg.aux, cfg.category, cfg.aux_images, cfg.seed, cfg.image_size)
        pool, masks = pool + aux_images, masks + aux_masks
        labels = labels + [aux_kind(t, model.classes) for t in aux_types]
    bb, heads = model.backbone, model.heads
    with torch.no_grad():
        x = torch.cat([bb.preprocess(pool[i : i + 16], cfg.image_size) for i in range(0, len(pool), 16)])
        h1, h2 = model.stage_features(x, tuned=False)
        frozen = model.combine(h1, h2)  # (N, C, h, w) original features: reconstruction targets
        own = frozen[:n_own]  # feature normalisation from this category's views only
        heads.feat_mean.copy_(own.mean(dim=(0, 2, 3), keepdim=True))
        heads.feat_std.copy_(own.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))
        text_frozen = model.text(model.text.tokenize([p for _, p in model.prompts]))
    targets = patch_targets(masks, labels, model.classes, frozen.shape[-2:])
    img_targets = torch.tensor([model.classes.index(k) for k in labels])
    _optimise(model, cfg, x, h1, frozen, text_frozen, targets, img_targets)
    return aux_types


def _optimise(model: CLADModel, cfg: CLADConfig, x, h1, frozen, text_frozen, targets, img_targets) -> None:
    """The loop: L = Eq. 3 on patches and images + lam * (visual + text reconstruction, Eq. 6-7), AdamW, one cycle.

    x (N, 3, S, S) views; h1 their first-stage maps; frozen (N, C, h, w) their frozen patch features; text_frozen
    (P, Dt) the frozen text features; targets (N, h, w) patch classes; img_targets (N,) image classes.
    """
    heads = model.heads
    for p in model.text_trainable:
        p.requires_grad_(True)
    groups = [{"params": heads.parameters(), "lr": cfg.lr}]
    tuned = list(model.tail.parameters()) if model.tail is not None else []
    for p in tuned:
        p.requires_grad_(True)
    if tuned or model.text_trainable:
        groups.append({"params": tuned + model.text_trainable, "lr": cfg.backbone_lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = x.shape[0]
    steps = cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.1)
    last = cfg.layers[1]
    model.train()
    bar = tqdm(total=steps, desc="CLAD training", unit="step", leave=False)
    loss_fn = contrastive_loss if cfg.loss == "contrastive" else supervised_loss
    margins = {"alpha": cfg.alpha, "beta": cfg.beta} if cfg.loss == "contrastive" else {}
    for _ in range(cfg.epochs):
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            if model.tail is not None:
                h2 = model.backbone.run_stage(last, h1[idx], model.tail)
                feat = model.combine(h1[idx], h2)
            else:
                feat = frozen[idx]
            z = model.project(feat)  # (b, D, h, w)
            per_prompt, zt = model.class_embeddings(train=True)
            zp = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            yp = targets[idx].reshape(-1)
            keep = yp >= 0
            zp, yp = zp[keep], yp[keep]
            # Eq. 3's means taken per group (normal / anomalous patches), so rare defect patches count.
            is_anom = (yp > 0).float()
            w = is_anom / is_anom.sum().clamp_min(1) + (1 - is_anom) / (1 - is_anom).sum().clamp_min(1)
            z_img = F.normalize(z.mean(dim=(2, 3)), dim=-1)
            l_con = loss_fn(zp, zt, yp, weights=w, **margins) + loss_fn(z_img, zt, img_targets[idx], **margins)
            normal = (targets[idx] == 0).unsqueeze(1).float()
            target_v = (frozen[idx] - heads.feat_mean) / heads.feat_std
            rec_v = (((heads.dec_v(z) - target_v) ** 2) * normal).sum() / (normal.sum() * frozen.shape[1]).clamp_min(1)
            rec_t = F.mse_loss(heads.dec_t(per_prompt), text_frozen)
            loss = l_con + cfg.lam * (rec_v + rec_t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.train(False)
    for p in list(heads.parameters()) + tuned + model.text_trainable:
        p.requires_grad_(False)
