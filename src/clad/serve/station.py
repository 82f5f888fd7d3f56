"""The inspection station without its HTTP layer: models, the batcher, the history, the stores.

An inspection: the upload is decoded (``clad.data.io.decode_image``, in a thread) before it joins the queue, so a
bad image fails alone; the batcher runs ``detector.predict`` on a batch and the explainer on its maps in the
inference thread; the writer thread stores the image (content-addressed, unless images are not stored) and the
map (a 16-bit PNG), and commits the batch's rows in one transaction before any of its requests is answered.
"""
from __future__ import annotations

import asyncio
import collections
import csv
import datetime as dt
import hmac
import io
import json
import logging
import re
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import delete, exists, func, select

from clad.serve import pictures
from clad.serve.batcher import Batcher, QueueFull
from clad.serve.blobs import BlobStore, sha256
from clad.serve.db import Inspection, Rating, Verdict, iso, open_database, session_factory, utcnow
from clad.serve.metrics import Metrics
from clad.serve.versions import ModelSlot

log = logging.getLogger("clad.serve")
UNCERTAIN = (0.4, 0.6)  # normalised scores this close to the threshold (0.5) go to the review queue
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
RATING_SEED = 0


# -- errors the HTTP layer turns into statuses ------------------------------------------------------------------
class StationError(Exception):
    status = 400

    def __init__(self, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.detail, self.headers = detail, headers or {}


class NotFound(StationError):
    status = 404


class Conflict(StationError):
    status = 409


class Unprocessable(StationError):
    status = 422


class Unavailable(StationError):
    status = 503


@dataclass
class Settings:
    """Everything ``clad serve`` was told. images_dir None: images are not stored."""

    models: list[Path]
    data_dir: Path
    db_url: str
    images_dir: Path | None
    api_key: str | None = None
    max_batch: int = 16
    max_wait_ms: float = 10.0
    queue: int = 64
    max_body_mb: float = 20.0
    retention_days: float | None = None
    cors_origins: list[str] = field(default_factory=list)
    seed_images: list[Path] = field(default_factory=list)  # inspected once into an empty history (--demo)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


@dataclass
class Upload:
    image: np.ndarray  # (H, W, 3) uint8
    data: bytes
    format: str
    sha256: str
    source: str | None
    arrived: float  # perf_counter
    decode_ms: float


@dataclass
class Outcome:
    version: int
    result: object  # AnomalyResult
    explanations: list
    predict_ms: float
    explain_ms: float
    heat_min: float | None
    heat_max: float | None


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class Station:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.slots: dict[str, ModelSlot] = {}
        for folder in settings.models:
            slot = ModelSlot(folder)
            if slot.name in self.slots:
                from clad.errors import SpecError

                raise SpecError(f"two models are named {slot.name!r} ({self.slots[slot.name].folder} and "
                                f"{slot.folder}): a model's name is its folder's name, rename one")
            self.slots[slot.name] = slot
        # after the models: a mistyped folder creates no database
        self.engine, self.revision = open_database(settings.db_url)
        self.Session = session_factory(self.engine)
        self.images = BlobStore(settings.images_dir) if settings.images_dir is not None else None
        self.maps = BlobStore(Path(settings.data_dir) / "maps")
        self.metrics = Metrics()
        self.batcher = Batcher(self._infer, self._finish, max_batch=settings.max_batch,
                               max_wait=settings.max_wait_ms / 1000.0, capacity=settings.queue,
                               on_batch=self.metrics.batch_size.observe, on_depth=self.metrics.queue_depth.set)
        self.ready = False
        self.failure: str | None = None
        self._pictures: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()  # computed PNGs (LRU)
        self._pictures_lock = threading.Lock()
        self._tasks: list[asyncio.Task] = []

    # -- life cycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.batcher.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self._warm_up(), name="clad-warm-up"))
        if self.settings.retention_days is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._retention_loop(), name="clad-retention"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.batcher.stop()
        self.engine.dispose()

    async def _warm_up(self) -> None:
        try:
            for slot in self.slots.values():
                if slot.active is not None:  # loaded before the start (a Ray Serve replica loads in __init__)
                    continue
                t0 = time.perf_counter()
                await self.batcher.run_in_worker(slot.load)
                log.info("model %s version %d loaded and warmed in %.1f s", slot.name, slot.active.version.version,
                         time.perf_counter() - t0)
            self.ready = True
        except Exception as e:  # noqa: BLE001 - /ready says why; the process stays up for /health and the logs
            self.failure = f"{type(e).__name__}: {e}"
            log.exception("loading the models failed")
            return
        if self.settings.seed_images:
            await self._seed()

    async def _seed(self) -> None:
        """Inspect the demo's images once, so that a new station shows something at once."""
        with self.Session() as s:
            if s.scalar(select(func.count()).select_from(Inspection)):
                return
        name = next(iter(self.slots))
        for path in self.settings.seed_images:
            try:
                await self.inspect(name, Path(path).read_bytes(), "demo", time.perf_counter())
            except (StationError, QueueFull, OSError) as e:
                log.warning("demo image %s: %s", path, e)

    # -- inspecting -----------------------------------------------------------------------------------------------
    def slot(self, name: str) -> ModelSlot:
        slot = self.slots.get(name)
        if slot is None:
            raise NotFound(f"no model named {name!r}; served: {', '.join(sorted(self.slots))}")
        return slot

    def check_ready(self) -> None:
        if not self.ready:
            why = f"loading the models failed ({self.failure})" if self.failure else "the models are still loading"
            raise Unavailable(f"not ready: {why}", {"Retry-After": "5"})

    async def inspect(self, name: str, data: bytes, source: str | None, arrived: float) -> dict:
        """Decode, queue, predict, explain, store and commit one image; returns its Inspection."""
        from starlette.concurrency import run_in_threadpool

        self.slot(name)
        self.check_ready()
        if source is not None and len(source) > 200:
            raise Unprocessable("source: at most 200 characters")
        upload = await run_in_threadpool(self._decode, data, source, arrived)
        try:
            future = self.batcher.submit(name, upload)
        except QueueFull as e:
            self.metrics.errors.labels("queue_full").inc()
            raise Unavailable(str(e), {"Retry-After": str(e.retry_after)}) from e
        return await future

    def _decode(self, data: bytes, source: str | None, arrived: float) -> Upload:
        from clad.data.io import decode_image
        from clad.errors import ImageLoadError

        t0 = time.perf_counter()
        try:
            image, fmt = decode_image(data, "the uploaded image")
        except ImageLoadError as e:
            self.metrics.errors.labels("bad_image").inc()
            raise Unprocessable(str(e)) from e
        return Upload(image, data, fmt, sha256(data), source, arrived, _ms(time.perf_counter() - t0))

    def _infer(self, jobs) -> Outcome:
        """The inference thread: one forward for the batch, then its explanations."""
        from clad.types import AnomalyResult

        slot = self.slots[jobs[0].model]
        slot.refresh(blocking=False)  # another replica may have changed the active version: one stat per batch
        active = slot.active
        det, explainer = active.detector, active.explainer
        arrays = [j.payload.image for j in jobs]
        t0 = time.perf_counter()
        result = det.predict(arrays, batch_size=len(arrays))
        t1 = time.perf_counter()
        if explainer.pixel_threshold_ is None:  # each image's own percentile: independent of its batch
            explanations = [explainer.explain([a], AnomalyResult(result.scores[i : i + 1], [result.anomaly_maps[i]],
                                                                 threshold=result.threshold))[0]
                            for i, a in enumerate(arrays)]
        else:
            explanations = explainer.explain(arrays, result)
        t2 = time.perf_counter()
        heat = pictures.heat_range(det.threshold_, bool(getattr(det, "score_is_map_max", False)))
        self.metrics.stage_seconds.labels("predict").observe(t1 - t0)
        self.metrics.stage_seconds.labels("explain").observe(t2 - t1)
        return Outcome(active.version.version, result, explanations, _ms(t1 - t0), _ms(t2 - t1), *heat)

    def _finish(self, jobs, out: Outcome) -> list:
        """The writer thread: store images and maps, commit the batch's rows, return their Inspections."""
        t0 = time.perf_counter()
        rows, created = [], utcnow()
        res = out.result
        for i, job in enumerate(jobs):
            up: Upload = job.payload
            stored = False
            if self.images is not None:
                self.images.put(up.data, up.format.lower(), up.sha256)
                stored = True
            map_png, lo, hi = pictures.encode_map(res.anomaly_maps[i])
            norm = None if res.normalized_scores is None else float(res.normalized_scores[i])
            decision = None if res.labels is None else ("defect" if bool(res.labels[i]) else "normal")
            rows.append(Inspection(
                created=created, model=job.model, model_version=out.version, source=up.source,
                image_sha256=up.sha256, image_format=up.format.lower(), image_stored=stored,
                width=int(up.image.shape[1]), height=int(up.image.shape[0]), score=float(res.scores[i]),
                score_normalized=norm, threshold=res.threshold, decision=decision,
                uncertain=norm is not None and UNCERTAIN[0] <= norm <= UNCERTAIN[1],
                explanation=_plain(out.explanations[i].to_dict()),
                map_sha256=self.maps.put(map_png, "png"), map_min=lo, map_max=hi,
                heat_min=out.heat_min, heat_max=out.heat_max,
                timings={"decode": up.decode_ms, "queue": _ms(job.started - job.queued), "predict": out.predict_ms,
                         "explain": out.explain_ms},
            ))
        now = time.perf_counter()
        for job, row in zip(jobs, rows):
            row.timings = dict(row.timings, save=_ms(now - t0), total=_ms(now - job.payload.arrived))
        with self.Session() as s:
            s.add_all(rows)
            s.commit()
        self.metrics.stage_seconds.labels("save").observe(time.perf_counter() - t0)
        for row in rows:
            self.metrics.inspections.labels(row.model, row.decision or "none").inc()
        return [inspection_json(r) for r in rows]

    # -- the history ------------------------------------------------------------------------------------------
    def _row(self, s, inspection_id: int) -> Inspection:
        row = s.get(Inspection, inspection_id)
        if row is None:
            raise NotFound(f"no inspection {inspection_id}")
        return row

    def get(self, inspection_id: int) -> dict:
        with self.Session() as s:
            return inspection_json(self._row(s, inspection_id))

    def list_inspections(self, model=None, decision=None, verdict=None, uncertain=None, since=None, until=None,
             limit: int = 50, offset: int = 0) -> dict:
        q = select(Inspection)
        if model is not None:
            q = q.where(Inspection.model == model)
        if decision is not None:
            q = q.where(Inspection.decision == decision)
        if verdict == "none":
            q = q.where(Inspection.verdict.is_(None))
        elif verdict == "any":
            q = q.where(Inspection.verdict.is_not(None))
        elif verdict is not None:
            q = q.where(Inspection.verdict == verdict)
        if uncertain is not None:
            q = q.where(Inspection.uncertain.is_(bool(uncertain)))
        if since is not None:
            q = q.where(Inspection.created >= since)
        if until is not None:
            q = q.where(Inspection.created < until)
        with self.Session() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            rows = s.scalars(q.order_by(Inspection.id.desc()).limit(limit).offset(offset)).all()
            return {"items": [inspection_json(r) for r in rows], "total": int(total)}

    def set_verdict(self, inspection_id: int, verdict: str, defect_type=None, rating=None, note=None,
                    operator=None) -> dict:
        with self.Session() as s:
            row = self._row(s, inspection_id)
            now = utcnow()
            s.add(Verdict(inspection_id=row.id, created=now, verdict=verdict, defect_type=defect_type, rating=rating,
                          note=note, operator=operator))
            row.verdict, row.defect_type, row.rating, row.note, row.operator = verdict, defect_type, rating, note, operator
            row.verdict_created = now
            s.commit()
            return inspection_json(row)

    def scores(self, name: str) -> dict:
        slot = self.slot(name)
        lineage = slot.lineage()
        with self.Session() as s:
            rows = s.execute(select(Inspection.id, Inspection.score, Inspection.verdict)
                             .where(Inspection.model == name, Inspection.model_version.in_(lineage))
                             .order_by(Inspection.id)).all()
        threshold = slot.version(lineage[0]).threshold  # the active version's, as on disk (every replica's)
        return {"threshold": threshold, "items": [{"id": i, "score": sc, "verdict": v} for i, sc, v in rows]}

    # -- pictures ---------------------------------------------------------------------------------------------
    def _image(self, row: Inspection) -> np.ndarray:
        from clad.data.io import decode_image

        data = self.images.get(row.image_sha256, row.image_format) if (self.images and row.image_stored) else None
        if data is None:
            raise NotFound(f"inspection {row.id}: its image is not stored")
        return decode_image(data, f"inspection {row.id}'s image")[0]

    def _map(self, row: Inspection) -> np.ndarray:
        data = self.maps.get(row.map_sha256, "png")
        if data is None:
            raise NotFound(f"inspection {row.id}: its anomaly map is no longer stored")
        return pictures.decode_map(data, row.map_min, row.map_max)

    def picture(self, inspection_id: int, kind: str, alpha: float = 0.5) -> bytes:
        """image | thumbnail | heatmap | overlay, as PNG."""
        with self.Session() as s:
            row = self._row(s, inspection_id)
        if kind == "image":
            return pictures.png(self._image(row))
        if kind == "thumbnail":
            return self._cached(("thumbnail", row.id), lambda: pictures.thumbnail_png(self._image(row)))
        amap = self._map(row)
        if kind == "heatmap":
            return pictures.heatmap_png(amap, row.heat_min, row.heat_max)
        return pictures.overlay_png(self._image(row), amap, row.heat_min, row.heat_max, alpha)

    def _cached(self, key: tuple, make) -> bytes:
        with self._pictures_lock:
            if key in self._pictures:
                self._pictures.move_to_end(key)
                return self._pictures[key]
        data = make()
        with self._pictures_lock:
            self._pictures[key] = data
            while len(self._pictures) > 512:
                self._pictures.popitem(last=False)
        return data

    async def nearest(self, inspection_id: int, region: int = 0) -> bytes:
        """The closest normal patch of the model's references to one region of the inspection (computed on first
        view, in the inference thread, then kept)."""
        from starlette.concurrency import run_in_threadpool

        with self.Session() as s:
            row = self._row(s, inspection_id)
        slot = self.slot(row.model)
        self.check_ready()
        regions = row.explanation.get("regions") or []
        if not 0 <= region < len(regions):
            raise NotFound(f"inspection {row.id} has no region {region} ({len(regions)} region(s))")
        key = ("nearest", row.id, region)
        with self._pictures_lock:
            if key in self._pictures:
                return self._pictures[key]
        image, amap = await run_in_threadpool(lambda: (self._image(row), self._map(row)))
        data = await self.batcher.run_in_worker(self._nearest_png, slot, row, image, amap, region)
        return self._cached(key, lambda: data)

    def _nearest_png(self, slot: ModelSlot, row: Inspection, image, amap, region: int) -> bytes:
        from clad.explain import Explainer
        from clad.types import AnomalyResult

        active = slot.active
        if active.nearest is None:
            refs = slot.reference_images()
            if not refs:
                raise NotFound(f"model {slot.name} has no reference images for the closest normal patch (normal "
                               f"images in {slot.references_dir.name}/ of its folder, added by teaching or --demo)")
            active.nearest = Explainer(active.detector).fit(references=refs)
            active.references = refs
        # the regions as the inspection found them: its own pixel threshold, on its stored map
        active.nearest.pixel_threshold_ = row.explanation["pixel_threshold"]
        result = AnomalyResult(np.array([row.score], np.float32), [amap], threshold=row.threshold)
        found = active.nearest.explain([image], result)[0].regions
        match = found[region].nearest_normal if region < len(found) else None
        if match is None:
            raise NotFound(f"inspection {row.id}: the model gives no closest normal patch")
        return pictures.nearest_png(active.references[match.reference], match.box)

    # -- models -------------------------------------------------------------------------------------------------
    def model_json(self, name: str) -> dict:
        """The model as its folder has it: the active version on disk is the one every replica serves from its
        next batch (``ModelSlot.refresh``), so every replica answers the same."""
        slot = self.slot(name)
        versions = slot.versions()
        active_n = slot.active_number()
        det = slot.initial  # the detector's kind and capabilities: the same in every version
        current = next(v for v in versions if v.version == active_n)
        return {"name": name, "detector": det.name, "version": active_n, "threshold": current.threshold,
                "threshold_source": current.threshold_source, "n_references": current.n_references,
                "can_add_references": bool(getattr(det, "can_add_references", False)),
                "ready": slot.active is not None, "versions": [v.to_json(active_n) for v in versions]}

    def models_json(self) -> list[dict]:
        return [self.model_json(n) for n in self.slots]

    async def set_threshold(self, name: str, threshold: float) -> dict:
        from starlette.concurrency import run_in_threadpool

        slot = self.slot(name)
        self.check_ready()
        await run_in_threadpool(slot.set_threshold, threshold)
        return self.model_json(name)

    async def rollback(self, name: str, version: int) -> dict:
        from starlette.concurrency import run_in_threadpool

        slot = self.slot(name)
        self.check_ready()
        if slot.version(version) is None:
            raise NotFound(f"model {name} has no version {version}; versions: "
                           f"{', '.join(str(v.version) for v in slot.versions())}")
        await run_in_threadpool(slot.rollback, version)
        return self.model_json(name)

    async def teach(self, name: str, inspection_ids: list[int] | None) -> dict:
        from starlette.concurrency import run_in_threadpool

        slot = self.slot(name)
        self.check_ready()
        det = slot.active.detector
        if not getattr(det, "can_add_references", False):
            raise Conflict(f"model {name} ({det.name}) cannot add references without a refit; refit it with the "
                           "confirmed normal images among its references")
        t0 = time.perf_counter()
        taught = await run_in_threadpool(self._teach, slot, inspection_ids)
        return {"model": self.model_json(name), "taught": taught, "seconds": round(time.perf_counter() - t0, 3)}

    def _teach(self, slot: ModelSlot, inspection_ids: list[int] | None) -> int:
        rows = self._teachable(slot.name, inspection_ids)
        images = [self._image(row) for row in rows]
        pngs = {row.image_sha256: pictures.png(image) for row, image in zip(rows, images)}
        version, _ = slot.teach(images, pngs)
        with self.Session() as s:
            for row in rows:
                s.get(Inspection, row.id).taught_in_version = version.version
            s.commit()
        return len(rows)

    def _teachable(self, name: str, ids: list[int] | None) -> list[Inspection]:
        with self.Session() as s:
            if ids is None:
                rows = s.scalars(select(Inspection).where(
                    Inspection.model == name, Inspection.verdict == "normal", Inspection.taught_in_version.is_(None),
                    Inspection.image_stored.is_(True)).order_by(Inspection.id)).all()
                if not rows:
                    raise Unprocessable(f"nothing to teach: no inspection of model {name} is confirmed normal by an "
                                        "operator, not taught yet and has its image stored")
                return list(rows)
            if not ids:
                raise Unprocessable("inspection_ids is empty: give ids, or null for every confirmed normal one")
            rows = []
            for i in dict.fromkeys(ids):
                row = self._row(s, i)
                why = ("belongs to model " + row.model if row.model != name else
                       "is not confirmed normal by an operator" if row.verdict != "normal" else
                       "has no stored image" if not row.image_stored else None)
                if why:
                    raise Unprocessable(f"inspection {i} {why}: it cannot be taught to model {name}")
                rows.append(row)
            return rows

    # -- blind rating -------------------------------------------------------------------------------------------
    def _options(self, inspection_id: int) -> list[str]:
        """The served models in the seeded order of an inspection's options: A, B, ..."""
        names = sorted(self.slots)
        order = np.random.default_rng([RATING_SEED, inspection_id]).permutation(len(names))
        return [names[k] for k in order]

    def next_rating(self, rater: str) -> dict:
        rater = _rater(rater)
        n = len(self.slots)
        done = (select(func.count()).where(Rating.inspection_id == Inspection.id, Rating.rater == rater)
                .correlate(Inspection).scalar_subquery())
        with self.Session() as s:
            row = s.scalars(select(Inspection).where(Inspection.decision == "defect", Inspection.image_stored.is_(True),
                                                     done < n).order_by(Inspection.id).limit(1)).first()
        if row is None:
            return {"task": None}
        prefix = "/api/v1"
        return {"task": {"inspection_id": row.id, "image_url": f"{prefix}/inspections/{row.id}/image.png",
                         "options": [{"option": LETTERS[k], "url": f"{prefix}/ratings/{row.id}/options/{LETTERS[k]}.png"}
                                     for k in range(n)]}}

    def _option_model(self, inspection_id: int, option: str) -> str:
        models = self._options(inspection_id)
        k = LETTERS.find(option) if len(option) == 1 else -1
        if not 0 <= k < len(models):
            raise Unprocessable(f"option {option!r}: this station's options are {LETTERS[0]}-{LETTERS[len(models) - 1]}")
        return models[k]

    async def option_png(self, inspection_id: int, option: str) -> bytes:
        """One blind option: the overlay of one served model's map of the inspection's image, each map scaled to
        its own min-max (as ``clad bench --rating-sheet`` draws them)."""
        from starlette.concurrency import run_in_threadpool

        with self.Session() as s:
            row = self._row(s, inspection_id)
        model = self._option_model(inspection_id, option)
        key = ("option", row.id, model)
        with self._pictures_lock:
            if key in self._pictures:
                return self._pictures[key]
        image = await run_in_threadpool(self._image, row)
        if model == row.model:
            amap = await run_in_threadpool(self._map, row)
        else:
            self.check_ready()
            slot = self.slots[model]
            amap = await self.batcher.run_in_worker(
                lambda: slot.active.detector.predict([image], batch_size=1).anomaly_maps[0])
        data = await run_in_threadpool(pictures.overlay_png, image, amap, None, None, 0.45)
        return self._cached(key, lambda: data)

    def rate(self, inspection_id: int, option: str, rating: int, rater: str) -> None:
        rater = _rater(rater)
        with self.Session() as s:
            self._row(s, inspection_id)
            model = self._option_model(inspection_id, option)
            s.execute(delete(Rating).where(Rating.inspection_id == inspection_id, Rating.rater == rater,
                                           Rating.option == option))
            s.add(Rating(inspection_id=inspection_id, rater=rater, option=option, model=model, rating=rating,
                         created=utcnow()))
            s.commit()

    def ratings_zip(self) -> bytes:
        """``sheet_<rater>.csv`` per rater and ``key.json``, as ``clad bench --ratings`` reads them."""
        from clad.bench.ratings import KEY_FORMAT

        with self.Session() as s:
            ratings = s.scalars(select(Rating).order_by(Rating.rater, Rating.inspection_id, Rating.option)).all()
        options: dict[str, dict[str, str]] = {}
        sheets: dict[str, list[dict]] = collections.defaultdict(list)
        for r in ratings:
            image_id = f"inspection-{r.inspection_id}"
            options.setdefault(image_id, {})[r.option] = r.model
            sheets[r.rater].append({"image_id": image_id, "option": r.option, "rating": r.rating, "ground_truth": "",
                                    "image": f"/api/v1/ratings/{r.inspection_id}/options/{r.option}.png"})
        labels = sorted(set(self.slots) | {r.model for r in ratings})
        key = {"format": KEY_FORMAT, "settings": {"source": "clad serve", "detectors": [{"label": m} for m in labels],
                                                  "seed": RATING_SEED, "scale": "per_map"},
               "options": options}
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for rater, rows in sheets.items():
                text = io.StringIO()
                w = csv.DictWriter(text, fieldnames=["image_id", "option", "rating", "ground_truth", "image"])
                w.writeheader()
                w.writerows(rows)
                z.writestr(f"sheet_{rater}.csv", text.getvalue())
            z.writestr("key.json", json.dumps(key, indent=2))
        return buf.getvalue()

    # -- retention ----------------------------------------------------------------------------------------------
    async def _retention_loop(self) -> None:
        from starlette.concurrency import run_in_threadpool

        while True:
            try:
                n = await run_in_threadpool(self.apply_retention)
                if n:
                    log.info("retention: %d inspection(s) older than %g day(s) deleted", n,
                             self.settings.retention_days)
            except Exception:  # noqa: BLE001 - try again next hour
                log.exception("retention failed")
            await asyncio.sleep(3600)

    def apply_retention(self, now: dt.datetime | None = None) -> int:
        """Delete the inspections older than ``retention_days`` with their verdicts and ratings, and the stored
        images and maps no remaining inspection names; returns how many inspections went."""
        cutoff = (now or utcnow()) - dt.timedelta(days=self.settings.retention_days)
        total = 0
        while True:
            with self.Session() as s:
                old = s.execute(select(Inspection.id, Inspection.image_sha256, Inspection.image_format,
                                       Inspection.map_sha256).where(Inspection.created < cutoff).limit(500)).all()
                if not old:
                    return total
                ids = [o[0] for o in old]
                s.execute(delete(Verdict).where(Verdict.inspection_id.in_(ids)))
                s.execute(delete(Rating).where(Rating.inspection_id.in_(ids)))
                s.execute(delete(Inspection).where(Inspection.id.in_(ids)))
                s.commit()
                for _, image, fmt, amap in old:
                    if self.images is not None and not s.scalar(select(exists().where(Inspection.image_sha256 == image))):
                        self.images.delete(image, fmt)
                    if not s.scalar(select(exists().where(Inspection.map_sha256 == amap))):
                        self.maps.delete(amap, "png")
                total += len(ids)

    # -- keys ---------------------------------------------------------------------------------------------------
    def key_ok(self, given: str | None) -> bool:
        key = self.settings.api_key
        if key is None:
            return True
        return given is not None and hmac.compare_digest(given.encode(), key.encode())


def _rater(name: str) -> str:
    name = (name or "").strip()
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,50}", name):
        raise Unprocessable("rater: 1-50 letters, digits, '_', '.' or '-' (it names the rater's sheet file)")
    return name


def _plain(doc):
    """numpy numbers and tuples as JSON has them."""
    return json.loads(json.dumps(doc, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def verdict_json(row: Inspection) -> dict | None:
    if row.verdict is None:
        return None
    return {"verdict": row.verdict, "defect_type": row.defect_type, "rating": row.rating, "note": row.note,
            "operator": row.operator, "created": iso(row.verdict_created)}


def inspection_json(row: Inspection) -> dict:
    exp = row.explanation or {}
    regions = [{"box": list(r["bbox"]), "share": r["area_percent"] / 100.0, "location": r.get("location"),
                "types": [{"name": t["name"], "score": t["similarity"]} for t in r.get("types", [])]}
               for r in exp.get("regions", [])]
    return {"id": row.id, "model": row.model, "model_version": row.model_version, "created": iso(row.created),
            "source": row.source, "image_sha256": row.image_sha256, "width": row.width, "height": row.height,
            "score": row.score, "score_normalized": row.score_normalized, "threshold": row.threshold,
            "decision": row.decision, "sentence": exp.get("sentence", ""), "regions": regions,
            "uncertain": row.uncertain, "timings_ms": row.timings, "image_stored": row.image_stored,
            "verdict": verdict_json(row), "taught_in_version": row.taught_in_version}
