"""Shared fixtures: small synthetic images, the shared real-data folder, tiny models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


def texture(size: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth, slightly noisy striped texture (H, W, 3) uint8: a stand-in for a normal surface."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 40 * np.sin(xx / 5.0) + 20 * np.cos(yy / 7.0)
    img = base[..., None] + rng.normal(0, 4, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def plant_square(image: np.ndarray, top: int, left: int, side: int, value: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Copy of ``image`` with a bright square; returns (image, mask)."""
    out = image.copy()
    out[top : top + side, left : left + side] = value
    mask = np.zeros(image.shape[:2], bool)
    mask[top : top + side, left : left + side] = True
    return out, mask


@pytest.fixture
def normal_images() -> list[np.ndarray]:
    return [texture((64, 64), seed) for seed in range(4)]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see ../shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random-initialised CLIP (weights + tokenizer) saved to a folder, built offline."""
    from clad.backbones.clip import build_random_clip

    return build_random_clip(tmp_path_factory.mktemp("tiny_clip"))


# -- the station's history on SQLite and PostgreSQL ---------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (``pg_helpers.PostgresServer``), or a skip saying why there is
    none; under CI (CI=true) a missing PostgreSQL fails instead, so that its tests cannot silently vanish."""
    import importlib.util
    import os

    from pg_helpers import PostgresServer, find_bindir

    bindir = find_bindir()
    missing = ("PostgreSQL is not installed (no initdb: apt-get install postgresql)" if bindir is None else
               "psycopg is not installed (pip install -e '.[cluster]')" if importlib.util.find_spec("psycopg") is None
               else None)
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{missing}; CI runs the PostgreSQL tests", pytrace=False)
        pytest.skip(missing)
    server = PostgresServer(bindir).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def history_url(request, tmp_path_factory):
    """``history_url(backend)``: the URL of a new, empty history database, "sqlite" (a file in a fresh folder) or
    "postgresql" (a database of the session's server named after the test module and a counter)."""
    import re

    count = iter(range(1000))
    module = re.sub(r"[^a-z0-9_]", "_", request.module.__name__.rsplit(".", 1)[-1].lower())[:40]

    def make(backend: str) -> str:
        if backend == "sqlite":
            return f"sqlite:///{tmp_path_factory.mktemp('history') / 'station.db'}"
        if backend == "postgresql":
            return request.getfixturevalue("postgres").create_database(f"{module}_{next(count)}")
        raise ValueError(f"backend {backend!r}")

    return make
