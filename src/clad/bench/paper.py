"""The paper's published numbers (``paper.json``, package data), shown beside the bench's own."""
from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files


@lru_cache(maxsize=1)
def published() -> dict:
    """``paper.json``: ``note``, ``names`` (registry name -> the paper's) and ``table1`` .. ``table4``.

    Its ``about`` field says how each table is laid out. The result is shared: do not modify it.
    """
    return json.loads(files("clad.bench").joinpath("paper.json").read_text(encoding="utf-8"))
