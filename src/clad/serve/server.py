"""Start-up of ``clad serve``: where things go by default, the demo model, uvicorn."""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

from clad.errors import SpecError
from clad.serve.db import safe_url
from clad.serve.station import Settings, Station

STATION_FOLDER = "clad_station"  # beside the first model folder, unless --data-dir


def settings_for(models: list[str | Path], data_dir: str | None = None, db: str | None = None,
                 store_images: str | None = None, api_key_file: str | None = None, **options) -> Settings:
    """Settings with the defaults filled in: the data folder ``<first model's parent>/clad_station``, the
    database ``sqlite:///<data folder>/station.db``, images in ``<data folder>/images``; ``store_images`` "none"
    stores none. ``api_key_file``: a file whose first line is the key."""
    if not models:
        raise SpecError("give at least one MODEL_DIR (a folder written by `clad fit`), or --demo")
    models = [Path(os.path.abspath(m)) for m in models]
    data = Path(os.path.abspath(data_dir)) if data_dir else models[0].parent / STATION_FOLDER
    if store_images is None:
        images = data / "images"
    elif store_images.lower() == "none":
        images = None
    else:
        images = Path(os.path.abspath(store_images))
    return Settings(models=models, data_dir=data, db_url=db or f"sqlite:///{data / 'station.db'}",
                    images_dir=images, api_key=read_key(api_key_file) if api_key_file else None, **options)


def read_key(path: str) -> str:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"--api-key-file {path}: cannot read it ({type(e).__name__}: {e})") from e
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(key) < 16:
        raise SpecError(f"--api-key-file {path}: the key (its first line) must have at least 16 characters")
    return key


def prepare_demo(folder: str | Path) -> dict:
    """Fit the demo model into ``folder`` (as ``clad demo`` builds its set), with its references kept for the
    closest normal patch; returns ``clad.demo.fit_demo_model``'s paths."""
    from clad.demo import fit_demo_model
    from clad.serve.blobs import sha256
    from clad.serve.versions import ModelSlot

    demo = fit_demo_model(Path(folder))
    refs = {}
    for p in demo["references"]:
        data = Path(p).read_bytes()
        refs[sha256(data)] = data
    slot = ModelSlot(demo["model"])
    if not slot.references_dir.is_dir():
        slot.add_references(refs)
        slot.set_initial_references(len(refs))
    return demo


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(settings: Settings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        access_log: bool = False) -> Station:
    """Open the history (migrating it), load the models, then serve until SIGINT / SIGTERM."""
    import uvicorn

    from clad.serve.app import create_app

    if not logging.getLogger().handlers:
        logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("alembic").setLevel(logging.WARNING)
    sock = listen(host, port)
    try:
        station = Station(settings)
        app = create_app(station)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    models = ", ".join(f"{s.name} ({s.initial.name}, version {s.active_number()})" for s in station.slots.values())
    images = settings.images_dir or "not stored"
    where = f"[{host}]" if ":" in host else host
    print(f"clad serve: {models}; history {safe_url(settings.db_url)} (schema {station.revision}); images "
          f"{images}; listening on http://{where}:{port}/ (API /api/v1, docs /docs)", file=sys.stderr, flush=True)
    if not is_loopback(host) and settings.api_key is None:
        print(f"clad serve: warning: listening on {host} without --api-key-file: anyone who reaches this port can "
              "post images, verdicts and model changes", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=10, limit_concurrency=max(256, 4 * settings.queue),
                            server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
    return station


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one), or one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SpecError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") from e
    sock.set_inheritable(True)
    return sock
