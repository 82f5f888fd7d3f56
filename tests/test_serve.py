"""``clad serve``: the HTTP API against a real uvicorn process on 127.0.0.1 (a free port), with httpx, on tiny
models fitted here. One station (`station`) serves most tests: two models, an API key, a queue of one, a small
body limit; another is stopped and started again on the same history. Every test that touches the history runs on
each backend (`backend`): SQLite and a real PostgreSQL server (the `postgres` fixture)."""
from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from conftest import plant_square, texture  # noqa: E402
from serve_helpers import Server  # noqa: E402

KEY = "k" * 24


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


GOOD = png_bytes(texture((64, 64), 11))
BAD = png_bytes(plant_square(texture((64, 64), 12), 20, 20, 14)[0])


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def models(tmp_path_factory, backend) -> dict[str, Path]:
    """Fitted per backend: the versions a station makes live in the model folders."""
    import clad

    root = tmp_path_factory.mktemp("models")
    normal = [texture((64, 64), s) for s in range(4)]
    out = {}
    for name, detector in (("knn", "patch_knn"), ("spade", "spade")):
        out[name] = clad.create_detector(detector, backbone="tiny_cnn", image_size=64).fit(normal).save(root / name)
    return out


@pytest.fixture(scope="module")
def station(models, backend, history_url, tmp_path_factory):
    data = tmp_path_factory.mktemp("station")
    key_file = data / "key.txt"
    key_file.write_text(KEY + "\n")
    server = Server([str(models["knn"]), str(models["spade"]), "--data-dir", str(data / "station"),
                     "--db", history_url(backend), "--api-key-file", str(key_file), "--queue", "1",
                     "--max-batch", "1", "--max-body-mb", "0.05"])
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url + "/api/v1", headers={"X-API-Key": KEY}, timeout=60) as client:
            client.server, client.data = server, data / "station"
            yield client
    finally:
        server.stop()


def inspect(client, model="knn", data=GOOD, **params) -> dict:
    r = client.post(f"/models/{model}/inspect", files={"file": ("x.png", data, "image/png")}, params=params)
    assert r.status_code == 201, r.text
    return r.json()


# -- health, models, inspecting ---------------------------------------------------------------------------------
def test_health_ready_and_the_models(station):
    assert station.get("/health").json() == {"status": "ok"}
    ready = station.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["models"] == ["knn", "spade"]
    models = {m["name"]: m for m in station.get("/models").json()}
    assert models["knn"]["detector"] == "patch_knn" and models["spade"]["detector"] == "spade"
    knn = models["knn"]
    assert knn["version"] == 1 and knn["threshold_source"] == "references" and knn["threshold"] > 0
    assert knn["versions"] == [dict(knn["versions"][0], version=1, reason="initial", active=True)]
    assert station.get("/models/nope/scores").status_code == 404


def test_inspect_multipart_and_raw_give_the_same_answer_and_are_stored(station):
    a = inspect(station, data=BAD, source="camera-3")
    r = station.post("/models/knn/inspect", content=BAD, headers={"Content-Type": "image/png"})
    assert r.status_code == 201, r.text
    b = r.json()
    assert b["id"] > a["id"] and a["source"] == "camera-3" and b["source"] is None
    assert a["score"] == pytest.approx(b["score"], rel=1e-5) and a["image_sha256"] == b["image_sha256"]
    assert (a["width"], a["height"], a["model_version"], a["image_stored"]) == (64, 64, 1, True)
    assert a["decision"] == "defect" and a["score"] > a["threshold"] and a["score_normalized"] > 0.5
    assert a["sentence"].startswith("Anomalous") and a["regions"]
    region = a["regions"][0]
    x0, y0, x1, y1 = region["box"]
    assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and 0 < region["share"] <= 1
    assert set(a["timings_ms"]) >= {"queue", "predict", "explain", "total"}
    assert a["timings_ms"]["total"] >= a["timings_ms"]["predict"]
    good = inspect(station, data=GOOD)
    assert good["decision"] == "normal" and good["sentence"].startswith("Normal") and good["score_normalized"] < 0.5
    assert station.get(f"/inspections/{a['id']}").json() == a
    stored = station.data / "images" / a["image_sha256"][:2] / f"{a['image_sha256']}.png"
    assert stored.read_bytes() == BAD  # content-addressed, the original bytes


def test_undecodable_unsupported_and_oversized_uploads_are_refused_with_their_reason(station):
    r = station.post("/models/knn/inspect", content=b"not an image at all", headers={"Content-Type": "image/png"})
    assert r.status_code == 422 and "not an image in a supported format" in r.json()["detail"]
    truncated = BAD[: len(BAD) // 2]
    r = station.post("/models/knn/inspect", files={"file": ("t.png", truncated, "image/png")})
    assert r.status_code == 422 and "cannot read image" in r.json()["detail"]
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"  # PIL would hand this to Ghostscript
    assert station.post("/models/knn/inspect", content=eps, headers={"Content-Type": "image/png"}).status_code == 422
    r = station.post("/models/knn/inspect", content=GOOD, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "multipart" in r.json()["detail"]
    r = station.post("/models/knn/inspect", files={"other": ("x.png", GOOD, "image/png")})
    assert r.status_code == 422 and "'file'" in r.json()["detail"]
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (160, 160, 3), dtype=np.uint8))  # ~77 KB > 50 KiB
    r = station.post("/models/knn/inspect", content=big, headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit is counted while reading
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    r = station.post("/models/knn/inspect", content=chunks(), headers={"Content-Type": "image/png"})
    assert r.status_code == 413
    assert station.post("/models/nope/inspect", content=GOOD, headers={"Content-Type": "image/png"}).status_code == 404
    assert inspect(station)["decision"] == "normal"  # the station goes on


def test_writes_need_the_api_key_and_reads_do_not(station):
    url = station.server.url + "/api/v1"
    with httpx.Client(base_url=url, timeout=30) as anonymous:
        for path, body in [("/models/knn/threshold", {"threshold": 1.0}), ("/inspections/1/verdict",
                                                                            {"verdict": "normal"})]:
            r = anonymous.post(path, json=body)
            assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
            assert anonymous.post(path, json=body, headers={"X-API-Key": KEY[:-1] + "x"}).status_code == 401
        r = anonymous.post("/models/knn/inspect", content=GOOD, headers={"Content-Type": "image/png"})
        assert r.status_code == 401
        assert anonymous.get("/inspections").status_code == 200 and anonymous.get("/models").status_code == 200


def test_a_full_queue_answers_503_with_retry_after_and_the_others_go_through(station):
    async def burst():
        async with httpx.AsyncClient(base_url=station.base_url, headers={"X-API-Key": KEY}, timeout=60) as c:
            return await asyncio.gather(*[c.post("/models/knn/inspect", content=BAD if i % 2 else GOOD,
                                                 headers={"Content-Type": "image/png"}) for i in range(24)])

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {201, 503} and codes.count(201) >= 1 and codes.count(503) >= 1, codes
    full = next(r for r in responses if r.status_code == 503)
    assert int(full.headers["Retry-After"]) >= 1 and "queue is full" in full.json()["detail"]
    for r in responses:  # every acknowledged inspection is in the history
        if r.status_code == 201:
            assert station.get(f"/inspections/{r.json()['id']}").status_code == 200


# -- the history --------------------------------------------------------------------------------------------------
def test_list_filters_and_pagination(station):
    ids = [inspect(station, model="spade", data=d, source="page")["id"] for d in (GOOD, BAD, GOOD)]
    page = station.get("/inspections", params={"model": "spade", "limit": 2}).json()
    assert page["total"] >= 3 and [i["id"] for i in page["items"]] == ids[::-1][:2]  # newest first
    rest = station.get("/inspections", params={"model": "spade", "limit": 2, "offset": 2}).json()
    assert rest["items"][0]["id"] == ids[0] and rest["total"] == page["total"]
    for decision in ("defect", "normal"):
        items = station.get("/inspections", params={"decision": decision, "limit": 500}).json()["items"]
        assert items and all(i["decision"] == decision for i in items)
    assert station.get("/inspections", params={"since": "2999-01-01T00:00:00Z"}).json() == {"items": [], "total": 0}
    newest = page["items"][0]["created"]
    recent = station.get("/inspections", params={"since": newest, "model": "spade"}).json()
    assert [i["id"] for i in recent["items"]] == [ids[-1]]
    older = station.get("/inspections", params={"until": newest, "model": "spade"}).json()["items"]
    assert ids[-1] not in [i["id"] for i in older] and ids[0] in [i["id"] for i in older]
    everything = station.get("/inspections", params={"until": "2999-01-01T00:00:00Z"}).json()["total"]
    assert everything == station.get("/inspections").json()["total"]
    assert station.get("/inspections", params={"verdict": "maybe"}).status_code == 422
    assert station.get("/inspections", params={"limit": 0}).status_code == 422
    assert station.get("/inspections/999999").status_code == 404


def test_verdicts_replace_each_other_and_filter_the_list(station):
    a = inspect(station, data=BAD)
    r = station.post(f"/inspections/{a['id']}/verdict", json={"verdict": "normal", "operator": "ana"})
    assert r.status_code == 200 and r.json()["verdict"]["verdict"] == "normal"
    r = station.post(f"/inspections/{a['id']}/verdict", json={"verdict": "defect", "defect_type": "scratch",
                                                                "rating": 4, "note": "edge", "operator": "bo"})
    v = r.json()["verdict"]
    assert (v["verdict"], v["defect_type"], v["rating"], v["note"], v["operator"]) == ("defect", "scratch", 4, "edge",
                                                                                        "bo")
    assert v["created"].endswith("Z")
    defects = station.get("/inspections", params={"verdict": "defect"}).json()["items"]
    assert a["id"] in [i["id"] for i in defects]
    unreviewed = station.get("/inspections", params={"verdict": "none", "limit": 500}).json()["items"]
    assert a["id"] not in [i["id"] for i in unreviewed] and all(i["verdict"] is None for i in unreviewed)
    bad = station.post(f"/inspections/{a['id']}/verdict", json={"verdict": "maybe"})
    assert bad.status_code == 422 and "verdict" in bad.json()["detail"]
    assert station.post(f"/inspections/{a['id']}/verdict", json={"verdict": "normal", "rating": 9}).status_code == 422
    assert station.post("/inspections/999999/verdict", json={"verdict": "normal"}).status_code == 404
    scores = station.get("/models/knn/scores").json()
    mine = next(i for i in scores["items"] if i["id"] == a["id"])
    assert mine == {"id": a["id"], "score": a["score"], "verdict": "defect"} and scores["threshold"] > 0


def test_pictures_are_pngs_of_the_input_size(station):
    a = inspect(station, data=BAD)
    for kind, size in [("image", (64, 64)), ("heatmap", (64, 64)), ("overlay", (64, 64)), ("thumbnail", (64, 64))]:
        r = station.get(f"/inspections/{a['id']}/{kind}.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == size
    image = np.asarray(Image.open(io.BytesIO(station.get(f"/inspections/{a['id']}/image.png").content)))
    assert np.array_equal(image, np.asarray(Image.open(io.BytesIO(BAD))))
    clear = station.get(f"/inspections/{a['id']}/overlay.png", params={"alpha": 0}).content
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(clear))), image)
    assert station.get(f"/inspections/{a['id']}/overlay.png", params={"alpha": 2}).status_code == 422
    # one colour scale for the model (0 to twice its threshold): the defect's square red, the normal image blue
    heat = np.asarray(Image.open(io.BytesIO(station.get(f"/inspections/{a['id']}/heatmap.png").content))).astype(int)
    good = inspect(station, data=GOOD)
    cool = np.asarray(Image.open(io.BytesIO(station.get(f"/inspections/{good['id']}/heatmap.png").content))).astype(int)
    assert heat[27, 27, 0] > heat[27, 27, 2] and (cool[..., 2] > cool[..., 0]).mean() > 0.9
    r = station.get(f"/inspections/{a['id']}/nearest.png")
    assert r.status_code == 404 and "reference" in r.json()["detail"]  # no references known for this model


def test_threshold_apply_makes_a_new_version_and_rollback_restores_the_old(station, models):
    before = station.get("/models").json()[0]
    r = station.post("/models/knn/threshold", json={"threshold": 1e6})
    assert r.status_code == 200, r.text
    m = r.json()
    assert m["version"] == 2 and m["threshold"] == 1e6 and m["threshold_source"] == "user"
    v2 = next(v for v in m["versions"] if v["version"] == 2)
    assert v2["reason"] == "threshold" and v2["active"] and v2["parent"] == 1
    folder = models["knn"] / ".versions" / "0002"
    assert json.loads((folder / "config.json").read_text())["threshold"] == 1e6
    assert json.loads((models["knn"] / ".versions" / "active.json").read_text())["version"] == 2
    a = inspect(station, data=BAD)
    assert a["model_version"] == 2 and a["decision"] == "normal" and a["threshold"] == 1e6
    assert station.post("/models/knn/threshold", json={"threshold": "high"}).status_code == 422
    r = station.post("/models/knn/rollback", json={"version": 1})
    assert r.status_code == 200 and r.json()["version"] == 1 and r.json()["threshold"] == before["threshold"]
    assert inspect(station, data=BAD)["model_version"] == 1
    assert station.post("/models/knn/rollback", json={"version": 42}).status_code == 404
    # the threshold page's lineage: version 2's inspections are not version 1's
    ids = [i["id"] for i in station.get("/models/knn/scores").json()["items"]]
    assert a["id"] not in ids


def test_teach_is_refused_by_a_detector_that_cannot_add_references(station):
    a = inspect(station, model="spade")
    station.post(f"/inspections/{a['id']}/verdict", json={"verdict": "normal"})
    r = station.post("/models/spade/teach", json={"inspection_ids": None})
    assert r.status_code == 409 and "cannot add references" in r.json()["detail"]


def test_teach_adds_confirmed_normals_as_a_new_version(station, models):
    knn = next(m for m in station.get("/models").json() if m["name"] == "knn")
    if not knn["can_add_references"]:
        pytest.skip("patch_knn.add_references is not merged yet (the `teach` branch): teaching is re-enabled then")
    r = station.post("/models/knn/teach", json={"inspection_ids": None})
    assert r.status_code == 422 and "nothing to teach" in r.json()["detail"]
    a, b = inspect(station, data=GOOD), inspect(station, data=BAD)
    station.post(f"/inspections/{a['id']}/verdict", json={"verdict": "normal"})
    r = station.post("/models/knn/teach", json={"inspection_ids": [b["id"]]})
    assert r.status_code == 422 and "not confirmed normal" in r.json()["detail"]
    r = station.post("/models/knn/teach", json={"inspection_ids": None})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["taught"] == 1 and out["seconds"] >= 0
    new = out["model"]["version"]
    assert next(v for v in out["model"]["versions"] if v["version"] == new)["reason"] == "teach"
    assert station.get(f"/inspections/{a['id']}").json()["taught_in_version"] == new
    assert (models["knn"] / ".references" / f"{a['image_sha256']}.png").is_file()
    assert inspect(station, data=GOOD)["model_version"] == new
    c = inspect(station, data=BAD)
    if c["regions"]:
        r = station.get(f"/inspections/{c['id']}/nearest.png")
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (160, 160)


# -- blind rating -----------------------------------------------------------------------------------------------
def test_blind_rating_hides_the_models_and_exports_what_clad_bench_reads(station, tmp_path):
    from clad.bench.ratings import import_ratings

    inspect(station, data=BAD)
    task = station.get("/ratings/next", params={"rater": "ann"}).json()["task"]
    assert task is not None and [o["option"] for o in task["options"]] == ["A", "B"]
    text = json.dumps(task)
    assert "knn" not in text and "spade" not in text
    for o in task["options"]:
        r = station.get(o["url"].removeprefix("/api/v1"))
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (64, 64)
    for o, rating in zip(task["options"], (5, 2)):
        r = station.post("/ratings", json={"inspection_id": task["inspection_id"], "option": o["option"],
                                           "rating": rating, "rater": "ann"})
        assert r.status_code == 204
    nxt = station.get("/ratings/next", params={"rater": "ann"}).json()["task"]
    assert nxt is None or nxt["inspection_id"] != task["inspection_id"]
    assert station.post("/ratings", json={"inspection_id": task["inspection_id"], "option": "Z", "rating": 3,
                                          "rater": "ann"}).status_code == 422
    assert station.post("/ratings", json={"inspection_id": task["inspection_id"], "option": "A", "rating": 3,
                                          "rater": "../etc"}).status_code == 422
    r = station.get("/ratings/export")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "sheet_ann.csv")))
    assert {row["rating"] for row in rows} == {"5", "2"}
    table = import_ratings([str(tmp_path / "sheet_ann.csv")], tmp_path / "key.json")
    by = {row["detector"]: row for row in table["rows"]}
    assert set(by) == {"knn", "spade"} and sorted(by[m]["mean"] for m in by) == [2.0, 5.0]


# -- metrics ----------------------------------------------------------------------------------------------------
def test_metrics_in_the_prometheus_text_format(station):
    inspect(station)
    station.post("/models/knn/inspect", content=b"junk", headers={"Content-Type": "image/png"})
    r = httpx.get(station.server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("clad_inspections_total", "clad_request_seconds_bucket", "clad_queue_depth", "clad_batch_size_bucket",
                 "clad_errors_total"):
        assert name in text, name
    assert 'clad_inspections_total{decision="normal",model="knn"}' in text
    assert 'clad_errors_total{kind="bad_image"}' in text


def test_the_web_app_and_the_api_docs_are_served(station):
    assert httpx.get(station.server.url + "/").status_code == 200
    docs = httpx.get(station.server.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = httpx.get(station.server.url + "/openapi.json").json()
    assert "/api/v1/models/{name}/inspect" in schema["paths"]


# -- durability -------------------------------------------------------------------------------------------------
def test_history_survives_a_restart_in_wal_mode_and_batches_gather(models, backend, history_url, tmp_path):
    import sqlalchemy as sa

    data, url = tmp_path / "station", history_url(backend)
    args = [str(models["knn"]), "--data-dir", str(data), "--db", url, "--max-batch", "8", "--max-wait-ms", "300",
            "--store-images", "none"]
    server = Server(args)
    try:
        server.wait_ready()

        async def burst():
            async with httpx.AsyncClient(base_url=server.url + "/api/v1", timeout=60) as c:
                return await asyncio.gather(*[c.post("/models/knn/inspect", content=d,
                                                     headers={"Content-Type": "image/png"})
                                              for d in (GOOD, BAD) * 4])

        first = [r.json() for r in asyncio.run(burst())]
        assert all(not i["image_stored"] for i in first)
        metrics = httpx.get(server.url + "/metrics").text
        assert 'clad_batch_size_bucket{le="1.0"}' in metrics
        count = float(next(ln.split()[-1] for ln in metrics.splitlines() if ln.startswith("clad_batch_size_count")))
        assert count < len(first)  # some forward served more than one request
        ov = httpx.get(f"{server.url}/api/v1/inspections/{first[1]['id']}/overlay.png")
        assert ov.status_code == 404 and "not stored" in ov.json()["detail"]
        assert httpx.get(f"{server.url}/api/v1/inspections/{first[1]['id']}/heatmap.png").status_code == 200
    finally:
        assert server.stop() in (0, 130)
    password = sa.engine.make_url(url).password
    assert "history " in server.log and (password is None or password not in server.log)  # hidden: ***
    if backend == "sqlite":
        db = sqlite3.connect(url.removeprefix("sqlite:///"))
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()
    engine = sa.create_engine(url)
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0001"
        assert c.execute(sa.text("SELECT count(*) FROM inspections")).scalar() == len(first)
    engine.dispose()
    again = Server(args)
    try:
        again.wait_ready()
        history = httpx.get(again.url + "/api/v1/inspections", params={"limit": 100}).json()
        assert history["total"] == len(first)
        assert {i["id"] for i in history["items"]} == {i["id"] for i in first}
        one = httpx.get(f"{again.url}/api/v1/inspections/{first[0]['id']}").json()
        assert one == first[0]
        assert httpx.get(f"{again.url}/api/v1/inspections/{first[1]['id']}/heatmap.png").status_code == 200
    finally:
        again.stop()


# -- in-process: the schema, retention, the command line ----------------------------------------------------------
def test_migrations_create_the_schema_of_the_orm_from_an_empty_database(backend, history_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from clad.serve.db import Base, make_engine, migrate

    engine = make_engine(history_url(backend))
    assert migrate(engine) == "0001" and migrate(engine) == "0001"  # idempotent
    with engine.connect() as c:
        assert compare_metadata(MigrationContext.configure(c), Base.metadata) == []
    engine.dispose()


def test_migrations_run_once_when_stations_start_together(backend, history_url):
    """Replicas starting at once on one new database: the lock lets one migrate, the others find it done."""
    from concurrent.futures import ThreadPoolExecutor

    from clad.serve.db import make_engine, migrate

    url = history_url(backend)
    engines = [make_engine(url) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(migrate, engines)) == ["0001"] * 4
    for e in engines:
        e.dispose()


def test_retention_deletes_old_rows_and_the_files_only_they_named(models, backend, history_url, tmp_path):
    import datetime as dt

    from clad.serve.db import Inspection
    from clad.serve.server import settings_for
    from clad.serve.station import Station

    station = Station(settings_for([models["knn"]], data_dir=str(tmp_path / "st"), db=history_url(backend),
                                   retention_days=1))
    old = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    new = dt.datetime.now(dt.timezone.utc)
    common = dict(model="knn", model_version=1, image_format="png", image_stored=True, width=1, height=1, score=0.0,
                  uncertain=False, explanation={}, timings={}, map_min=0.0, map_max=1.0)
    sha = [station.images.put(d, "png") for d in (b"old", b"shared")]
    maps = [station.maps.put(d, "png") for d in (b"m-old", b"m-shared")]
    with station.Session() as s:
        s.add_all([Inspection(created=old, image_sha256=sha[0], map_sha256=maps[0], **common),
                   Inspection(created=old, image_sha256=sha[1], map_sha256=maps[1], **common),
                   Inspection(created=new, image_sha256=sha[1], map_sha256=maps[1], **common)])
        s.commit()
    assert station.apply_retention() == 2
    with station.Session() as s:
        assert [r.created.year for r in s.query(Inspection)] == [new.year]
    assert station.images.get(sha[0], "png") is None and station.maps.get(maps[0], "png") is None
    assert station.images.get(sha[1], "png") == b"shared" and station.maps.get(maps[1], "png") == b"m-shared"
    station.engine.dispose()


def test_serve_command_errors_are_one_line(models, tmp_path, capsys, monkeypatch):
    from clad.cli import main

    assert main(["serve"]) == 2
    assert "at least one MODEL_DIR" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    short = tmp_path / "key"
    short.write_text("abc")
    assert main(["serve", str(models["knn"]), "--api-key-file", str(short)]) == 2
    assert "at least 16 characters" in capsys.readouterr().err
    for url, problem in [("postgresql+psycopg://ana:s3cret@127.0.0.1:1/h", "Connection refused"),
                         ("postgres://ana:s3cret@127.0.0.1:1/h", "unknown database kind"), ("h.db", "not a database URL")]:
        assert main(["serve", str(models["knn"]), "--db", url]) == 2
        err = capsys.readouterr().err
        assert err.startswith("clad: error: --db ") and problem in err and err.count("\n") == 1, err
        assert "s3cret" not in err and ("ana:***@127.0.0.1:1/h" in err or "@" not in url)
    assert main(["serve", str(models["knn"]), "--replicas", "2"]) == 2
    assert "go with --engine ray" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", str(models["knn"])]) == 2
    assert 'pip install -e ".[app]"' in capsys.readouterr().err
