"""The registered detectors ``clad`` (the paper's method) and ``clad_plus`` (CLAD fused with a patch memory).

fit: build the model, train it on views of the references (``training``), calibrate on further views
(``calibration``). predict: the language map 1 - S (Eq. 4) of each patch against the normal class embedding, with
CLAD+ averaged with the memory map, each divided by its scale; the image score is Eq. 4 on the image embedding
(``image_score="pooled"``) or the smoothed map's maximum (``"max"``).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from clad.data.io import load_batch
from clad.detectors.base import Detector
from clad.detectors.capabilities import BackbonePatchFeatures, from_config
from clad.detectors.clad import calibration
from clad.detectors.clad.config import CLADConfig, CLADPlusConfig
from clad.detectors.clad.model import CLADModel, language_score
from clad.detectors.clad.training import train
from clad.detectors.thresholds import keep_references
from clad.ops.coreset import KCenterIndex, continue_coreset, greedy_coreset
from clad.ops.gradcam import grad_cam
from clad.ops.knn import knn
from clad.ops.smoothing import smooth_maps, smooth_working


class CLAD(BackbonePatchFeatures, Detector):
    """The paper's CLAD: language-aligned patch and image embeddings trained with Eq. 3 (+ Eq. 7).

    Fitted: ``model_`` (``CLADModel``), ``text_embeddings_`` (C, D) of the classes, ``sigma_`` / ``sigma_image_``,
    ``memory_bank_`` (M, C), ``scale_lang_`` / ``scale_mem_``, ``aux_types_``, ``self_check_`` (the held-out
    AUROCs, ``calibration.check``) and ``language_weight_`` (CLAD+'s, chosen from them); the threshold as every
    detector's.
    """

    Config = CLADConfig
    family = "clad"
    inference_params = ("memory", "memory_weight", "image_score", "localization", "map_sigma")
    score_is_map_max = from_config(lambda cfg: cfg.image_score == "max")
    can_add_references = from_config(lambda cfg: cfg.memory)  # the memory learns; the language half stays
    # Memories up to this size are searched by brute force. Larger ones by the exact KCenterIndex, which on its
    # first search of test images times its pruning against brute force and keeps the faster: both give the same
    # distances, but pruning pays on object patches and not on fine texture (benchmarks/README.md, "The memory
    # search"). The calibration at fit searches by brute force: views of the references lie on the memory
    # itself, where pruning is unrepresentatively fast.
    brute_force_max = 512
    _brute_only = False  # set by ``_brute_search``

    def _backbone(self):
        return self.model_.backbone

    # -- fit ----------------------------------------------------------------------------------------------
    def _fit(self, images) -> None:
        rng = np.random.default_rng(self.config.seed)
        self.model_ = CLADModel(self.config)
        refs, _ = load_batch(images)
        self.aux_types_ = train(self.model_, self.config, refs, rng)
        self._calibrate(refs, rng)

    @torch.no_grad()
    def _calibrate(self, refs, rng) -> None:
        """sigma, the memory bank and the fusion scales, from the references and fresh normal views of them (the
        threshold comes after, as for every detector: ``Detector.fit``)."""
        cfg, m = self.config, self.model_
        self.text_embeddings_ = m.class_embeddings()[1]  # (C, D)
        h1, h2 = m.stage_features(m.backbone.preprocess(refs, cfg.image_size), tuned=True)
        self.sigma_, self.sigma_image_ = calibration.sigmas(m.project(m.combine(h1, h2)), self.text_embeddings_[0])
        feat = m.combine(h1, m.frozen_last(h1, h2))
        self.memory_bank_ = calibration.memory_bank(feat, cfg.memory_ratio, cfg.memory_min, cfg.memory_max, cfg.seed)
        self.index_ = None
        # Held-out normal views set the scale of each map for the fusion.
        views = calibration.views(refs, rng, cfg.image_size)
        with self._brute_search():
            lang, mem, _ = self._maps(m.backbone.preprocess(views, cfg.image_size), need_memory=True)
        self.scale_lang_, self.scale_mem_ = calibration.scale(lang), calibration.scale(mem)
        self._self_check(refs)

    @torch.no_grad()
    def _self_check(self, refs) -> None:
        """Score held-out views of the references against synthetic anomalies made on them (``calibration.check``):
        ``self_check_`` holds each half's AUROCs; a language map near or below chance is warned about, and CLAD+'s
        language weight (``language_weight_``) is chosen from the fused AUROCs (``choose_language_weight``)."""
        cfg, m = self.config, self.model_
        images, masks, labels = calibration.check_set(refs, cfg.seed, cfg.image_size)
        parts = []
        with self._brute_search():
            for start in range(0, len(images), cfg.batch_size):
                lang, mem, z = self._maps(m.backbone.preprocess(images[start : start + cfg.batch_size], cfg.image_size),
                                          need_memory=True)
                parts.append((lang, mem, self._pooled(z)))
        lang, mem, pooled = (torch.cat(p) for p in zip(*parts))
        peak = lambda patch: smooth_working(patch, cfg.image_size, cfg.map_sigma).flatten(1).max(1).values  # noqa: E731
        self.self_check_ = calibration.check(lang, mem, pooled, masks, labels, self.scale_lang_, self.scale_mem_,
                                             peak)
        self.language_weight_ = calibration.choose_language_weight(self.self_check_)
        if calibration.language_is_weak(self.self_check_):
            lc = {k: "n/a" if v is None else f"{v:.3f}" for k, v in self.self_check_["language"].items()}
            warnings.warn(f"{self.name}: the language map is near or below chance on held-out views of the references "
                          f"(self-check AUROC patch {lc['patch']}, image {lc['image']}; under "
                          f"{calibration.WARN_BELOW}): its scores are not to be trusted"
                          + ("; CLAD+ gives it no weight" if cfg.memory else ""), stacklevel=5)

    def fit_report(self) -> dict:
        """The self-check's AUROCs and the fusion's weights: the language weight chosen at fit, the memory weight
        predict uses (None without the memory)."""
        return {"self_check": self.self_check_, "language_weight_chosen": self.language_weight_,
                "memory_weight": self.memory_weight() if self.config.memory else None}

    def memory_weight(self) -> float:
        """The memory map's weight in the fusion: ``config.memory_weight``, or 1 - the language weight chosen at
        fit (``language_weight_``) when that is None."""
        w = self.config.memory_weight
        return 1.0 - self.language_weight_ if w is None else w

    @torch.no_grad()
    def _add_references(self, arrays) -> None:
        """CLAD+'s memory half learns the new references; the language half (heads, text embeddings, sigma and
        its scale) stays as trained. The new patches join the memory by the greedy k-center rule continued from it
        (``continue_coreset``), as many as ``memory_size`` of all the patches seen allows; at ``memory_max`` the
        memory is chosen again, by the same rule, among its rows and the new patches. The memory map's scale is
        then set again from fresh views of the references (a sample of them: ``references_``)."""
        cfg, m = self.config, self.model_
        parts = []
        for start in range(0, len(arrays), cfg.batch_size):
            h1, h2 = m.stage_features(m.backbone.preprocess(arrays[start : start + cfg.batch_size], cfg.image_size),
                                      tuned=True)
            feat = m.combine(h1, m.frozen_last(h1, h2))  # (B, C, h, w)
            parts.append(feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1]))
        new, bank = torch.cat(parts), self.memory_bank_  # (K, C), (M, C)
        seen = self.n_references_ * (len(new) // len(arrays))  # the references' patches so far
        size = calibration.memory_size(seen + len(new), cfg.memory_ratio, cfg.memory_min, cfg.memory_max)
        if size > len(bank):
            rows = new[continue_coreset(new, bank, size - len(bank), seed=cfg.seed)]
            self.memory_bank_ = torch.cat([bank, rows]).contiguous()
            index = getattr(self, "index_", None)
            grows = index is not None and len(self.memory_bank_) <= 2 * index.built_size
            self.index_ = index.extended(rows) if grows else None
        else:  # at memory_max
            pool = torch.cat([bank, new])
            self.memory_bank_ = pool[greedy_coreset(pool, size, seed=cfg.seed)].contiguous()
            self.index_ = None
        refs = keep_references(list(self.references_.numpy()), self.n_references_, arrays, cfg.image_size, cfg.seed)
        views = calibration.views(refs, np.random.default_rng([cfg.seed, self.n_references_ + len(arrays)]),
                                  cfg.image_size)
        with self._brute_search():
            _, mem, _ = self._maps(m.backbone.preprocess(views, cfg.image_size), need_memory=True)
        self.scale_mem_ = calibration.scale(mem)

    def _view_scores(self, views) -> np.ndarray:
        with self._brute_search():  # views of the references lie on the memory: no search decision from them
            return self._predict_batch(views)[0]

    @contextmanager
    def _brute_search(self):
        """Within: the memory is searched by brute force, and the index neither built nor asked to decide."""
        before, self._brute_only = self._brute_only, True
        try:
            yield
        finally:
            self._brute_only = before

    def _nearest_memory(self, flat: torch.Tensor) -> torch.Tensor:
        """Distance of each row of ``flat`` (N, C) to its nearest memory patch (exact, by either search)."""
        bank = self.memory_bank_
        if len(bank) <= self.brute_force_max or self._brute_only:
            return knn(flat, bank, k=1, indices=False)[0][:, 0]
        if getattr(self, "index_", None) is None:
            self.index_ = KCenterIndex(bank)
        return self.index_.nearest(flat, indices=False)[0]

    # -- inference ----------------------------------------------------------------------------------------
    def _maps(self, x: torch.Tensor, need_memory: bool):
        """Patch-level language map (1 - S) and memory map (B, h, w), and the patch embeddings (B, D, h, w)."""
        m = self.model_
        h1, h2 = m.stage_features(x, tuned=True)
        z = m.project(m.combine(h1, h2))
        lang = language_score(z, self.text_embeddings_, self.sigma_, self.config.language_score)
        mem = None
        if need_memory:
            feat = m.combine(h1, m.frozen_last(h1, h2))
            b, c, hh, ww = feat.shape
            mem = self._nearest_memory(feat.permute(0, 2, 3, 1).reshape(-1, c)).view(b, hh, ww)
        return lang, mem, z

    def _predict_batch(self, images):
        cfg = self.config
        arrays, shapes = load_batch(images)
        x = self.model_.backbone.preprocess(arrays, cfg.image_size)
        with torch.no_grad():
            lang, mem, z = self._maps(x, need_memory=cfg.memory)
            patch = lang
            if cfg.memory:
                w = self.memory_weight()
                patch = w * mem / self.scale_mem_ + (1 - w) * lang / self.scale_lang_
            s_img = self._pooled(z)
        if cfg.localization == "gradcam":
            patch = self._gradcam(x)
        if cfg.image_score == "pooled":
            scores = s_img
        else:  # the largest value of the smoothed map at the working size
            scores = smooth_working(patch, cfg.image_size, cfg.map_sigma).flatten(1).max(1).values
        return scores.numpy(), smooth_maps(patch, cfg.image_size, cfg.map_sigma, shapes)

    def _pooled(self, z: torch.Tensor) -> torch.Tensor:
        """Eq. 4 on the image embeddings (the normalised mean of the patch embeddings z (B, D, h, w)): (B,)."""
        z_img = F.normalize(z.mean(dim=(2, 3)), dim=-1)
        return language_score(z_img, self.text_embeddings_, self.sigma_image_, self.config.language_score)

    def _gradcam(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 5: Grad-CAM of ||z_v - z_t||^2 w.r.t. the last stage's activations, on that stage's grid.

        Only the path from the activations A to the score is differentiated, so frozen encoders work too.
        """
        m = self.model_
        with torch.no_grad():
            h1, h2 = m.stage_features(x, tuned=True)
        with torch.enable_grad():
            h2 = h2.detach().requires_grad_(True)
            z = m.project(m.combine(h1, h2))
            z_img = F.normalize(z.mean(dim=(2, 3)), dim=-1)
            dist = ((z_img - self.text_embeddings_[0]) ** 2).sum(1)
            cam = grad_cam(dist, h2)
        return cam.detach()

    # -- capabilities (clad.detectors.capabilities) -------------------------------------------------------
    def gradcam(self, images, batch_size: int = 16) -> list[np.ndarray]:
        """Eq. 5 maps, one (H_i, W_i) per image: those of ``localization="gradcam"``, whatever the setting."""
        self._check_fitted()
        cfg, images = self.config, list(images)
        out = []
        for start in range(0, len(images), batch_size):
            arrays, shapes = load_batch(images[start : start + batch_size])
            x = self.model_.backbone.preprocess(arrays, cfg.image_size)
            out += smooth_maps(self._gradcam(x), cfg.image_size, cfg.map_sigma, shapes)
        return out

    @torch.no_grad()
    def embed_texts(self, texts) -> torch.Tensor:
        """Descriptions -> (N, D) L2-normalised embeddings in the shared space."""
        self._check_fitted()
        return self.model_.embed_texts(list(texts))

    @torch.no_grad()
    def embed_patches(self, images) -> torch.Tensor:
        """Images -> (B, D, h, w) L2-normalised patch embeddings in the shared space (working grid)."""
        self._check_fitted()
        arrays, _ = load_batch(images)
        x = self.model_.backbone.preprocess(arrays, self.config.image_size)
        return self._maps(x, need_memory=False)[2]

    def trained_descriptions(self) -> list[tuple[str, str]]:
        """The (class, description) pairs the shared space was trained with."""
        self._check_fitted()
        return list(self.model_.prompts)

    # -- state --------------------------------------------------------------------------------------------
    def _get_state(self):
        m = self.model_
        t = {f"heads.{k}": v for k, v in m.heads.state_dict().items()}
        if m.tail is not None:
            t.update({f"tail.{k}": v for k, v in m.tail.state_dict().items()})
        trainable = {id(p) for p in m.text_trainable}
        t.update({f"text.{k}": v for k, v in m.text.named_parameters() if id(v) in trainable})
        t.update(text_embeddings=self.text_embeddings_, sigma=self.sigma_, sigma_image=self.sigma_image_,
                 memory_bank=self.memory_bank_, scale_lang=self.scale_lang_, scale_mem=self.scale_mem_)
        return t, {"classes": m.classes, "prompts": m.prompts, "aux_types": self.aux_types_,
                   "self_check": self.self_check_, "language_weight": self.language_weight_}

    def _set_state(self, tensors, meta):
        m = self.model_ = CLADModel(self.config)
        m.heads.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("heads.")})
        if m.tail is not None:
            m.tail.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("tail.")})
        text_state = {k[5:]: v for k, v in tensors.items() if k.startswith("text.")}
        missing = set(text_state) - {k for k, _ in m.text.named_parameters()}
        if missing:
            raise KeyError(f"text encoder has no parameters {sorted(missing)[:3]}")
        m.text.load_state_dict(text_state, strict=False)
        m.train(False)
        for name in ("text_embeddings", "sigma", "sigma_image", "memory_bank", "scale_lang", "scale_mem"):
            setattr(self, f"{name}_", tensors[name])
        self.index_ = None
        m.classes = list(meta["classes"])
        m.prompts = [tuple(p) for p in meta["prompts"]]
        self.aux_types_ = list(meta.get("aux_types", []))
        self.self_check_ = meta.get("self_check")
        self.language_weight_ = float(meta.get("language_weight", 0.5))
        if "language_weight" not in meta:  # saved before the self-check: it predicts as it did then
            self.config.language_score = "normal"


class CLADPlus(CLAD):
    """CLAD+ : CLAD fused with a few-shot patch memory of the references (beyond the paper)."""

    Config = CLADPlusConfig
