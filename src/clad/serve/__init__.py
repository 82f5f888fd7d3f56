"""``clad serve``: the inspection station, a long-running HTTP service on top of the library.

Cameras or line software post images (``POST /api/v1/models/{name}/inspect``); concurrent requests are batched
into one ``detector.predict``; every inspection is committed to a durable history (SQLAlchemy, SQLite in WAL mode
by default, schema by Alembic migrations) before it is answered; operators review, give verdicts, move the
threshold and teach confirmed normal images to memory-based models, each change a new model version that can be
rolled back. ``station`` holds the logic, ``app`` the HTTP routes, ``server`` the start-up.

The dependencies are the ``app`` extra: ``pip install -e ".[app]"``.
"""
from __future__ import annotations

APP_MODULES = ("fastapi", "uvicorn", "multipart", "sqlalchemy", "alembic", "prometheus_client")


def check_dependencies() -> None:
    """One clear error when the app extra is not installed."""
    import importlib.util

    from clad.errors import CladError

    missing = [m for m in APP_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        names = {"multipart": "python-multipart", "prometheus_client": "prometheus-client"}
        raise CladError(f"clad serve needs the app's packages ({', '.join(names.get(m, m) for m in missing)} "
                        "missing): pip install -e \".[app]\"")
