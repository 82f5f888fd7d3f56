"""What every detector shares: typed config, batched prediction, save/load as JSON + safetensors."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clad.errors import ConfigError
from tqdm.auto import tqdm
from clad.types import AnomalyResult, ImageLike

FORMAT = "clad-detector"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
STATE_FILE = "model.safetensors"


def make_config(config_cls: type, params: dict[str, Any], owner: str):
    """Build a config dataclass, with an error that names any unknown key."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ConfigError(f"{owner}: unknown parameter(s) {unknown}; valid: {sorted(names)}")
    return config_cls(**params)


class Detector:
    """Base of all detectors, estimator-style.

    ``__init__`` only stores the settings (a ``Config`` dataclass); ``fit(normal_images)`` returns ``self``;
    fitted state ends in ``_``; ``predict(images)`` returns one ``AnomalyResult``.
    Subclasses implement ``_fit``, ``_predict_batch``, ``_get_state`` and ``_set_state``.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    #: Config fields that only change prediction, not what ``fit`` learns: detectors of one ``family`` that differ
    #: only in these can share one fit (``fit_signature``, ``adopt``), e.g. ``clad`` and ``clad_plus``.
    inference_params: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""  # default: the registry name
    # Capabilities (``clad.detectors.capabilities``): the image score is the map's maximum (so an image threshold
    # is a map threshold); ``add_references`` adds normal references without a refit.
    score_is_map_max: ClassVar[bool] = False
    can_add_references: ClassVar[bool] = False

    def __init__(self, **params: Any):
        cls = type(self)
        if "name" not in vars(cls):  # built directly, not through the registry: saved models need the name
            from clad.registry import detectors

            cls.name = detectors.name_of(cls) or cls.name
        self.config = make_config(self.Config, params, f"detector {self.name!r}")
        self.threshold_: float | None = None

    # -- public surface -----------------------------------------------------------------------------------
    def fit(self, normal_images: Sequence[ImageLike]) -> "Detector":
        if len(normal_images) == 0:
            raise ValueError(f"{self.name}: fit needs at least one normal image")
        torch.manual_seed(getattr(self.config, "seed", 0))
        self._fit(list(normal_images))
        self.fitted_ = True
        return self

    def predict(self, images: Sequence[ImageLike], batch_size: int = 16, progress: bool = False) -> AnomalyResult:
        """Score images: (B,) scores and one map per image at its own resolution."""
        self._check_fitted()
        images = list(images)
        parts = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc=f"{self.name} predict", unit="batch", disable=not progress, leave=False):
            scores, maps = self._predict_batch(images[start : start + batch_size])
            parts.append(AnomalyResult(np.asarray(scores, np.float32), [np.asarray(m, np.float32) for m in maps]))
        result = AnomalyResult.concat(parts)
        if self.threshold_ is not None:
            result.threshold = float(self.threshold_)
            result.labels = result.scores > self.threshold_
        return result

    def fit_signature(self) -> str:
        """What ``fit`` depends on: the family and every config field but the inference-only ones."""
        cfg = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in self.inference_params}
        return json.dumps([self.family or self.name, cfg], sort_keys=True, default=str)

    def adopt(self, fitted: "Detector") -> "Detector":
        """Take over the fitted state of ``fitted`` instead of fitting: it must have this detector's
        ``fit_signature`` (same family, differing at most in ``inference_params``). Returns self."""
        fitted._check_fitted()
        if fitted.fit_signature() != self.fit_signature():
            raise ValueError(f"{self.name}: cannot adopt the fit of {fitted!r}: it was fitted with other settings")
        self.__dict__.update({k: v for k, v in fitted.__dict__.items() if k.endswith("_")})
        self._after_adopt()
        return self

    def _backbone(self):
        """The backbone named by ``config.backbone``, built on first use and kept as ``backbone_``."""
        if getattr(self, "backbone_", None) is None:
            from clad.registry import create_backbone

            # Built outside inference mode even when first needed inside it (a loaded model's predict): its
            # weights must stay ordinary tensors, which later training and the fused inference path rely on.
            with torch.inference_mode(False):
                self.backbone_ = create_backbone(self.config.backbone)
        return self.backbone_

    def _after_adopt(self) -> None:
        """Hook: redo what depends on the inference parameters (e.g. a calibrated threshold)."""

    def set_threshold(self, threshold: float | None) -> "Detector":
        self.threshold_ = None if threshold is None else float(threshold)
        return self

    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` (settings + small fitted metadata) and ``model.safetensors`` (tensors)."""
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, meta = self._get_state()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(directory / STATE_FILE))
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "detector": self.name,
            "params": dataclasses.asdict(self.config),
            "threshold": self.threshold_,
            "meta": meta,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True))
        return directory

    # -- to implement ------------------------------------------------------------------------------------
    def _fit(self, images: list[ImageLike]) -> None:
        raise NotImplementedError

    def _predict_batch(self, images: list[ImageLike]) -> tuple[np.ndarray, list[np.ndarray]]:
        raise NotImplementedError

    def _get_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        raise NotImplementedError

    def _set_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise RuntimeError(f"{self.name}: call fit(normal_images) (or load_detector) before this")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.config).items())
        return f"{type(self).__name__}({params})"


def load_detector(directory: str | Path) -> Detector:
    """Load a detector saved by ``Detector.save``. Reads JSON and safetensors only: no pickle ever runs."""
    from clad.registry import detector_class

    directory = Path(directory)
    cfg_path, state_path = directory / CONFIG_FILE, directory / STATE_FILE
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such model folder")
    for p in (cfg_path, state_path):
        if not p.is_file():
            raise ConfigError(f"{p}: missing (a saved model is a folder with {CONFIG_FILE} and {STATE_FILE})")
    try:
        doc = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{cfg_path}: not a clad model file (missing \"format\": \"{FORMAT}\")")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{cfg_path}: format_version {doc.get('format_version')!r}, this clad reads {FORMAT_VERSION}")
    for key in ("detector", "params", "meta"):
        if key not in doc:
            raise ConfigError(f"{cfg_path}: missing key {key!r}")
    try:
        cls = detector_class(doc["detector"])
    except KeyError as e:
        raise ConfigError(f"{cfg_path}: {e.args[0]}") from e
    try:
        det = cls(**doc["params"])
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{cfg_path}: {e}") from e
    try:
        tensors = load_file(str(state_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{state_path}: not a valid safetensors file ({e})") from e
    try:
        det._set_state(tensors, doc["meta"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise ConfigError(f"{state_path}: does not match {cfg_path.name} ({type(e).__name__}: {e})") from e
    det.threshold_ = doc.get("threshold")
    det.fitted_ = True
    return det
