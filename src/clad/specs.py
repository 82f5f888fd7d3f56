"""The one parser of what users type: ``key=value`` parameters, shots, dataset specs and detector specs.

The CLI and the bench both parse through here, and both resolve a detector's parameters with
``detector_params`` (the run's seed, category and auxiliary data go to the detectors whose config has them).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from clad.errors import SpecError


def split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets and quotes, so JSON values such as ``[1,2]`` stay whole."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true, null, lists), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_params(items: Sequence[str] | None, what: str = "--param") -> dict[str, Any]:
    """``["k=1", "name=x"]`` -> ``{"k": 1, "name": "x"}``; a key given twice or a pair without ``=`` is an error."""
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SpecError(f"{what}: expected key=value, got {item!r}")
        if key in params:
            raise SpecError(f"{what}: parameter {key!r} given twice")
        params[key] = parse_value(value.strip())
    return params


# ------------------------------------------------------------------------------------------------- shots


def parse_shot(item: Any) -> int | None:
    """``"4"`` -> 4, ``"all"`` (or None) -> None: every reference image; ``"0"`` -> 0: none (zero-shot)."""
    if item is None or str(item).strip().lower() == "all":
        return None
    try:
        n = int(str(item).strip())
    except ValueError:
        raise SpecError(f"--shots: expected 0 (zero-shot), a positive integer or 'all', got {item!r}") from None
    if n < 0:
        raise SpecError(f"--shots: must be >= 0 (0: zero-shot), got {n}")
    return n


def parse_shots(text: str | Sequence) -> list[int | None]:
    """``1,2,4,all`` -> [1, 2, 4, None]."""
    items = split_top(text, ",") if isinstance(text, str) else list(text)
    if not items:
        raise SpecError("--shots: no value given")
    return [parse_shot(item) for item in items]


def shots_text(shots: int | None) -> str:
    return "all" if shots is None else str(shots)


def shots_order(text: str) -> float:
    """Sort key of a shots text: the numbers in order, ``all`` last."""
    n = parse_shot(text)
    return math.inf if n is None else n


# ------------------------------------------------------------------------------------------------ datasets


def dataset_schemes() -> tuple[str, ...]:
    """The registered dataset schemes (``mvtec``, ``visa``, ``folder`` and any plugin's)."""
    from clad.registry import datasets

    return tuple(datasets.names())


def split_data_spec(spec: str) -> tuple[str, list[str]]:
    """``"folder:GOOD,DEFECT"`` -> ``("folder", ["GOOD", "DEFECT"])``; the scheme must be a known one."""
    scheme, sep, rest = str(spec).partition(":")
    scheme = scheme.strip().lower()
    schemes = dataset_schemes()
    if not sep or scheme not in schemes or not rest.strip():
        raise SpecError(
            f"unknown dataset spec {spec!r}; expected one of: mvtec:ROOT, visa:ROOT, "
            f"folder:GOOD_DIR[,DEFECT_DIR[,MASK_DIR]] (schemes: {', '.join(schemes)})"
        )
    return scheme, [p.strip() for p in rest.split(",")]


def parse_data_specs(text: str | Sequence[str]) -> list[str]:
    """``mvtec:ROOT,visa:ROOT,folder:GOOD,DEFECT,MASKS`` -> one spec per dataset, paths made absolute.

    A comma starts a new dataset only when the next piece begins with a scheme (``mvtec:``, ``visa:``,
    ``folder:``); otherwise it belongs to the folder spec before it.
    """
    schemes = dataset_schemes()
    pieces = split_top(text, ",") if isinstance(text, str) else list(text)
    specs: list[list[str]] = []
    for piece in pieces:
        scheme = piece.partition(":")[0].strip().lower()
        if scheme in schemes:
            specs.append([piece])
        elif specs and specs[-1][0].lower().startswith("folder:"):
            specs[-1].append(piece)
        else:
            raise SpecError(f"--data: {piece!r} does not start with one of {', '.join(s + ':' for s in schemes)}")
    out = []
    for parts in specs:
        scheme, _, first = parts[0].partition(":")
        paths = [first] + parts[1:]
        out.append(f"{scheme.lower()}:" + ",".join(str(Path(p).expanduser().resolve()) for p in paths))
    if not out:
        raise SpecError("--data: no dataset given")
    return out


def dataset_name(spec: str) -> str:
    """Short display name: ``mvtec:mvtec_ad``, ``visa:VisA``, ``folder:good``."""
    scheme, _, rest = spec.partition(":")
    return f"{scheme}:{Path(rest.split(',')[0]).name}"


# ----------------------------------------------------------------------------------------------- detectors


@dataclass(frozen=True)
class DetectorSpec:
    """One entry of ``--detectors``: a registry name, parameters, and the label used in the tables."""

    name: str
    params: dict = field(default_factory=dict)
    label: str = ""

    @property
    def is_plain(self) -> bool:
        """True for the registry detector with its defaults (the one the paper's numbers describe)."""
        return not self.params and self.label == self.name


_SPEC_RE = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*(?:\[(?P<params>.*)\])?\s*(?:@(?P<label>[^\s@\[\],]+))?$")


def parse_detector_spec(text: str) -> DetectorSpec:
    """``NAME[key=value;key=value]@LABEL`` -> DetectorSpec; the parameters and the label are optional.

    Values are JSON when they parse as JSON, else strings. Without a label, the label is the spec text itself.
    """
    text = text.strip()
    m = _SPEC_RE.match(text)
    if not m:
        raise SpecError(f"detector spec {text!r}: expected NAME[key=value;key=value]@LABEL")
    params = parse_params(split_top(m["params"] or "", ";"), what=f"detector spec {text!r}")
    label = m["label"] or (text.split("@")[0].replace(" ", "") if params else m["name"])
    return DetectorSpec(m["name"], params, label)


def parse_detector_specs(text: str | Sequence[str]) -> list[DetectorSpec]:
    """A comma-separated ``--detectors`` value (commas inside brackets do not split) -> specs, labels unique."""
    items = split_top(text, ",") if isinstance(text, str) else list(text)
    specs = [s if isinstance(s, DetectorSpec) else parse_detector_spec(s) for s in items]
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise SpecError(f"--detectors: label(s) {dupes} used twice; give each variant its own @LABEL")
    if not specs:
        raise SpecError("--detectors: no detector given")
    return specs


def _config_fields(name: str) -> set[str]:
    from clad.registry import detector_class

    return {f.name for f in dataclasses.fields(detector_class(name).Config)}


def takes(name: str, param: str) -> bool:
    """Whether detector ``name`` has the config parameter ``param``."""
    return param in _config_fields(name)


def detector_params(name: str, params: dict, *, seed: int | None = None, category: str | None = None,
                    aux: str | None = None, shots: int | None = None) -> dict:
    """The parameters detector ``name`` is built with: ``params``, plus the run's seed, category and auxiliary
    data where its config has those fields and ``params`` does not set them. ``aux`` on a detector without the
    field is an error (it would be silently ignored otherwise). ``shots=0`` (no reference image) sets
    ``few_shot=False`` on a detector that has the field (WinCLIP: zero-shot) and is an error on any other."""
    fields = _config_fields(name)
    out = dict(params)
    if shots == 0:
        if "few_shot" not in fields:
            raise SpecError(f"--shots 0: detector {name!r} needs reference images; only a zero-shot detector "
                            "(winclip) fits without any")
        if out.setdefault("few_shot", False):
            raise SpecError(f"--shots 0: detector {name!r} has few_shot=True, which needs reference images")
    for key, value in (("seed", seed), ("category", category)):
        if value is not None and key in fields:
            out.setdefault(key, value)
    if aux is not None:
        if "aux" not in fields:
            raise SpecError(f"--aux: detector {name!r} does not train on auxiliary data")
        out.setdefault("aux", aux)
    return out


def with_aux(specs: list[DetectorSpec], aux: str) -> list[DetectorSpec]:
    """The specs with ``aux`` (one dataset spec, made absolute) set on every detector that has the parameter."""
    auxes = parse_data_specs(aux)
    if len(auxes) != 1:
        raise SpecError(f"--aux: expected one dataset spec, got {len(auxes)}")
    out = [dataclasses.replace(s, params={**s.params, "aux": auxes[0]})
           if takes(s.name, "aux") and "aux" not in s.params else s for s in specs]
    if all(o is s for o, s in zip(out, specs)):
        raise SpecError(f"--aux: none of the detectors {[s.label for s in specs]} trains on auxiliary data")
    return out


# ------------------------------------------------------------------------------------------- plain values


def parse_int(text: Any, low: int | None = None) -> int:
    """An integer (``low``: the least allowed), e.g. a batch size; SpecError naming the value otherwise."""
    bound = "" if low is None else f" >= {low}"
    try:
        value = int(str(text).strip())
    except ValueError:
        raise SpecError(f"expected an integer{bound}, got {text!r}") from None
    if low is not None and value < low:
        raise SpecError(f"must be{bound}, got {value}")
    return value


def parse_number(text: Any) -> float:
    """A finite number, e.g. a threshold (``nan`` and ``inf`` are refused)."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise SpecError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise SpecError(f"must be a finite number, got {text!r}")
    return value


def argument_type(parse, *args):
    """``parse`` (one of the parsers here) as an argparse ``type=``: its SpecError becomes argparse's error line."""
    import argparse

    def convert(text: str):
        try:
            return parse(text, *args)
        except SpecError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert
