"""The HTTP layer of the station (FastAPI): routes of API v1 (``/api/v1``), ``/metrics``, the web app at ``/``.

Every route maps HTTP to one ``Station`` method; errors are ``{"detail": "one sentence"}`` with their status.
Write routes (POST) need ``X-API-Key`` when the station has a key. Request bodies are limited by ``BodyLimit``
(the declared Content-Length, and the bytes actually read).
"""
from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from clad.serve.station import Station, StationError

API = "/api/v1"
STATIC = Path(__file__).parent / "static"
PNG_CACHE = {"Cache-Control": "private, max-age=86400"}


# -- schemas (the OpenAPI at /docs shows them) ----------------------------------------------------------------
class VersionOut(BaseModel):
    version: int
    created: str | None
    reason: str
    parent: int | None = None
    threshold: float | None
    n_references: int | None
    active: bool


class ModelOut(BaseModel):
    name: str
    detector: str
    version: int
    threshold: float | None
    threshold_source: str | None
    n_references: int | None
    can_add_references: bool
    ready: bool
    versions: list[VersionOut]


class TypeOut(BaseModel):
    name: str
    score: float


class RegionOut(BaseModel):
    box: list[int] = Field(description="x0, y0, x1, y1 in the input's pixels, end-exclusive")
    share: float = Field(description="share of the image, 0-1")
    location: str | None = None
    types: list[TypeOut]


class VerdictOut(BaseModel):
    verdict: Literal["normal", "defect"]
    defect_type: str | None
    rating: int | None
    note: str | None
    operator: str | None
    created: str | None


class InspectionOut(BaseModel):
    id: int
    model: str
    model_version: int
    created: str
    source: str | None
    image_sha256: str
    width: int
    height: int
    score: float
    score_normalized: float | None
    threshold: float | None
    decision: Literal["defect", "normal"] | None
    sentence: str
    regions: list[RegionOut]
    uncertain: bool
    timings_ms: dict[str, float]
    image_stored: bool
    verdict: VerdictOut | None
    taught_in_version: int | None


class InspectionList(BaseModel):
    items: list[InspectionOut]
    total: int


class VerdictIn(BaseModel):
    verdict: Literal["normal", "defect"]
    defect_type: str | None = Field(None, max_length=100)
    rating: int | None = Field(None, ge=1, le=5)
    note: str | None = Field(None, max_length=2000)
    operator: str | None = Field(None, max_length=100)


class ThresholdIn(BaseModel):
    threshold: float = Field(allow_inf_nan=False)


class TeachIn(BaseModel):
    inspection_ids: list[int] | None = Field(None, max_length=10000)


class TeachOut(BaseModel):
    model: ModelOut
    taught: int
    seconds: float


class RollbackIn(BaseModel):
    version: int = Field(ge=1)


class ScoreItem(BaseModel):
    id: int
    score: float
    verdict: Literal["normal", "defect"] | None


class ScoresOut(BaseModel):
    threshold: float | None
    items: list[ScoreItem]


class RatingIn(BaseModel):
    inspection_id: int
    option: str = Field(min_length=1, max_length=2)
    rating: int = Field(ge=1, le=5)
    rater: str = Field(min_length=1, max_length=50)


# -- middleware ------------------------------------------------------------------------------------------------
class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over the limit of {limit / 1048576:g} MiB")


class BodyLimit:
    """413 when the declared Content-Length is over ``limit`` bytes (before reading anything), or when the bytes
    read pass it (a chunked body, or a Content-Length that lies)."""

    def __init__(self, app, limit: int, station: Station):
        self.app, self.limit, self.station = app, limit, station

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            self.station.metrics.errors.labels("too_large").inc()
            response = JSONResponse({"detail": BodyTooLarge(self.limit).detail}, 413, headers={"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    self.station.metrics.errors.labels("too_large").inc()
                    raise BodyTooLarge(self.limit)
            return message

        return await self.app(scope, counted, send)


class Timing:
    """``clad_request_seconds`` per method, route template and status."""

    def __init__(self, app, station: Station):
        self.app, self.station = app, station

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or ("static" if not scope["path"].startswith(API)
                                                                    else "unmatched")
            self.station.metrics.request_seconds.labels(scope["method"], route, str(status[0])).observe(
                time.perf_counter() - t0)


class ReplicaHeader:
    """``X-Clad-Replica: <name>`` on every response: which replica answered (``clad serve --engine ray``)."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (b"x-clad-replica", replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def sending(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), self.header])
            await send(message)

        return await self.app(scope, receive, sending)


# -- the app ---------------------------------------------------------------------------------------------------
def create_app(station: Station, replica: str | None = None) -> FastAPI:
    """The station's app; ``replica``: this replica's name, sent in ``X-Clad-Replica`` with every response."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await station.start()
        try:
            yield
        finally:
            await station.stop()

    app = FastAPI(title="clad station", version="1", lifespan=lifespan,
                  description="Industrial visual anomaly inspection: inspect images, review them, teach the models.")
    app.state.station = station

    @app.exception_handler(StationError)
    async def station_error(request: Request, e: StationError):
        return JSONResponse({"detail": e.detail}, e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors()[:3]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
            parts.append(f"{where or 'body'}: {err.get('msg')}")
        return JSONResponse({"detail": "; ".join(parts)}, 422)

    def key(x_api_key: str | None = Header(None, description="the station's key, when it has one")) -> None:
        if not station.key_ok(x_api_key):
            station.metrics.errors.labels("unauthorized").inc()
            raise HTTPException(401, "missing or wrong X-API-Key: write requests need the station's key")

    write = [Depends(key)]

    # -- health ------------------------------------------------------------------------------------------------
    @app.get(f"{API}/health", tags=["health"])
    def health() -> dict:
        return {"status": "ok"}

    @app.get(f"{API}/ready", tags=["health"], responses={503: {"description": "models still loading"}})
    def ready():
        body = {"ready": station.ready, "models": list(station.slots)}
        if station.failure:
            body["error"] = station.failure
        return JSONResponse(body, 200 if station.ready else 503, headers={} if station.ready else {"Retry-After": "5"})

    @app.get("/metrics", tags=["health"], response_class=Response)
    def metrics():
        station.metrics.queue_depth.set(station.batcher.depth())
        data, content_type = station.metrics.text()
        return Response(data, media_type=content_type)

    # -- models ------------------------------------------------------------------------------------------------
    @app.get(f"{API}/models", tags=["models"], response_model=list[ModelOut])
    def models():
        return station.models_json()

    @app.post(f"{API}/models/{{name}}/threshold", tags=["models"], response_model=ModelOut, dependencies=write)
    async def set_threshold(name: str, body: ThresholdIn):
        return await station.set_threshold(name, body.threshold)

    @app.post(f"{API}/models/{{name}}/teach", tags=["models"], response_model=TeachOut, dependencies=write,
              responses={409: {"description": "the detector cannot add references"},
                         422: {"description": "nothing to teach"}})
    async def teach(name: str, body: TeachIn):
        return await station.teach(name, body.inspection_ids)

    @app.post(f"{API}/models/{{name}}/rollback", tags=["models"], response_model=ModelOut, dependencies=write)
    async def rollback(name: str, body: RollbackIn):
        return await station.rollback(name, body.version)

    @app.get(f"{API}/models/{{name}}/scores", tags=["models"], response_model=ScoresOut)
    def scores(name: str):
        return station.scores(name)

    # -- inspections -------------------------------------------------------------------------------------------
    image_body = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}}}}}

    @app.post(f"{API}/models/{{name}}/inspect", tags=["inspections"], status_code=201, response_model=InspectionOut,
              dependencies=write, openapi_extra=image_body,
              responses={413: {"description": "body too large"}, 415: {"description": "not an image body"},
                         422: {"description": "the image cannot be decoded"}, 503: {"description": "queue full"}})
    async def inspect(name: str, request: Request, source: str | None = Query(None, max_length=200)):
        arrived = time.perf_counter()
        station.slot(name)
        station.check_ready()
        data = await _image_bytes(request)
        return await station.inspect(name, data, source, arrived)

    @app.get(f"{API}/inspections", tags=["inspections"], response_model=InspectionList)
    def inspections(model: str | None = None, decision: Literal["defect", "normal"] | None = None,
                    verdict: Literal["none", "normal", "defect", "any"] | None = None,
                    uncertain: bool | None = None, since: dt.datetime | None = None, until: dt.datetime | None = None,
                    limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0)):
        return station.list_inspections(model, decision, verdict, uncertain, _utc(since), _utc(until), limit, offset)

    @app.get(f"{API}/inspections/{{inspection_id}}", tags=["inspections"], response_model=InspectionOut)
    def inspection(inspection_id: int):
        return station.get(inspection_id)

    @app.post(f"{API}/inspections/{{inspection_id}}/verdict", tags=["inspections"], response_model=InspectionOut,
              dependencies=write)
    def verdict(inspection_id: int, body: VerdictIn):
        return station.set_verdict(inspection_id, body.verdict, body.defect_type, body.rating, body.note,
                                   body.operator)

    png = {"content": {"image/png": {}}, "description": "PNG"}

    @app.get(f"{API}/inspections/{{inspection_id}}/image.png", tags=["pictures"], response_class=Response,
             responses={200: png})
    def image(inspection_id: int):
        return _png(station.picture(inspection_id, "image"))

    @app.get(f"{API}/inspections/{{inspection_id}}/thumbnail.png", tags=["pictures"], response_class=Response,
             responses={200: png})
    def thumbnail(inspection_id: int):
        return _png(station.picture(inspection_id, "thumbnail"))

    @app.get(f"{API}/inspections/{{inspection_id}}/heatmap.png", tags=["pictures"], response_class=Response,
             responses={200: png})
    def heatmap(inspection_id: int):
        return _png(station.picture(inspection_id, "heatmap"))

    @app.get(f"{API}/inspections/{{inspection_id}}/overlay.png", tags=["pictures"], response_class=Response,
             responses={200: png})
    def overlay(inspection_id: int, alpha: float = Query(0.5, ge=0.0, le=1.0)):
        return _png(station.picture(inspection_id, "overlay", alpha))

    @app.get(f"{API}/inspections/{{inspection_id}}/nearest.png", tags=["pictures"], response_class=Response,
             responses={200: png})
    async def nearest(inspection_id: int, region: int = Query(0, ge=0)):
        return _png(await station.nearest(inspection_id, region))

    # -- blind rating ------------------------------------------------------------------------------------------
    @app.get(f"{API}/ratings/next", tags=["ratings"])
    def next_rating(rater: str = Query(..., min_length=1, max_length=50)):
        return station.next_rating(rater)

    @app.get(f"{API}/ratings/{{inspection_id}}/options/{{option}}.png", tags=["ratings"], response_class=Response,
             responses={200: png})
    async def rating_option(inspection_id: int, option: str):
        return _png(await station.option_png(inspection_id, option))

    @app.post(f"{API}/ratings", tags=["ratings"], status_code=204, dependencies=write, response_class=Response)
    def rate(body: RatingIn):
        station.rate(body.inspection_id, body.option, body.rating, body.rater)
        return Response(status_code=204)

    @app.get(f"{API}/ratings/export", tags=["ratings"], response_class=Response,
             responses={200: {"content": {"application/zip": {}}}})
    def export_ratings():
        return Response(station.ratings_zip(), media_type="application/zip",
                        headers={"Content-Disposition": 'attachment; filename="clad_ratings.zip"'})

    # -- the web app -------------------------------------------------------------------------------------------
    from fastapi.staticfiles import StaticFiles

    if station.settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=station.settings.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["Content-Type", "X-API-Key"])
    app.add_middleware(BodyLimit, limit=station.settings.max_body_bytes, station=station)
    app.add_middleware(Timing, station=station)
    if replica is not None:
        app.add_middleware(ReplicaHeader, replica=replica)
    if (STATIC / "index.html").is_file():
        app.mount("/", StaticFiles(directory=STATIC, html=True), name="webapp")
    else:  # an install without the web app's pages
        from fastapi.responses import HTMLResponse

        @app.get("/", include_in_schema=False)
        def placeholder():
            return HTMLResponse(PLACEHOLDER)
    return app


async def _image_bytes(request: Request) -> bytes:
    """The upload: the multipart field ``file``, or the raw body of an image Content-Type."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=10)
        except BodyTooLarge:
            raise
        except Exception as e:  # noqa: BLE001 - a malformed multipart body
            raise HTTPException(422, f"malformed multipart body ({e})") from e
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPException(422, "multipart body without a file in the field 'file'")
            return await upload.read()
        finally:
            await form.close()
    if kind.startswith("image/") or kind == "application/octet-stream":
        return await request.body()
    raise HTTPException(415, f"Content-Type {kind or 'missing'}: send the image as multipart/form-data (field "
                             "'file') or as a raw body with an image/* Content-Type")


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers=PNG_CACHE)


def _utc(t: dt.datetime | None) -> dt.datetime | None:
    if t is None:
        return None
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


PLACEHOLDER = ("<!doctype html><meta charset=utf-8><title>clad station</title><p>The clad station is running. "
               "Its web app is not installed here; the API is at <a href=/docs>/docs</a>.</p>\n")
