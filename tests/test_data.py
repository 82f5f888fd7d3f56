"""Datasets on tiny synthetic trees (MVTec layout, VisA csv, plain folders) and, when present, the real data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clad.data import (
    ImageFolder,
    MVTecAD,
    VisA,
    few_shot_paths,
    list_categories,
    load_image,
    make_synthetic_mvtec,
    open_dataset,
)
from clad.data.synthetic import DEFECT_TYPES, synthetic_images
from clad.errors import DatasetError, ImageLoadError
from clad.types import Sample

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
real_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data folder {SHARED_DATA} is absent")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    return make_synthetic_mvtec(root, category="tile", n_train=8, n_test_good=3, n_test_defect=6, size=48, seed=0)


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# -- synthetic tree and MVTecAD --------------------------------------------------------------------------------
def test_synthetic_tree_is_deterministic(tmp_path):
    a = make_synthetic_mvtec(tmp_path / "a", seed=3)
    b = make_synthetic_mvtec(tmp_path / "b", seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert len(files) == 10 + 4 + 6 + 6
    for f in files:
        assert np.array_equal(load_image(a / f), load_image(b / f))
    c = make_synthetic_mvtec(tmp_path / "c", seed=4)
    assert not np.array_equal(load_image(a / files[0]), load_image(c / files[0]))
    # a rerun replaces its own tree; a foreign folder is never overwritten
    make_synthetic_mvtec(tmp_path / "a", seed=3, n_train=2)
    assert len(list((a / "synthetic_tile" / "train" / "good").glob("*.png"))) == 2
    (tmp_path / "d" / "synthetic_tile").mkdir(parents=True)
    (tmp_path / "d" / "synthetic_tile" / "mine.txt").write_text("user data")
    with pytest.raises(DatasetError, match="refusing"):
        make_synthetic_mvtec(tmp_path / "d")


def test_synthetic_defects_are_visible_and_masked(synth):
    test = MVTecAD(synth, "tile", "test")
    good = np.stack([s.image for s in test if s.label == 0]).astype(np.float32)
    for s in test:
        if s.label == 1:
            assert 0.002 < s.mask.mean() < 0.2, s.defect_type
            inside = s.image[s.mask].astype(np.float32).mean(0)
            outside = s.image[~s.mask].astype(np.float32).mean(0)
            assert np.abs(inside - outside).max() > 40, s.defect_type  # clearly visible
    assert good.std() > 5  # a textured, not flat, background
    normals = synthetic_images(3, size=32, seed=1)
    assert len(normals) == 3 and normals[0].shape == (32, 32, 3) and normals[0].dtype == np.uint8
    assert np.array_equal(normals[0], synthetic_images(1, size=32, seed=1)[0])


def test_mvtec_counts_labels_and_masks(synth):
    train = MVTecAD(synth, "tile", "train")
    test = MVTecAD(synth, "tile", "test")
    assert len(train) == 8 and train.labels.tolist() == [0] * 8 and set(train.defect_types) == {"good"}
    assert len(test) == 9 and test.labels.dtype.kind == "i" and int(test.labels.sum()) == 6
    assert test.category == "tile" and "tile" in test.name
    assert sorted(set(test.defect_types)) == sorted(("good", *DEFECT_TYPES))
    assert [m is None for m in test.mask_paths] == [t == "good" for t in test.defect_types]
    for i, s in enumerate(test):
        assert isinstance(s, Sample)
        assert s.image.shape == (48, 48, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == s.image.shape[:2] and s.mask.dtype == bool
        assert s.label == test.labels[i] and s.path == test.paths[i] and s.defect_type == test.defect_types[i]
        assert s.mask.any() == bool(s.label)
    assert test[-1].path == test.paths[-1]
    with pytest.raises(IndexError):
        test[len(test)]


def test_few_shot_is_reproducible_per_seed(synth):
    a = MVTecAD(synth, "tile", "train", n_shots=3, seed=0)
    b = MVTecAD(synth, "tile", "train", n_shots=3, seed=0)
    assert len(a) == 3 and a.paths == b.paths
    draws = {tuple(MVTecAD(synth, "tile", "train", n_shots=3, seed=s).paths) for s in range(6)}
    assert len(draws) > 1
    assert set(MVTecAD(synth, "tile", "train", n_shots=2, seed=0).paths) <= set(a.paths)  # nested draws
    paths = [f"img_{i}.png" for i in range(10)]
    assert few_shot_paths(paths, 4, seed=1) == few_shot_paths(list(reversed(paths)), 4, seed=1)
    assert few_shot_paths(paths, None) == sorted(paths)


def test_few_shot_errors(synth):
    with pytest.raises(DatasetError, match="only 8 image"):
        MVTecAD(synth, "tile", "train", n_shots=9)
    assert few_shot_paths(["a.png"], 0, 0) == []  # zero-shot: no reference
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            few_shot_paths(["a.png"], bad, 0)
    with pytest.raises(ValueError, match="split='train'"):
        MVTecAD(synth, "tile", "test", n_shots=2)


def test_mvtec_missing_folders_are_named(synth, tmp_path):
    with pytest.raises(DatasetError, match="nowhere"):
        MVTecAD(tmp_path / "nowhere", "tile")
    with pytest.raises(DatasetError, match="nocat"):
        MVTecAD(synth, "nocat")
    with pytest.raises(ValueError, match="split"):
        MVTecAD(synth, "tile", "val")
    empty = tmp_path / "e"
    (empty / "cat" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="good"):
        MVTecAD(empty, "cat", "train")


def test_missing_mask_is_a_clear_error(tmp_path):
    root = make_synthetic_mvtec(tmp_path, category="tile", n_train=1, n_test_good=1, n_test_defect=3, size=32)
    gone = root / "tile" / "ground_truth" / "scratch" / "000_mask.png"
    gone.unlink()
    test = MVTecAD(root, "tile", "test")  # listing still works; the broken sample fails alone
    i = test.defect_types.index("scratch")
    with pytest.raises(DatasetError, match="000_mask.png") as e:
        test[i]
    assert str(root / "tile" / "test" / "scratch" / "000.png") in str(e.value)
    assert test[test.defect_types.index("hole")].mask.any()


def test_mask_of_wrong_size_names_the_file(tmp_path):
    root = make_synthetic_mvtec(tmp_path, category="tile", n_train=1, n_test_good=0, n_test_defect=1, size=32)
    mask = root / "tile" / "ground_truth" / "hole" / "000_mask.png"
    _save(mask, np.zeros((16, 16), np.uint8))
    with pytest.raises(ImageLoadError, match="000_mask.png"):
        MVTecAD(root, "tile", "test")[0]


# -- VisA ------------------------------------------------------------------------------------------------------
@pytest.fixture
def visa(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    rows = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        for i in range(4):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _save(tmp_path / rel, rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
            rows.append(f"{obj},{'train' if i < 3 else 'test'},normal,{rel},")
        for i in range(2):
            rel, mrel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            _save(tmp_path / rel, rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
            m = np.zeros((20, 30), np.uint8)
            m[5:10, 5:10] = i + 1  # VisA masks are not 0/255: any value > 0 is defective
            _save(tmp_path / mrel, m)
            rows.append(f"{obj},test,anomaly,{rel},{mrel}")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_visa(visa):
    train = VisA(visa, "candle", "train")
    test = VisA(visa, "candle", "test")
    assert len(train) == 3 and train.labels.tolist() == [0, 0, 0]
    assert len(test) == 3 and sorted(test.labels.tolist()) == [0, 1, 1]
    assert sorted(test.defect_types) == ["anomaly", "anomaly", "good"]
    for s in test:
        assert s.image.shape == (20, 30, 3) and s.mask.shape == (20, 30)
        assert s.mask.sum() == (25 if s.label else 0)
    shots = VisA(visa, "candle", "train", n_shots=2, seed=5)
    assert len(shots) == 2 and shots.paths == VisA(visa, "candle", "train", n_shots=2, seed=5).paths
    assert list_categories(f"visa:{visa}") == ["candle", "pcb1"]
    assert len(open_dataset(f"visa:{visa}", "pcb1", "test")) == 3
    with pytest.raises(DatasetError, match="candle, pcb1"):
        VisA(visa, "capsules")
    with pytest.raises(DatasetError, match="1cls.csv"):
        VisA(visa / "candle", "candle")


def test_visa_missing_mask(visa):
    (visa / "candle" / "Data" / "Masks" / "Anomaly" / "001.png").unlink()
    test = VisA(visa, "candle", "test")
    with pytest.raises(DatasetError, match="001.png"):
        test[test.paths.index(str(visa / "candle/Data/Images/Anomaly/001.JPG"))]


# -- ImageFolder -----------------------------------------------------------------------------------------------
@pytest.fixture
def folders(tmp_path) -> Path:
    images = synthetic_images(5, size=32, seed=0)
    for i in range(3):
        _save(tmp_path / "good" / f"g{i}.png", images[i])
    _save(tmp_path / "bad" / "scratch" / "s0.png", images[3])
    _save(tmp_path / "bad" / "dent" / "d0.jpg", images[4])
    m = np.zeros((32, 32), np.uint8)
    m[2:6, 2:6] = 255
    _save(tmp_path / "masks" / "scratch" / "s0.png", m)
    _save(tmp_path / "masks" / "dent" / "d0_mask.png", m)
    return tmp_path


def test_image_folder_with_masks(folders):
    ds = ImageFolder(folders / "good", folders / "bad", folders / "masks")
    assert len(ds) == 5 and ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.defect_types == ["good", "good", "good", "dent", "scratch"]
    for s in ds:
        assert s.mask.shape == s.image.shape[:2] == (32, 32)
        assert s.mask.sum() == (16 if s.label else 0)


def test_image_folder_without_masks(folders):
    ds = ImageFolder(folders / "good", folders / "bad")
    assert ds.mask_paths == [None] * 5 and all(not s.mask.any() for s in ds)
    flat = folders / "flat"
    _save(flat / "x.png", synthetic_images(1, 32, 0)[0])
    assert ImageFolder(folders / "good", flat).defect_types[-1] == "defect"
    assert len(ImageFolder(folders / "good")) == 3


def test_image_folder_missing_mask_names_the_file(folders):
    (folders / "masks" / "dent" / "d0_mask.png").unlink()
    ds = ImageFolder(folders / "good", folders / "bad", folders / "masks")
    with pytest.raises(DatasetError, match="d0.jpg"):
        ds[ds.defect_types.index("dent")]
    with pytest.raises(DatasetError, match="nothing"):
        ImageFolder(folders / "nothing")


# -- open_dataset ----------------------------------------------------------------------------------------------
def test_open_dataset_specs(synth, folders):
    train = open_dataset(f"mvtec:{synth}", "tile", "train", n_shots=2, seed=1)
    assert isinstance(train, MVTecAD) and len(train) == 2
    assert len(open_dataset(f"mvtec:{synth}", "tile", "test")) == 9
    assert list_categories(f"mvtec:{synth}") == ["tile"]
    spec = f"folder:{folders / 'good'},{folders / 'bad'},{folders / 'masks'}"
    ref = open_dataset(spec, None, "train", n_shots=2, seed=0)
    assert len(ref) == 2 and ref.labels.tolist() == [0, 0]
    test = open_dataset(spec, None, "test")
    assert len(test) == 5 and int(test.labels.sum()) == 2 and test[4].mask.any()
    assert len(open_dataset(f"folder:{folders / 'good'}", None, "test")) == 3
    with pytest.raises(ValueError, match="mvtec.*visa.*folder"):
        open_dataset(f"kaggle:{synth}", "tile", "test")
    with pytest.raises(ValueError, match="mvtec:ROOT"):
        open_dataset(str(synth), "tile", "test")
    with pytest.raises(ValueError, match="tile"):  # a missing category lists the available ones
        open_dataset(f"mvtec:{synth}", None, "test")


# -- real data -------------------------------------------------------------------------------------------------
@pytest.mark.real_data
@real_data
def test_real_bottle_counts():
    root = SHARED_DATA / "mvtec_ad"
    assert "bottle" in list_categories(f"mvtec:{root}")
    train, test = MVTecAD(root, "bottle", "train"), MVTecAD(root, "bottle", "test")
    assert len(train) == 209 and len(test) == 83 and int(test.labels.sum()) == 63
    assert set(test.defect_types) == {"good", "broken_large", "broken_small", "contamination"}
    s = test[test.defect_types.index("contamination")]
    assert s.mask.shape == s.image.shape[:2] and s.mask.any()


@pytest.mark.real_data
@real_data
def test_real_magnetic_tile_masks_match_images():
    train, test = MVTecAD(SHARED_DATA, "magnetic_tile", "train"), MVTecAD(SHARED_DATA, "magnetic_tile", "test")
    assert len(train) == 761 and len(test) == 583 and int(test.labels.sum()) == 392
    assert len(MVTecAD(SHARED_DATA, "magnetic_tile", "train", n_shots=4, seed=0)) == 4
    # header reads only (no decoding), so checking all 392 masks stays fast
    for path, mask in zip(test.paths, test.mask_paths):
        if mask is not None:
            with Image.open(path) as im, Image.open(mask) as m:
                assert m.size == im.size, mask
    s = test[int(np.flatnonzero(test.labels)[0])]
    assert s.mask.shape == s.image.shape[:2] and s.mask.any()
