"""The station's history: SQLAlchemy 2 ORM tables, the engine, and the schema's migrations.

Portable SQL only (the ORM's): SQLite by default, PostgreSQL (``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB``,
psycopg 3 from the cluster extra) the same, on the same migrations. On SQLite every connection turns on WAL mode
(readers never block the writer), foreign keys and a busy timeout; on PostgreSQL every session runs in UTC. Times
are stored timezone-aware (SQLite hands them back naive: UTC). The schema is created and upgraded by the Alembic
migrations shipped in ``clad/serve/migrations`` (``migrate``), never by ``create_all``; several processes may
start on one database at once (Ray Serve replicas): the migrations run under a lock (a PostgreSQL advisory lock, a
file lock beside a SQLite file), once. ``open_database`` turns every way a URL can fail into one ``DatabaseError``.

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
    """The engine of ``url``; a SQLite file gets its folder created and the pragmas above on every connection, a
    PostgreSQL session the UTC time zone."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    kwargs: dict = {"pool_pre_ping": True}
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    elif backend == "postgresql":
        kwargs["connect_args"] = {"options": "-c timezone=UTC", "connect_timeout": 10}
    engine = create_engine(url, **kwargs)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


MIGRATION_LOCK = 0x636C6164  # "clad": the PostgreSQL advisory lock held while migrating


def migrate(engine: Engine) -> str | None:
    """Bring the schema to the newest migration (``alembic upgrade head``, run in-process on ``engine``) under a
    lock, so that processes starting together migrate once; returns the revision now current."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import text

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with _file_lock(engine):
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":  # held to the end of this transaction: the others wait here
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


class _file_lock:
    """An exclusive ``flock`` on ``<database file>.migrate.lock`` for a SQLite file; nothing for other databases."""

    def __init__(self, engine: Engine):
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        self.path = Path(database + ".migrate.lock") if database and database != ":memory:" else None
        self.fh = None

    def __enter__(self):
        if self.path is not None:
            import fcntl

            self.fh = open(self.path, "a")
            fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()  # releases the lock


def safe_url(url: str) -> str:
    """``url`` with its password hidden (``***``); a URL that cannot be parsed, as given without a password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@")[-1] if "@" in url else url


def open_database(url: str) -> tuple[Engine, str | None]:
    """The engine of ``url`` with its schema migrated, and the revision; every failure is one ``DatabaseError``
    (or ``DependencyError`` for a missing driver) naming the URL, password hidden, and the problem."""
    from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

    from clad.errors import DatabaseError, DependencyError

    shown = safe_url(url)
    try:
        engine = make_engine(url)
    except NoSuchModuleError as e:
        raise DatabaseError(f"--db {shown}: unknown database kind ({e}); use sqlite:///PATH or "
                            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE") from e
    except ArgumentError as e:
        raise DatabaseError(f"--db {shown}: not a database URL ({e}); use sqlite:///PATH or "
                            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE") from e
    except ImportError as e:
        raise DependencyError(f"--db {shown} needs the Python package {e.name or e}, which is not installed: "
                              "PostgreSQL runs on psycopg 3 (postgresql+psycopg://...): pip install -e '.[cluster]' "
                              "(or pip install 'psycopg[binary]')") from e
    except OSError as e:
        raise DatabaseError(f"--db {shown}: cannot create the database's folder ({e.strerror or e})") from e
    try:
        return engine, migrate(engine)
    except DBAPIError as e:
        engine.dispose()
        reason = " ".join(str(e.orig).split()) if e.orig is not None else type(e).__name__
        raise DatabaseError(f"--db {shown}: cannot open the history ({reason})") from e
    except (SQLAlchemyError, OSError) as e:
        engine.dispose()
        raise DatabaseError(f"--db {shown}: cannot open the history ({' '.join(str(e).split())})") from e


def session_factory(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
