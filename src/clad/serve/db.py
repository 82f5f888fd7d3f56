"""The station's history: SQLAlchemy 2 ORM tables, the engine, and the schema's migrations.

Portable SQL only (the ORM's): SQLite by default, a PostgreSQL URL works the same. On SQLite every connection
turns on WAL mode (readers never block the writer), foreign keys and a busy timeout; the schema is created and
upgraded by the Alembic migrations shipped in ``clad/serve/migrations`` (``migrate``), never by ``create_all``.

Tables: ``inspections`` (one row per inspected image, with its operator's current verdict), ``verdicts`` (every
verdict given, the audit trail), ``ratings`` (blind ratings of heatmaps, the paper's Table 3).
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint,
                        create_engine, event)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(t: dt.datetime | None) -> str | None:
    """ISO-8601 UTC with a ``Z``; SQLite hands back naive datetimes, which are UTC here."""
    if t is None:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Base(DeclarativeBase):
    pass


class Inspection(Base):
    """One inspected image: what the model said, where its image and map are stored, and the current verdict."""

    __tablename__ = "inspections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    model: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[int] = mapped_column(Integer)
    source: Mapped[str | None] = mapped_column(String(200))
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_format: Mapped[str] = mapped_column(String(10))  # PIL's name: the stored file's extension
    image_stored: Mapped[bool] = mapped_column(Boolean)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    score_normalized: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    decision: Mapped[str | None] = mapped_column(String(10))  # "defect" | "normal" | None (no threshold)
    uncertain: Mapped[bool] = mapped_column(Boolean)
    explanation: Mapped[dict] = mapped_column(JSON)  # clad.explain.Explanation.to_dict()
    timings: Mapped[dict] = mapped_column(JSON)  # milliseconds
    # the map: a 16-bit PNG in the map store, its values quantised between map_min and map_max; its colours span
    # heat_min to heat_max (one range for every image of a model version), or its own min-max when they are null
    map_sha256: Mapped[str] = mapped_column(String(64), index=True)
    map_min: Mapped[float] = mapped_column(Float)
    map_max: Mapped[float] = mapped_column(Float)
    heat_min: Mapped[float | None] = mapped_column(Float)
    heat_max: Mapped[float | None] = mapped_column(Float)
    # the operator's current verdict (the latest row of ``verdicts``), kept here to filter on
    verdict: Mapped[str | None] = mapped_column(String(10))
    defect_type: Mapped[str | None] = mapped_column(String(100))
    rating: Mapped[int | None] = mapped_column(Integer)
    note: Mapped[str | None] = mapped_column(Text)
    operator: Mapped[str | None] = mapped_column(String(100))
    verdict_created: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    taught_in_version: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        Index("ix_inspections_model_created", "model", "created"),
        Index("ix_inspections_verdict", "verdict"),
        Index("ix_inspections_decision", "decision"),
    )


class Verdict(Base):
    """Every verdict an operator gave; the latest of an inspection is copied onto it."""

    __tablename__ = "verdicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    inspection_id: Mapped[int] = mapped_column(ForeignKey("inspections.id", ondelete="CASCADE"), index=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    verdict: Mapped[str] = mapped_column(String(10))
    defect_type: Mapped[str | None] = mapped_column(String(100))
    rating: Mapped[int | None] = mapped_column(Integer)
    note: Mapped[str | None] = mapped_column(Text)
    operator: Mapped[str | None] = mapped_column(String(100))


class Rating(Base):
    """A blind rating (1-5) of one heatmap option of an inspection's image; ``model`` is the hidden key."""

    __tablename__ = "ratings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    inspection_id: Mapped[int] = mapped_column(ForeignKey("inspections.id", ondelete="CASCADE"), index=True)
    rater: Mapped[str] = mapped_column(String(100))
    option: Mapped[str] = mapped_column(String(2))
    model: Mapped[str] = mapped_column(String(200))
    rating: Mapped[int] = mapped_column(Integer)
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("inspection_id", "rater", "option", name="uq_ratings_option"),)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a committed row survives a power cut, not only a crash
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    """The engine of ``url``; a SQLite file gets its folder created and the pragmas above on every connection."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    kwargs: dict = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def migrate(engine: Engine) -> str | None:
    """Bring the schema to the newest migration (``alembic upgrade head``, run in-process on ``engine``); returns
    the revision now current."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def session_factory(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
