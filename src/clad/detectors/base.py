"""What every detector shares: typed config, batched prediction, save/load as JSON + safetensors."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import types
import typing
import warnings
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors, save as dump_tensors

from clad.errors import ConfigError, TeachingError
from tqdm.auto import tqdm
from clad.types import AnomalyResult, ImageLike

FORMAT = "clad-detector"
# 2: config.json also records the tensors' names, shapes and dtypes, the sha256 of model.safetensors and the sha256
# of the params and meta the state was fitted with. Version 1 (before these) still loads, unverified, with a warning.
FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
STATE_FILE = "model.safetensors"
_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])$")


def bounded(default: Any, interval: str, **metadata: Any):
    """A config field whose value must lie in ``interval``, e.g. ``"[1, inf)"`` or ``"(0, 1]"`` (checked by
    ``make_config``; None passes where the type allows it)."""
    return dataclasses.field(default=default, metadata={"range": interval, **metadata})


def _is_type(value: Any, tp: Any) -> bool:
    """Whether a JSON-like ``value`` fits the annotation ``tp``: bool is not an int here, an int is a float, a
    float must be finite, a list is a tuple."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_type(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool or isinstance(value, bool):
        return tp is bool and isinstance(value, bool)
    if tp is float:
        return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_is_type, value, args))
        return not args or all(_is_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_is_type(k, args[0]) and _is_type(v, args[1]) for k, v in value.items())
    if origin is typing.Literal:
        return value in args
    return isinstance(value, origin or tp)


def parse_interval(text: str) -> tuple[float, float, bool, bool]:
    """``"(0, 1]"`` -> (0.0, 1.0, True, False): the bounds, and whether each is open."""
    m = _INTERVAL.match(text)
    if m is None:
        raise ValueError(f"bad range {text!r}; expected e.g. '[1, inf)' or '(0, 1]'")
    return float(m[2]), float(m[3]), m[1] == "(", m[4] == ")"


def _range_problem(value: Any, interval: str) -> str | None:
    """None when ``value`` (a number, or None) lies in ``interval``, else what it must be."""
    lo, hi, lo_open, hi_open = parse_interval(interval)
    if value is None or ((value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)):
        return None
    if math.isinf(hi):
        return f"must be {'>' if lo_open else '>='} {lo:g}"
    return f"must be in {interval}"


def make_config(config_cls: type, params: dict[str, Any], owner: str):
    """Build a config dataclass from ``params``. Unknown keys, values of the wrong type (from the field's
    annotation) and values outside the field's ``range`` metadata (``bounded``) are ConfigErrors naming the key."""
    fields = dataclasses.fields(config_cls)
    unknown = sorted(set(params) - {f.name for f in fields})
    if unknown:
        raise ConfigError(f"{owner}: unknown parameter(s) {unknown}; valid: {sorted(f.name for f in fields)}")
    hints = typing.get_type_hints(config_cls)
    for f in fields:
        if f.name not in params:
            continue
        value = params[f.name]
        if not _is_type(value, hints[f.name]):
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            raise ConfigError(f"{owner}: parameter {f.name!r} must be {kind}, got {value!r}")
        problem = "range" in f.metadata and _range_problem(value, f.metadata["range"])
        if problem:
            raise ConfigError(f"{owner}: parameter {f.name!r} {problem}, got {value!r}")
    try:
        return config_cls(**params)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # the config's own checks (__post_init__)
        raise ConfigError(f"{owner}: {e}") from e


def _plain(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), so a digest of it matches the file's."""
    return json.loads(json.dumps(obj))


def _fit_digest(params: Any, meta: Any) -> str:
    """sha256 of the params and meta a state was fitted with, as they read from ``config.json``."""
    return hashlib.sha256(json.dumps([params, meta], sort_keys=True).encode()).hexdigest()


def _tensor_specs(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """{name: {"shape": [...], "dtype": "float32"}}, as ``config.json`` records them."""
    return {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for k, t in sorted(tensors.items())}


def _non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    return next((k for k, t in sorted(tensors.items()) if t.is_floating_point() and not torch.isfinite(t).all()), None)


def _is_threshold(value: Any) -> bool:
    return _is_type(value, float | None)


# Where a saved model keeps what teaching (``add_references``) needs besides the detector's own state: the sample of
# references for the threshold's views, and how many references it has learned from.
TEACHING_TENSOR, TEACHING_META = "teaching.references", "teaching"
THRESHOLD_SOURCES = ("references", "user")  # where ``threshold_`` came from: fit's label-free rule, or set_threshold


def _write_folder(directory: Path, files: dict[str, bytes]) -> None:
    """Make ``files`` the whole content of ``directory``: written into a new folder beside it, then renamed into
    place, so an error or a crash part-way leaves any old model as it was. An existing ``directory`` must hold
    nothing but a saved model. It is renamed aside for the swap: a crash between the two renames leaves the old
    model in ``.NAME.old-*`` beside it. Folders and files get the ordinary modes (0o777 / 0o666 less the umask)."""
    directory = Path(os.path.abspath(directory))  # "." or "m/." have no name to put beside
    if directory.exists():
        if not directory.is_dir():
            raise ConfigError(f"{directory}: exists and is not a folder")
        others = sorted(p.name for p in directory.iterdir() if p.name not in files)
        if others:
            raise ConfigError(f"{directory}: holds files that are not part of a saved model ({', '.join(others[:3])}"
                              f"{', ...' if len(others) > 3 else ''}); not replacing it, choose another folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    new, old = (directory.parent / f".{directory.name}.{kind}-{tag}" for kind in ("saving", "old"))
    os.mkdir(new)  # not tempfile.mkdtemp: its 0o700 would stay on the renamed model folder
    try:
        for name, data in files.items():
            with open(new / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())  # on disk before the rename makes it the model
        if directory.exists():
            os.rename(directory, old)
            try:
                os.rename(new, directory)
            except BaseException:
                os.rename(old, directory)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(new, directory)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    try:  # make the renames durable too
        fd = os.open(directory.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the files themselves are synced


def apply_threshold(result: AnomalyResult, threshold: float | None, scale: float | None) -> AnomalyResult:
    """``result`` with its decision: the threshold, the labels (scores > threshold) and, with a ``scale``, the
    normalised scores (``thresholds.normalize``); unchanged without a threshold."""
    if threshold is not None:
        result.threshold = float(threshold)
        result.labels = result.scores > threshold
        if scale is not None:
            from clad.detectors.thresholds import normalize

            result.normalized_scores = normalize(result.scores, threshold, scale)
    return result


class Detector:
    """Base of all detectors, estimator-style.

    ``__init__`` only stores the settings (a ``Config`` dataclass); ``fit(normal_images)`` returns ``self``;
    fitted state ends in ``_``; ``predict(images)`` returns one ``AnomalyResult``.
    Subclasses implement ``_fit``, ``_predict_batch``, ``_get_state`` and ``_set_state``.

    ``fit`` also sets the label-free decision threshold ``threshold_`` (``threshold_source_`` "references") and
    the scale of the normalised score ``threshold_scale_`` from views of the references (``clad.detectors
    .thresholds``); ``set_threshold`` overrides the threshold (source "user").

    A detector that declares ``can_add_references`` implements ``_add_references``; ``add_references`` then
    teaches it more normal images without a refit, and it keeps (and saves) ``references_``, a sample of its
    references at the working size, from which the threshold is set again after teaching.
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
    fits_without_references: ClassVar[bool] = False  # zero-shot: ``fit([])`` sets it up (no references, no threshold)

    def __init__(self, **params: Any):
        cls = type(self)
        if "name" not in vars(cls):  # built directly, not through the registry: saved models need the name
            from clad.registry import detectors

            cls.name = detectors.name_of(cls) or cls.name
        self.config = make_config(self.Config, params, f"detector {self.name!r}")
        self.threshold_: float | None = None
        self.threshold_source_: str | None = None  # one of THRESHOLD_SOURCES when a threshold is set
        self.threshold_scale_: float | None = None  # of the normalised score (``thresholds.normalize``)

    # -- public surface -----------------------------------------------------------------------------------
    def fit(self, normal_images: Sequence[ImageLike]) -> "Detector":
        if len(normal_images) == 0 and not self.fits_without_references:
            raise ValueError(f"{self.name}: fit needs at least one normal image")
        torch.manual_seed(getattr(self.config, "seed", 0))
        images = list(normal_images)
        self._fit(images)
        self.fitted_ = True
        if not images:  # zero-shot: nothing to keep nor to set a threshold from
            return self
        from clad.data.io import load_batch

        arrays, _ = load_batch(images)
        if self.can_add_references:
            self.references_, self.n_references_ = None, 0
            self._keep_references(arrays)
        self._calibrate_threshold(arrays)
        return self

    def add_references(self, images: Sequence[ImageLike]) -> "Detector":
        """Teach the detector more normal images without a refit: they join its references (for a memory, its
        memory and search index; for PaDiM, its Gaussians), and a threshold set from the references
        (``threshold_source_`` "references") is set again from views of them all; a user's threshold stays.

        Accepts what ``predict`` accepts, with the same errors for an image that cannot be used; a detector that
        cannot be taught (``can_add_references`` False, not fitted, saved without what teaching needs) or an empty
        list raises ``TeachingError``. On any error the detector is left as it was. Returns self.
        """
        if not self.can_add_references:
            raise TeachingError(f"{self.name}: cannot add references without a refit (can_add_references is "
                                f"False); fit it again on all the references instead")
        if not getattr(self, "fitted_", False):
            raise TeachingError(f"{self.name}: not fitted: fit(normal_images) (or load_detector) before "
                                "add_references")
        if getattr(self, "references_", None) is None:
            raise TeachingError(f"{self.name}: this model was saved without what teaching needs (by a clad before "
                                "add_references); fit it again to teach it")
        images = list(images)
        if not images:
            raise TeachingError(f"{self.name}: add_references needs at least one image")
        from clad.data.io import load_batch

        arrays, _ = load_batch(images)  # every image decoded before anything changes
        before = dict(self.__dict__)  # fitted tensors are replaced by teaching, never changed in place
        try:
            self._add_references(arrays)
            self._keep_references(arrays)
            if self.threshold_source_ == "references":
                self._calibrate_threshold([r.numpy() for r in self.references_])
            else:  # no longer the references' views: ``adopt`` keeps this threshold
                self.threshold_views_ = None
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise
        return self

    def _keep_references(self, arrays: list[np.ndarray]) -> None:
        """Update ``references_`` (R, S, S, 3) uint8 and ``n_references_`` with ``arrays``: the sample of the
        references that the threshold's views are drawn from (``thresholds.keep_references``)."""
        from clad.detectors.thresholds import keep_references

        kept = [] if self.references_ is None else list(self.references_.numpy())
        kept = keep_references(kept, self.n_references_, self._view_sources(arrays), self._view_size(),
                               getattr(self.config, "seed", 0))
        self.references_ = torch.from_numpy(np.stack(kept))
        self.n_references_ += len(arrays)

    def predict(self, images: Sequence[ImageLike], batch_size: int = 16, progress: bool = False) -> AnomalyResult:
        """Score images: (B,) scores and one map per image at its own resolution."""
        self._check_fitted()
        images = list(images)
        parts = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc=f"{self.name} predict", unit="batch", disable=not progress, leave=False):
            scores, maps = self._predict_batch(images[start : start + batch_size])
            parts.append(AnomalyResult(np.asarray(scores, np.float32), [np.asarray(m, np.float32) for m in maps]))
        return apply_threshold(AnomalyResult.concat(parts), self.threshold_, self.threshold_scale_)

    def fit_report(self) -> dict:
        """What the fit found that a user should see beside the scores (e.g. CLAD's self-check); JSON-ready, empty
        by default. ``clad fit`` prints it and ``clad bench`` records it."""
        return {}

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
                backbone = create_backbone(self.config.backbone)
            _check_layers(self, backbone)
            self.backbone_ = backbone
        return self.backbone_

    def _after_adopt(self) -> None:
        """Hook: redo what depends on the inference parameters; by default the threshold, from the views kept at
        fit (a loaded detector has none: it keeps its threshold)."""
        if getattr(self, "threshold_views_", None) is not None:
            self._threshold_from_views()

    # -- the label-free threshold ------------------------------------------------------------------------
    def _view_size(self) -> int:
        """The side of the threshold's views: the working size."""
        return getattr(self.config, "image_size", None) or 256

    def _view_sources(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Hook: what the threshold's views are resized from (``_view_size`` squares); by default the references."""
        return arrays

    def _calibrate_threshold(self, images: list[ImageLike]) -> None:
        """Set ``threshold_`` and ``threshold_scale_`` from views of the references (``thresholds.views``)."""
        # Imported here, as in ``predict``: listing the registries loads no other module of clad.detectors or data.
        from clad.data.io import load_batch
        from clad.detectors.thresholds import views

        arrays, _ = load_batch(images)  # decoded already by fit: no copy
        # kept (not saved) so that ``adopt`` can redo the threshold for other inference parameters
        self.threshold_views_ = views(self._view_sources(arrays), self._view_size(), getattr(self.config, "seed", 0))
        self._threshold_from_views()

    def _threshold_from_views(self) -> None:
        from clad.detectors.thresholds import cut, spread_scale

        normal, anomalous = self.threshold_views_
        scores = np.asarray(self._view_scores(normal + anomalous), np.float64)
        if not np.isfinite(scores).all():
            warnings.warn(f"{self.name}: NaN or inf scores on views of the references: no threshold set", stacklevel=3)
            self.threshold_ = self.threshold_scale_ = self.threshold_source_ = None
            return
        normal_scores, anomalous_scores = scores[: len(normal)], scores[len(normal) :]
        self.threshold_ = cut(normal_scores, anomalous_scores)
        self.threshold_scale_ = spread_scale(normal_scores, anomalous_scores)
        self.threshold_source_ = "references"

    def _view_scores(self, views: list[np.ndarray]) -> np.ndarray:
        """Hook: the image scores of the threshold's views, (len(views),); by default those of ``predict``."""
        return self.predict(views).scores

    def set_threshold(self, threshold: float | None) -> "Detector":
        """Decide with ``threshold`` instead (source "user"; None: no decision). The normalised score keeps its
        scale and is centred on the new threshold."""
        self.threshold_ = None if threshold is None else float(threshold)
        self.threshold_source_ = None if threshold is None else "user"
        return self

    def save(self, directory: str | Path) -> Path:
        """Write the folder ``directory`` with ``config.json`` (settings, small fitted metadata, the tensors' names,
        shapes and dtypes, checksums) and ``model.safetensors`` (tensors), atomically: see ``_write_folder``.
        A state holding NaN or inf, or a threshold that is not a finite number, is refused (ConfigError)."""
        self._check_fitted()
        directory = Path(directory)
        tensors, meta = self._get_state()
        if self.can_add_references and getattr(self, "references_", None) is not None:  # for ``add_references``
            tensors = {**tensors, TEACHING_TENSOR: self.references_}
            meta = {**meta, TEACHING_META: {"n_references": self.n_references_}}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        bad = _non_finite(tensors)
        if bad is not None:
            raise ConfigError(f"{self.name}: cannot save {directory}: tensor {bad!r} holds NaN or inf")
        if not _is_threshold(self.threshold_):
            raise ConfigError(f"{self.name}: cannot save {directory}: threshold {self.threshold_!r} is not finite")
        problem = _threshold_extras_problem(self.threshold_source_, self.threshold_scale_)
        if problem:
            raise ConfigError(f"{self.name}: cannot save {directory}: {problem}")
        state = dump_tensors(tensors)
        params, meta = _plain(dataclasses.asdict(self.config)), _plain(meta)
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "detector": self.name,
            "params": params,
            "threshold": self.threshold_,
            "threshold_source": self.threshold_source_,
            "threshold_scale": self.threshold_scale_,
            "meta": meta,
            "tensors": _tensor_specs(tensors),
            "sha256": hashlib.sha256(state).hexdigest(),
            "fit_sha256": _fit_digest(params, meta),
        }
        config = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False).encode()
        _write_folder(directory, {STATE_FILE: state, CONFIG_FILE: config})
        return directory

    # -- to implement ------------------------------------------------------------------------------------
    def _fit(self, images: list[ImageLike]) -> None:
        raise NotImplementedError

    def _predict_batch(self, images: list[ImageLike]) -> tuple[np.ndarray, list[np.ndarray]]:
        raise NotImplementedError

    def _add_references(self, arrays: list[np.ndarray]) -> None:
        """Learn the normal (H, W, 3) uint8 ``arrays`` too (with ``can_add_references``): replace the fitted
        tensors that change (never change them in place: ``add_references`` restores them on an error)."""
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
    """Load a detector saved by ``Detector.save``. Reads JSON and safetensors only: no pickle ever runs.

    Checks that the two files are intact and belong together: the format, the detector, its params (types and
    ranges, as when creating it), the threshold (a finite number or null), the tensors' names, shapes and dtypes,
    the sha256 of ``model.safetensors``, that every float tensor is finite, and that params and meta are those the
    state was fitted with (only the threshold may be edited). Each failure is one ConfigError naming the file
    and the problem. A version-1 model (saved before the checksums) loads with a warning that it is unverified.
    """
    from clad.registry import detector_class

    directory = Path(directory)
    cfg_path, state_path = directory / CONFIG_FILE, directory / STATE_FILE
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such model folder")
    for p in (cfg_path, state_path):
        if not p.is_file():
            raise ConfigError(f"{p}: missing (a saved model is a folder with {CONFIG_FILE} and {STATE_FILE})")
    doc = _read_config(cfg_path)
    try:
        cls = detector_class(doc["detector"])
    except KeyError as e:
        raise ConfigError(f"{cfg_path}: {e.args[0]}") from e
    try:
        det = cls(**doc["params"])
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{cfg_path}: {e}") from e
    verified = doc["format_version"] >= 2
    if verified and doc["fit_sha256"] != _fit_digest(doc["params"], doc["meta"]):
        raise ConfigError(f"{cfg_path}: params or meta differ from those the model was fitted with (fit_sha256); "
                          "only the threshold may be edited: refit to change the others")
    if not verified:
        warnings.warn(f"{cfg_path}: a format-1 model, saved without checksums: its files are not verified "
                      "(load and save it again to add them)", stacklevel=2)
    tensors = _read_state(state_path, doc if verified else None)
    meta = dict(doc["meta"])
    teaching, references = meta.pop(TEACHING_META, None), tensors.pop(TEACHING_TENSOR, None)
    try:
        det._set_state(tensors, meta)
        if (teaching is None) != (references is None):
            raise ValueError(f"{TEACHING_META!r} in meta and tensor {TEACHING_TENSOR!r} go together")
        if teaching is not None:
            det.references_, det.n_references_ = _teaching_state(references, teaching)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ConfigError(f"{state_path}: does not match {cfg_path.name} ({type(e).__name__}: {e})") from e
    det.threshold_ = None if doc.get("threshold") is None else float(doc["threshold"])
    det.threshold_source_ = doc.get("threshold_source")
    det.threshold_scale_ = None if doc.get("threshold_scale") is None else float(doc["threshold_scale"])
    det.fitted_ = True
    if getattr(det.config, "layers", None) or getattr(det.config, "grid_layer", None):
        try:  # the layers it names must be its backbone's (a hand-edited config may name others)
            det._backbone()
        except ConfigError as e:
            raise ConfigError(f"{cfg_path}: {e}") from e
    if not verified:
        _probe(det, cfg_path)
    return det


def _teaching_state(references: torch.Tensor, teaching: Any) -> tuple[torch.Tensor, int]:
    """(``references_``, ``n_references_``) of a saved model, checked."""
    n = teaching.get("n_references") if isinstance(teaching, dict) else None
    if references.dtype != torch.uint8 or references.dim() != 4 or references.shape[-1] != 3:
        raise ValueError(f"tensor {TEACHING_TENSOR!r} must be (R, S, S, 3) uint8, got {tuple(references.shape)} "
                         f"{references.dtype}")
    if type(n) is not int or not 1 <= len(references) <= n:
        raise ValueError(f"{TEACHING_META}.n_references must be an int >= the {len(references)} references kept, "
                         f"got {n!r}")
    return references, n


def _check_layers(det: Detector, backbone) -> None:
    """The layers a detector's config names (``layers``, ``grid_layer``) must be its backbone's: a ConfigError
    naming them and the backbone's own, not a ValueError deep in the forward."""
    have = [f.name for f in backbone.feature_info]
    named = list(getattr(det.config, "layers", None) or ()) + [getattr(det.config, "grid_layer", None)]
    bad = list(dict.fromkeys(n for n in named if n is not None and n not in have))
    if bad:
        raise ConfigError(f"detector {det.name!r}: layer(s) {bad} not in backbone {det.config.backbone!r} "
                          f"(its layers: {', '.join(have)})")


def _probe(det: Detector, cfg_path: Path) -> None:
    """Predict once on a small grey image, so that an unverified (format-1) model whose params no longer fit its
    state fails at load, as a ConfigError, rather than with a traceback at its first use."""
    from clad.errors import CladError

    try:
        det.predict([np.full((32, 32, 3), 128, np.uint8)])
    except CladError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever an inconsistent model raises
        raise ConfigError(f"{cfg_path}: this format-1 model does not work with its params "
                          f"({type(e).__name__}: {e})") from e


def _read_config(cfg_path: Path) -> dict:
    """``config.json`` parsed, with its keys present and of the right types."""
    try:
        doc = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{cfg_path}: not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{cfg_path}: not a clad model file (missing \"format\": \"{FORMAT}\")")
    version = doc.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise ConfigError(f"{cfg_path}: format_version {version!r}, this clad reads 1 to {FORMAT_VERSION}")
    expected = {"detector": str, "params": dict, "meta": dict}
    checksums = {"tensors": dict, "sha256": str, "fit_sha256": str}
    if version >= 2:
        expected |= checksums
    elif set(checksums) & set(doc):
        raise ConfigError(f"{cfg_path}: format_version 1 with the checksums of format 2 (was format_version edited?)")
    for key, kind in expected.items():
        if key not in doc:
            raise ConfigError(f"{cfg_path}: missing key {key!r}")
        if not isinstance(doc[key], kind):
            raise ConfigError(f"{cfg_path}: {key!r} must be a {'JSON object' if kind is dict else 'string'}, "
                              f"got {doc[key]!r:.80}")
    if not _is_threshold(doc.get("threshold")):
        raise ConfigError(f"{cfg_path}: threshold must be a finite number or null, got {doc['threshold']!r:.80}")
    problem = _threshold_extras_problem(doc.get("threshold_source"), doc.get("threshold_scale"))
    if problem:
        raise ConfigError(f"{cfg_path}: {problem}")
    return doc


def _threshold_extras_problem(source: Any, scale: Any) -> str | None:
    """None when ``threshold_source`` and ``threshold_scale`` are valid (each may be null), else what is wrong."""
    if source is not None and source not in THRESHOLD_SOURCES:
        return f"threshold_source must be one of {list(THRESHOLD_SOURCES)} or null, got {source!r:.80}"
    if not (_is_type(scale, float | None) and (scale is None or scale > 0)):
        return f"threshold_scale must be a finite number > 0 or null, got {scale!r:.80}"
    return None


def _some(names: list[str], n: int = 3) -> str:
    """``'a', 'b', 'c' and 4 more``."""
    return ", ".join(map(repr, names[:n])) + (f" and {len(names) - n} more" if len(names) > n else "")


def _read_state(state_path: Path, doc: dict | None) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``, checked against ``doc`` (names, shapes, dtypes, sha256) unless None,
    and checked to be finite."""
    try:
        data = state_path.read_bytes()
        tensors = load_tensors(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{state_path}: not a valid safetensors file ({type(e).__name__}: {e})") from e
    if doc is not None:
        found, listed = _tensor_specs(tensors), doc["tensors"]
        if found != listed:
            missing, extra = sorted(set(listed) - set(found)), sorted(set(found) - set(listed))
            parts = [f"lacks {_some(missing)}"] if missing else []
            parts += [f"holds {_some(extra)}, not listed there"] if extra else []
            if not parts:
                name = next(k for k in sorted(found) if found[k] != listed[k])
                parts = [f"tensor {name!r} is {found[name]}, {CONFIG_FILE} says {listed[name]}"]
            what = "; ".join(parts)
            raise ConfigError(f"{state_path}: does not match {CONFIG_FILE}: {what} (the files of two models mixed?)")
        if hashlib.sha256(data).hexdigest() != doc["sha256"]:
            raise ConfigError(f"{state_path}: sha256 differs from the one in {CONFIG_FILE}: the file was changed or "
                              "damaged after saving")
    bad = _non_finite(tensors)
    if bad is not None:
        raise ConfigError(f"{state_path}: tensor {bad!r} holds NaN or inf")
    return tensors
