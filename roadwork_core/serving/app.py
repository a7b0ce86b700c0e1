"""The HTTP face of a miner: `POST /predict` and `GET /healthz` (FastAPI on uvicorn).

`POST /predict` takes `{"image": "<base64 JPEG>"}`, the field the network's synapse carries, and
returns `{"answer", "p_roadwork", "decision", "bundle_id"}`; `answer` is the float to put in the
synapse's `prediction`. Bad input gets a 4xx with the reason, never a 500: a body that is not JSON or
has no string `image` (400), not base64 (400), too large (413), not a decodable image (422).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import threading

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from roadwork_core.data.images import ImageRejected
from roadwork_core.serving import DEFAULT_MAX_IMAGE_BYTES
from roadwork_core.serving.slot import BundleSlot

__all__ = ["create_app"]


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


async def _read_capped(request: Request, cap: int) -> bytes | None:
    """The body, or None as soon as it passes `cap` bytes (never buffers more than cap + one chunk)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def default_max_concurrent() -> int:
    """Images decoded and predicted at once: one per core (more only queue for the same cores)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def create_app(
    slot: BundleSlot,
    *,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_concurrent: int | None = None,
    body_timeout: float = 30.0,
) -> FastAPI:
    """`max_concurrent` bounds the images in decode + predict at once (default: one per core). A 48 MP
    photo costs ~0.7 GB while it is decoded and resized; without a bound, N simultaneous requests cost N
    times that. The others wait their turn, holding only their image's bytes. A body must arrive within
    `body_timeout` seconds (408 otherwise), so stalled clients cannot pin memory for ever."""
    app = FastAPI(title="roadwork miner", docs_url=None, redoc_url=None, openapi_url=None)
    body_cap = 4 * (max_image_bytes + 2) // 3 + 4096  # base64 of the largest image, plus the JSON around it
    limit = max_concurrent if max_concurrent is not None else default_max_concurrent()
    if limit < 1:
        raise ValueError(f"max_concurrent = {limit}; allow at least 1 image at a time")
    # a thread-level gate (not an event-loop one, so the app is not tied to the loop that first used it):
    # a waiting request holds a threadpool thread and its request body, no decoded pixels
    gate = threading.BoundedSemaphore(limit)

    def bounded_predict(served, raw: bytes):
        with gate:
            return served.predict(raw)

    @app.get("/healthz")
    async def healthz() -> dict:  # on the event loop: never queued behind predictions in the threadpool
        return slot.health()

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        try:  # a client that stops sending mid-body holds its buffer: bounded in time, not only in size
            body = await asyncio.wait_for(_read_capped(request, body_cap), timeout=body_timeout)
        except TimeoutError:
            return _error(408, f"the request body did not arrive within {body_timeout:g} s")
        if body is None:
            return _error(413, f"request too large: the image may be at most {max_image_bytes} bytes")
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):  # not JSON / not UTF-8, a 5000-digit number, nesting too deep
            return _error(400, 'body is not JSON; send {"image": "<base64 JPEG>"}')
        if not isinstance(doc, dict) or not isinstance(doc.get("image"), str) or not doc["image"]:
            return _error(
                400, 'body must be a JSON object with a non-empty string field "image" (base64 JPEG)'
            )
        try:
            raw = base64.b64decode(doc["image"], validate=True)
        except (binascii.Error, ValueError) as err:
            return _error(400, f"image is not valid base64 ({err})")
        if len(raw) > max_image_bytes:
            return _error(413, f"image is {len(raw)} bytes; the limit is {max_image_bytes}")
        # a request waiting its turn holds only the image's bytes: the body and its parsed JSON (4/3 of the
        # image each) went with it, and 30 waiting 8 MB images held 1.3 GB instead of ~0.3
        del body, doc
        served = slot.current  # this request finishes on this bundle even if a swap happens meanwhile
        try:
            pred = await run_in_threadpool(bounded_predict, served, raw)
        except ImageRejected as err:
            return _error(422, f"not a usable image: {err.reason} ({err.detail})")
        return JSONResponse(
            {
                "answer": pred.answer,
                "p_roadwork": pred.p_roadwork,
                "decision": pred.decision,
                "bundle_id": served.bundle_id,
            }
        )

    return app
