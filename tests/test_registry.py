"""Registries: the generic Registry, the built-ins, entry-point plugins, and imports that flow one way."""
from __future__ import annotations

import ast
import graphlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clad import registry
from clad.cli import main
from clad.data import DatasetScheme, MVTecAD, make_synthetic_mvtec
from clad.data.io import load_batch
from clad.detectors.base import Detector
from clad.registry import Registry

SRC = Path(__file__).resolve().parents[1] / "src"
ALL = (registry.detectors, registry.backbones, registry.text_encoders, registry.datasets)


# -- the generic registry ---------------------------------------------------------------------------------------
def test_register_get_create_and_errors():
    reg: Registry = Registry("widget", "clad.test_widgets", {})

    @reg.register("double")
    def double(x):
        return 2 * x

    reg.register("triple", lambda x: 3 * x)
    reg.register("double", double)  # the same object again is fine
    assert reg.names() == ["double", "triple"] and "double" in reg and "half" not in reg
    assert reg.get("double") is double and reg.create("triple", 2) == 6
    with pytest.raises(ValueError, match="widget 'double' is already registered"):
        reg.register("double", lambda x: x)
    with pytest.raises(KeyError, match="unknown widget 'half'; available: double, triple"):
        reg.get("half")


def test_a_reference_is_imported_on_first_get_only(tmp_path, monkeypatch):
    (tmp_path / "clad_test_lazy.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry = Registry("thing", "clad.test_things", {"answer": "clad_test_lazy:VALUE"})
    assert reg.names() == ["answer"] and "clad_test_lazy" not in sys.modules
    try:
        assert reg.get("answer") == 42 and "clad_test_lazy" in sys.modules
    finally:
        sys.modules.pop("clad_test_lazy", None)


def test_every_builtin_loads_and_each_detector_carries_its_name():
    for name in registry.list_detectors():
        cls = registry.detector_class(name)
        assert issubclass(cls, Detector) and cls.name == name
    for reg in (registry.backbones, registry.text_encoders):
        assert all(callable(reg.get(name)) for name in reg.names())
    assert all(isinstance(registry.datasets.get(s), DatasetScheme) for s in registry.datasets.names())
    assert {"mvtec", "visa", "folder"} <= set(registry.datasets.names())


def test_a_detector_built_directly_knows_its_registry_name():
    from clad.detectors.clad import CLADPlus

    assert CLADPlus(category="tile").name == "clad_plus"  # not the name of its parent class, CLAD


# -- imports ----------------------------------------------------------------------------------------------------
def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "clad").rglob("*.py"):
        parts = p.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module ``path`` imports, at any depth (functions included); ``from a import b`` counts as ``a.b``
    when that is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
            out |= subs if len(subs) == len(node.names) else subs | {base}
    return out


def test_clad_modules_import_each_other_without_a_circle():
    modules = _modules()
    graph = {m: {i for i in _imports(m, p, modules) if i in modules and i != m} for m, p in modules.items()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import circle: {' -> '.join(e.args[1])}")


def test_ops_import_only_torch_numpy_the_standard_library_and_ops():
    modules = _modules()
    # threadpoolctl: the thread limit of numpy's own BLAS (ops/ivf.py), part of running numpy, not a layer above
    allowed = {"torch", "numpy", "threadpoolctl", "__future__"} | set(sys.stdlib_module_names)
    for name, path in modules.items():
        if name.startswith("clad.ops"):
            bad = {i for i in _imports(name, path, modules)
                   if not i.startswith("clad.ops") and i.partition(".")[0] not in allowed}
            assert not bad, f"{path}: imports {sorted(bad)}"


def test_the_registry_imports_no_model_code():
    modules = _modules()
    for name in ("clad.registry", "clad.builtins"):
        clad_imports = {i for i in _imports(name, modules[name], modules) if i.startswith("clad")}
        assert clad_imports <= {"clad.builtins", "clad.errors"}, f"{name} imports {sorted(clad_imports)}"
    # ... and listing every name loads none of them (a fresh interpreter: this one has imported them all)
    code = ("import json, sys; from clad import registry as r; "
            "[reg.names() for reg in (r.detectors, r.backbones, r.text_encoders, r.datasets)]; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('clad'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}).stdout
    loaded = set(json.loads(out))
    assert not {m for m in loaded if m.startswith(("clad.backbones", "clad.data", "clad.ops"))}, loaded
    assert {m for m in loaded if m.startswith("clad.detectors.")} == {"clad.detectors.base"}, loaded


# -- plugins through entry points -------------------------------------------------------------------------------
@dataclass
class MeanDistanceConfig:
    backbone: str = "tiny_cnn"
    image_size: int = 64
    layer: str = "stage2"


class MeanDistance(Detector):
    """Distance of each patch feature to the mean normal patch feature: a detector from another package."""

    Config = MeanDistanceConfig

    def _features(self, images) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        bb, cfg = self._backbone(), self.config
        arrays, shapes = load_batch(images)
        with torch.inference_mode():
            return bb(bb.preprocess(arrays, cfg.image_size), [cfg.layer])[cfg.layer], shapes  # (B, C, h, w)

    def _fit(self, images) -> None:
        self.mean_ = self._features(images)[0].mean(dim=(0, 2, 3))  # (C,)

    def _predict_batch(self, images):
        feats, shapes = self._features(images)
        dist = (feats - self.mean_[:, None, None]).norm(dim=1, keepdim=True)  # (B, 1, h, w)
        maps = [F.interpolate(d[None], size=s, mode="bilinear")[0, 0].numpy() for d, s in zip(dist, shapes)]
        return np.array([m.max() for m in maps]), maps

    def _get_state(self):
        return {"mean": self.mean_}, {}

    def _set_state(self, tensors, meta) -> None:
        self.mean_ = tensors["mean"]


# A dataset scheme from another package: ``tiles:ROOT``, an MVTec-layout folder whose one category is "tile".
TILES = DatasetScheme(MVTecAD, lambda location: ["tile"])


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A distribution on sys.path whose entry points add a detector, a dataset scheme, a broken detector and one
    that takes a built-in's name."""
    dist = tmp_path / "site" / "clad_test_plugins-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: clad-test-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[clad.detectors]\nmean_distance = {__name__}:MeanDistance\nbroken = clad_no_such_module:Detector\n"
        f"patchcore = {__name__}:MeanDistance\n\n"
        f"[clad.datasets]\ntiles = {__name__}:TILES\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for reg in ALL:
        reg.reload()
    yield tmp_path
    for reg in ALL:  # refilled without the plugins once monkeypatch has restored sys.path
        reg.reload()


def test_a_plugin_detector_and_dataset_run_through_clad_eval(plugins, capsys):
    with pytest.warns(UserWarning, match="entry point patchcore = .* ignored: 'patchcore' is taken"):
        assert "mean_distance" in registry.list_detectors() and "tiles" in registry.datasets.names()
    assert registry.detector_class("patchcore") is not MeanDistance
    out = plugins / "eval.json"
    make_synthetic_mvtec(plugins / "data", "tile", n_train=4, n_test_good=2, n_test_defect=3, size=64)
    argv = ["eval", "--data", f"tiles:{plugins / 'data'}", "--category", "tile", "--detector", "mean_distance",
            "--backbone", "tiny_cnn", "--shots", "2", "--pixel-eval-size", "0", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["detector"] == "mean_distance" and MeanDistance.name == "mean_distance"
    assert res["params"] == {"backbone": "tiny_cnn", "image_size": 64, "layer": "stage2"}
    assert 0.0 <= res["image_auroc"] <= 1.0 and res["n_test"] == 5


@pytest.mark.filterwarnings("ignore:clad.detectors. entry point patchcore")
def test_a_broken_plugin_is_one_error_line(plugins, capsys):
    make_synthetic_mvtec(plugins / "data", "tile", n_train=2, n_test_good=1, n_test_defect=1, size=64)
    assert main(["eval", "--data", f"mvtec:{plugins / 'data'}", "--category", "tile", "--detector", "broken"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "detector 'broken'" in err and "clad-test-plugins" in err and "failed to load" in err
    assert "No module named 'clad_no_such_module'" in err


def test_clad_list_names_every_registry(capsys):
    from clad.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for line, name in [("detectors:", "patchcore"), ("backbones:", "efficientnet_lite0"),
                       ("backbones:", "efficientnet_lite1"), ("backbones:", "efficientnet_lite2"),
                       ("text encoders:", "minilm"), ("dataset schemes", "mvtec")]:
        assert any(row.startswith(line) and name in row for row in out.splitlines()), (line, out)


def test_benchmark_scripts_import_names_that_exist():
    """The scripts under benchmarks/ are not imported by the suite; a moved function must not break them silently."""
    import ast
    import importlib

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    missing = []
    for script in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "clad":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{script.name}: {node.module}.{alias.name}")
    assert not missing, missing
