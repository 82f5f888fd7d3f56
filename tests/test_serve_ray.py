"""``clad serve --engine ray``: two station replicas on Ray Serve behind one URL, as a real process on 127.0.0.1
with its own local Ray cluster of 2 CPUs, sharing a history on SQLite and on PostgreSQL: the history has every
inspection whichever replica answered, both replicas answer, a threshold changed through one is served by the
other, and stopping the process takes the whole cluster down with it."""
from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest

pytest.importorskip("ray")
pytest.importorskip("fastapi")

from conftest import plant_square, texture  # noqa: E402
from serve_helpers import Server  # noqa: E402
from test_serve import png_bytes  # noqa: E402

GOOD = png_bytes(texture((64, 64), 11))
BAD = png_bytes(plant_square(texture((64, 64), 12), 20, 20, 14)[0])
REPLICA = "X-Clad-Replica"


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def replicas(request, history_url, tmp_path_factory):
    import clad

    root = tmp_path_factory.mktemp("ray_station")
    normal = [texture((64, 64), s) for s in range(4)]
    model = clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64).fit(normal).save(root / "knn")
    server = Server([str(model), "--data-dir", str(root / "station"), "--db", history_url(request.param),
                     "--engine", "ray", "--replicas", "2", "--num-cpus", "2"], timeout=120)
    try:
        server.wait_ready(120)
        with httpx.Client(base_url=server.url + "/api/v1", timeout=60) as client:
            client.server = server
            yield client
    finally:
        server.stop(60)


def test_two_replicas_share_the_history_and_the_model_versions_and_stop_with_the_process(replicas):
    assert "2 Ray Serve replica(s)" in replicas.server.log
    tree = descendants(replicas.server.proc.pid)
    assert len(tree) >= 4  # the local cluster: its servers, the controller, the proxy, the replicas

    async def burst(n: int):
        async with httpx.AsyncClient(base_url=replicas.base_url, timeout=60) as c:
            return await asyncio.gather(*[c.post("/models/knn/inspect", content=BAD if i % 2 else GOOD,
                                                 headers={"Content-Type": "image/png"}) for i in range(n)])

    responses = asyncio.run(burst(10))
    assert [r.status_code for r in responses] == [201] * 10, [r.text for r in responses]
    seen = {r.headers[REPLICA] for r in responses}
    for _ in range(40):  # the router chooses; keep asking until both replicas have answered
        if len(seen) == 2:
            break
        seen.add(replicas.get("/health").headers[REPLICA])
    assert len(seen) == 2, seen
    history = replicas.get("/inspections", params={"limit": 100}).json()
    assert history["total"] == 10
    assert {i["id"] for i in history["items"]} == {r.json()["id"] for r in responses}

    changed = replicas.post("/models/knn/threshold", json={"threshold": 1e6})
    assert changed.status_code == 200 and changed.json()["version"] == 2
    other, answers = None, []
    for _ in range(40):  # until the replica that did not make the change has inspected
        r = replicas.post("/models/knn/inspect", content=BAD, headers={"Content-Type": "image/png"})
        assert r.status_code == 201, r.text
        answers.append(r.json())
        if r.headers[REPLICA] != changed.headers[REPLICA]:
            other = r.headers[REPLICA]
            break
    assert other is not None, "only the replica that changed the threshold answered"
    assert all((a["model_version"], a["threshold"], a["decision"]) == (2, 1e6, "normal") for a in answers)
    for _ in range(40):
        r = replicas.get("/models")
        if r.headers[REPLICA] == other:
            assert r.json()[0]["version"] == 2 and r.json()[0]["threshold"] == 1e6
            break

    tree |= descendants(replicas.server.proc.pid)
    assert replicas.server.stop(60) in (0, 130)
    end = time.monotonic() + 30
    while time.monotonic() < end and any(alive(p) for p in tree):
        time.sleep(0.5)
    assert not [p for p in tree if alive(p)], "processes of the cluster outlived clad serve"
