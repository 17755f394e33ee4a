"""The HTTP API and the worklist page (FastAPI). The contract:

    POST /v1/images               multipart, one or more `files`: score and store; per-image and per-study results
    GET  /v1/studies              the worklist {"total", "items"}: studies needing review first, then by score;
                                  `limit`, `offset`, `flag`, `date_from`, `date_to` (YYYYMMDD)
    GET  /v1/studies/{id}         one study and its images
    GET  /v1/images/{id}          one image;  /v1/images/{id}/heatmap.png, /v1/images/{id}/thumbnail.png
    GET  /v1/model                the operating point and the model;  GET /v1/model-card  MODEL_CARD.md
    GET  /healthz                 liveness;  GET /metrics  Prometheus;  GET /  the worklist page;  /docs  OpenAPI

Security by default: the CLI binds 127.0.0.1; any other address needs a bearer token (`Authorization: Bearer T`,
or `?token=T` once on the page, which sets a cookie). Request bodies are limited while they stream in; uploaded
names are shown, never used as paths; a bad file is a 4xx naming it, and never costs the other files of the
request (they are scored and stored, and the response lists each).
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from ..jobs.score import NOT_SCORED
from ..reporting.model_card import MODEL_CARD
from .page import study_page, worklist_page
from .triage import Triage

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 * 2**20  # one upload: far above any chest film, far below a decompression bomb's output
MAX_REQUEST_BYTES = 512 * 2**20
MAX_FILES = 256
TOKEN_COOKIE = "cxr_token"
OPEN_PATHS = {"/healthz"}


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 as soon as it passes the limit while
    streaming in (the Content-Length header is checked first), before it is parsed or spooled whole."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _reject(send, self.limit)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge:
            await _reject(send, self.limit)


async def _reject(send: Any, limit: int) -> None:
    body = f'{{"detail": "request body larger than {limit // 2**20} MB"}}'.encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def safe_name(name: str | None) -> str:
    """An uploaded name for display: its last path part, printable characters only, at most 200 of them."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:200] or "upload"


def create_app(triage: Triage, token: str | None = None, max_file_bytes: int = MAX_FILE_BYTES, tmp_dir: str | Path | None = None) -> Any:
    """The ASGI app over one `Triage` (model + database + batcher). With `token`, every path but /healthz needs it."""
    app = FastAPI(title="cxr-oneclass triage", version=str(triage.scorer.doc.get("version", "")),
                  description="Chest X-ray triage: one-class anomaly scores, for research use only, not for diagnostic use.")
    registry = CollectorRegistry()
    requests = Counter("cxr_requests_total", "HTTP requests", ["path", "status"], registry=registry)
    latency = Histogram("cxr_request_seconds", "HTTP request latency", ["path"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    scored = Counter("cxr_images_total", "images received, by flag", ["flag"], registry=registry)
    errors = Counter("cxr_errors_total", "requests answered with an error status", registry=registry)
    tmp_root = Path(tmp_dir) if tmp_dir else Path(tempfile.gettempdir())

    @app.middleware("http")
    async def measure_and_guard(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        route = request.scope.get("route")
        if token and request.url.path not in OPEN_PATHS and not _authorised(request, token):
            response: Response = JSONResponse({"detail": "a bearer token is required (Authorization: Bearer TOKEN)"}, 401,
                                              headers={"WWW-Authenticate": "Bearer"})
        else:
            response = await call_next(request)
            if token and request.query_params.get("token") and _authorised(request, token):
                response.set_cookie(TOKEN_COOKIE, request.query_params["token"], httponly=True, samesite="strict")
        path = getattr(request.scope.get("route"), "path", None) or getattr(route, "path", None) or "other"
        requests.labels(path, str(response.status_code)).inc()
        latency.labels(path).observe(time.perf_counter() - t0)
        if response.status_code >= 400:
            errors.inc()
        return response

    @app.post("/v1/images")
    async def upload(request: Request) -> JSONResponse:
        form = await request.form(max_files=MAX_FILES)
        files = [v for k, v in form.multi_items() if k == "files" and hasattr(v, "read")]
        if not files:
            raise HTTPException(400, "no files: send multipart/form-data with one or more `files` parts")
        results = []
        for upload in files:
            name = safe_name(upload.filename)
            results.append(await _ingest(upload, name))
        for r in results:
            scored.labels(r.get("flag", NOT_SCORED)).inc()
        keys = list(dict.fromkeys(r["study_key"] for r in results if r.get("study_key")))
        studies = [s for s in (triage.store.study(k) for k in keys) if s]
        for s in studies:
            s.pop("images", None)
        failed = [r for r in results if r.get("flag") == NOT_SCORED or r.get("rejected")]
        body = {"images": results, "studies": studies,
                "errors": [{"file": r["file_name"], "problem": r["error"]} for r in failed]}
        # 422 names every file that could not be scored; the others in the request are scored and stored all the same
        return JSONResponse(body, status_code=422 if failed else 200)

    async def _ingest(upload: Any, name: str) -> dict:
        fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=".bin", dir=tmp_root)  # never the uploaded name
        size = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                while chunk := await upload.read(1 << 20):
                    size += len(chunk)
                    if size > max_file_bytes:
                        return {"file_name": name, "flag": NOT_SCORED, "rejected": True, "study_key": None,
                                "error": f"larger than {max_file_bytes // 2**20} MB: not stored"}
                    fh.write(chunk)
            if size == 0:
                return {"file_name": name, "flag": NOT_SCORED, "rejected": True, "study_key": None, "error": "empty file: not stored"}
            record = await run_in_threadpool(triage.ingest, Path(tmp), name, "http")
            return _public(record)
        finally:
            Path(tmp).unlink(missing_ok=True)

    @app.get("/v1/studies")
    def worklist(limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0), flag: str | None = None,
                 date_from: str | None = None, date_to: str | None = None) -> dict:
        if flag is not None and flag not in ("abnormal", "normal", "error", "skipped"):
            raise HTTPException(422, f"flag must be abnormal, normal, error or skipped, not {flag!r}")
        for d in (date_from, date_to):
            if d is not None and not re.fullmatch(r"\d{8}", d):
                raise HTTPException(422, f"dates are YYYYMMDD, not {d!r}")
        return triage.store.worklist(limit, offset, flag, date_from, date_to)

    @app.get("/v1/studies/{study_id:path}")
    def study(study_id: str) -> dict:
        found = triage.store.study(study_id)
        if found is None:
            raise HTTPException(404, f"no study {study_id!r}")
        found["images"] = [_public(i) for i in found["images"]]
        return found

    @app.get("/v1/images/{image_id}")
    def image(image_id: int) -> dict:
        found = triage.store.image(image_id)
        if found is None:
            raise HTTPException(404, f"no image {image_id}")
        return _public(found)

    @app.get("/v1/images/{image_id}/{kind}.png")
    def picture(image_id: int, kind: str) -> Response:
        if kind not in ("heatmap", "thumbnail"):
            raise HTTPException(404, f"no picture {kind!r}: heatmap or thumbnail")
        png = triage.store.picture(image_id, kind)
        if png is None:
            raise HTTPException(404, f"image {image_id} has no {kind} (not scored, or unknown)")
        return Response(png, media_type="image/png")

    @app.get("/v1/model")
    def model() -> dict:
        return _model(triage)

    @app.get("/v1/model-card")
    def model_card() -> PlainTextResponse:
        path = triage.scorer.source / MODEL_CARD
        if not path.is_file():
            raise HTTPException(404, "this run has no model card (trained before they were written)")
        return PlainTextResponse(path.read_text(encoding="utf-8"), media_type="text/markdown")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "images": triage.store.count_images()}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def page(limit: int = Query(100, ge=1, le=1000), flag: str | None = None) -> str:
        return worklist_page(triage.store.worklist(limit, 0, flag), triage.store.summary(), _model(triage))

    @app.get("/studies/{study_id:path}", response_class=HTMLResponse)
    def study_html(study_id: str) -> str:
        found = triage.store.study(study_id)
        if found is None:
            raise HTTPException(404, f"no study {study_id!r}")
        return study_page(found, _model(triage))

    return BodyLimit(app, MAX_REQUEST_BYTES)


def _authorised(request: Request, token: str) -> bool:
    given = request.headers.get("authorization", "")
    candidates = [given[7:] if given.lower().startswith("bearer ") else "", request.cookies.get(TOKEN_COOKIE, ""),
                  request.query_params.get("token", "")]
    return any(c and hmac.compare_digest(c.encode(), token.encode()) for c in candidates)


def _public(record: dict) -> dict:
    """An image record as the API shows it (no pictures inline; links to them)."""
    out = {k: v for k, v in record.items() if k not in ("heatmap", "thumbnail")}
    if out.get("id") is not None and out.get("flag") not in (NOT_SCORED, "skipped"):
        out["heatmap_url"] = f"/v1/images/{out['id']}/heatmap.png"
        out["thumbnail_url"] = f"/v1/images/{out['id']}/thumbnail.png"
    return out


def _model(triage: Triage) -> dict:
    cal, doc = triage.scorer.calibration, triage.scorer.doc
    return {"run": str(triage.scorer.source), "version": doc.get("version"), "score_terms": triage.scorer.score_terms,
            "threshold": cal.threshold if cal else None, "rule": cal.rule if cal else None,
            "weights_sha256": doc.get("weights_sha256"), "research_use_only": True}
