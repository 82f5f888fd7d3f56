"""The bench's JSON files: strict JSON, written atomically; a file that cannot be read is as good as absent."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from clad.pipeline.outputs import atomic_write


def plain(obj):
    """JSON-ready copy: numpy scalars and arrays to Python, tuples to lists, NaN/inf to None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, doc) -> None:
    """Write atomically (temporary file + rename), so an interrupted bench never leaves half a file."""
    atomic_write(path, json.dumps(plain(doc), indent=1, allow_nan=False))


def read_json(path: Path):
    """The document at ``path``; None when it is missing, unreadable or not JSON (a run to do again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
