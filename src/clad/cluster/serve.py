"""``clad serve --engine ray``: the station's FastAPI app (``clad.serve.app``) as N Ray Serve replicas behind one
URL (Serve's HTTP proxy on ``--host``/``--port``).

Each replica is a whole station: its own models and batcher (requests routed to it are batched together), all
sharing the history database, the stored images and maps, and the model folders (whose versions stay consistent:
``clad.serve.versions.ModelSlot.refresh``). The driver migrates the history once before any replica starts. On one
machine a SQLite history (WAL) is shared by the replicas; replicas on several machines need PostgreSQL (``--db
postgresql+psycopg://...``) and the data and model folders on a shared file system.
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from clad.cluster import cluster_cpus, connect

APP_NAME = "clad-station"


def replica_class(serve):
    """The deployment's class: a station built in the replica, its app built after it (late-bound ingress)."""

    @serve.ingress()
    class StationReplica:
        def __init__(self, settings, threads: int):
            import logging

            import torch

            from clad.serve.station import Station

            torch.set_num_threads(threads)
            logging.getLogger("alembic").setLevel(logging.WARNING)
            self.station = Station(settings)
            for slot in self.station.slots.values():  # Serve routes to a replica once this returns: ready then
                slot.load()
            self.name = serve.get_replica_context().replica_id.unique_id

        def check_health(self):
            if self.station.failure:
                raise RuntimeError(self.station.failure)

        def __serve_build_asgi_app__(self):
            from clad.serve.app import create_app

            return create_app(self.station, replica=self.name)

    return StationReplica


def run(settings, replicas: int = 1, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
        num_cpus: int | None = None) -> None:
    """Deploy ``replicas`` stations on the Ray cluster (``clad.cluster.connect``) and serve until SIGINT / SIGTERM,
    then take them down: Serve and, when this run started it, the local cluster."""
    from clad.errors import SpecError
    from clad.serve.db import open_database, safe_url
    from clad.serve.server import is_loopback, listen

    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise SpecError(f"--replicas must be an integer >= 1, got {replicas!r}")
    names = _check_models(settings.models)
    engine, revision = open_database(settings.db_url)  # migrated once, here, before the replicas open it
    engine.dispose()
    sock = listen(host, port)  # the port is free (0: pick one); Serve's proxy binds it
    port = sock.getsockname()[1]
    sock.close()

    ray = connect(address, num_cpus, what="clad serve --engine ray")
    from ray import serve

    from clad.pipeline.outputs import stop_on_signals, uninterrupted

    try:
        with stop_on_signals():  # again: ray.init put its own SIGTERM handler in place of clad's
            cpus = cluster_cpus(ray)
            per_replica = min(1.0, cpus / replicas)  # fractions when there are more replicas than CPUs
            threads = max(1, cpus // replicas)
            quiet = {"log_level": "WARNING", "enable_access_log": False}
            serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
            deployment = serve.deployment(replica_class(serve)).options(
                num_replicas=replicas, max_ongoing_requests=max(64, 2 * settings.queue),
                ray_actor_options={"num_cpus": per_replica}, health_check_period_s=10, logging_config=quiet)
            serve.run(deployment.bind(replace(settings, seed_images=[]), threads), name=APP_NAME, route_prefix="/",
                      blocking=False)
            where = f"[{host}]" if ":" in host else host
            print(f"clad serve: {', '.join(names)} on {replicas} Ray Serve replica(s) ({cpus} CPU(s) in the "
                  f"cluster); history {safe_url(settings.db_url)} (schema {revision}); images "
                  f"{settings.images_dir or 'not stored'}; listening on http://{where}:{port}/ (API /api/v1, docs "
                  "/docs)", file=sys.stderr, flush=True)
            if not is_loopback(host) and settings.api_key is None:
                print(f"clad serve: warning: listening on {host} without --api-key-file: anyone who reaches this "
                      "port can post images, verdicts and model changes", file=sys.stderr, flush=True)
            if settings.seed_images:
                _seed(f"http://{where}:{port}", names[0], settings)
            while True:  # until SIGINT / SIGTERM
                time.sleep(1.0)
    finally:
        with uninterrupted(raise_after=False):  # a second Ctrl-C does not leave half a cluster behind
            try:
                if address is None:
                    serve.shutdown()
                else:  # a shared cluster: take down this application only
                    serve.delete(APP_NAME)
            finally:
                ray.shutdown()


def _check_models(folders) -> list[str]:
    """The models' names; a bad folder or two models of one name is one error here, before Ray starts."""
    from clad.errors import SpecError
    from clad.serve.versions import ModelSlot

    names: dict[str, Path] = {}
    for folder in folders:
        slot = ModelSlot(folder)
        if slot.name in names:
            raise SpecError(f"two models are named {slot.name!r} ({names[slot.name]} and {slot.folder}): a model's "
                            "name is its folder's name, rename one")
        names[slot.name] = slot.folder
    return list(names)


def _seed(url: str, model: str, settings, timeout: float = 300.0) -> None:
    """``--demo``: once the replicas are ready, inspect the demo's images through them into an empty history."""
    import json
    import urllib.error
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"{url}/api/v1/ready", timeout=10) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    with urllib.request.urlopen(f"{url}/api/v1/inspections?limit=1", timeout=30) as r:
        if json.load(r)["total"]:
            return
    headers = {"Content-Type": "image/png", **({"X-API-Key": settings.api_key} if settings.api_key else {})}
    for path in settings.seed_images:
        request = urllib.request.Request(f"{url}/api/v1/models/{model}/inspect?source=demo",
                                         data=Path(path).read_bytes(), headers=headers, method="POST")
        try:
            urllib.request.urlopen(request, timeout=120).close()
        except (urllib.error.URLError, OSError) as e:
            print(f"clad serve: demo image {path}: {e}", file=sys.stderr, flush=True)
