"""FastAPI app around a predictor: POST /predict, POST /explain, GET /health, GET /metrics, GET / (the web page),
/openapi.json (and /docs, /redoc with `docs=True`: those pages load their scripts from a public CDN, so they are
off by default and blank offline).

Requests that arrive together are answered by one forward pass: `MicroBatcher` collects decoded images for up to
`max_wait_ms` after the first one (or until `max_batch` are waiting) and runs the model once on all of them, in a
single worker thread so that forward passes never compete for the CPU. While a pass runs, new requests queue up and
form the next batch, so under load batches grow by themselves. /metrics counts the batch sizes used.

Uploads are checked before the model sees them: a body larger than the limit is refused from its Content-Length
(or as it streams in), an empty file gets 400, a file Pillow cannot read or a decompression bomb gets 422, and so
does a request FastAPI cannot validate (no `file` field, a `top_k` that is not a positive integer), each with a
one-line message in {"detail": "..."} (control characters escaped, in one place: `limits.one_line`), as the
OpenAPI schema documents. Nothing a client uploads causes a 5xx but 503: at most `max_decodes` uploads are read and
decoded at once (the memory bound), `max_waiting` wait their turn, and one more gets 503 with Retry-After. The
limits on slow clients, connections and the Host header are in serve/limits.py.

POST /explain takes the same upload under the same rules and answers predict's labels with a heat map (see
cifar_cnn.explain) over the centre crop the model sees. It needs gradients, so it exists only for a PyTorch model
(not for --onnx; /health says which), and it runs on the micro-batcher's forward thread, between batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..choices import EXPLAIN_METHODS
from ..errors import CifarCnnError
from ..names import shown
from ..predict_core import BasePredictor
from .limits import (
    Busy,
    DecodeSlots,
    HostCheck,
    ServeLimits,
    bind_socket,
    detail_response,
    guarded_protocol,
    parse_allowed_hosts,
    quiet_accept_errors,
    raise_fd_limit,
    url_host,
)

if TYPE_CHECKING:
    from ..explain import Explainer

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD = 10 * 1024 * 1024  # 10 MiB: a large photograph; CIFAR images are ~1 KB
MULTIPART_OVERHEAD = 64 * 1024  # room for the multipart boundaries, headers and the top_k field
UPLOAD_HELP = "an image file: PNG, JPEG, WebP, BMP, GIF, TIFF, ..."
MAP_DECIMALS = 4  # a map's values in JSON: 1e-4 is far below what a colour map or a person can tell apart
ExplainMethod = Literal[EXPLAIN_METHODS]  # the OpenAPI enum of /explain's `method`
T = TypeVar("T")


class ErrorMessage(BaseModel):
    """Every 4xx answer: what was wrong, in one line."""

    detail: str


class LabelProbability(BaseModel):
    label: str
    probability: float


class Prediction(BaseModel):
    filename: str
    label: str
    probability: float
    top_k: list[LabelProbability]


class Explanation(Prediction):
    method: str
    target: str
    target_probability: float
    map: list[list[float]]
    input_size: int


def error_responses(unprocessable: str) -> dict[int | str, dict[str, Any]]:
    """The documented 4xx answers of an upload route; `unprocessable` says what gets 422."""
    return {
        status: {"model": ErrorMessage, "description": text}
        for status, text in [
            (400, "Empty upload or a body that is not multipart/form-data"),
            (413, "Upload over the size limit"),
            (422, unprocessable),
            (503, "Every decode slot busy and the waiting line full: retry after Retry-After seconds"),
        ]
    }


ERRORS = error_responses("Not a readable image, a decompression bomb, no `file` field, or a bad `top_k`")
EXPLAIN_ERRORS = error_responses(
    "Not a readable image, a decompression bomb, no `file` field, a bad `top_k` or `method`, a `target_class` the "
    "model does not have, or gradcam for a model without a spatial feature map"
)


def validation_message(errors: Any) -> str:
    """FastAPI's list of validation errors as one line that names each field: 'top_k: Input should be ...'."""
    parts = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        name = ".".join(loc[1:]) or ".".join(loc) or "request"
        if name == "file":
            parts.append("file: no image file; send one as multipart/form-data in the 'file' field")
            continue
        value = str(e.get("input"))
        got = "" if e.get("type") == "missing" else f" (got {value[:40] + '...' * (len(value) > 40)!r})"
        parts.append(f"{name}: {e.get('msg', 'invalid')}{got}")
    return " ".join("; ".join(parts).split())  # one line, whatever the messages held


@dataclass
class _Job:
    image: np.ndarray
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Collects single images from concurrent requests into batches for one `logits_fn` call each."""

    def __init__(self, logits_fn: Callable[[np.ndarray], np.ndarray], max_batch: int = 32, max_wait_ms: float = 5.0):
        if max_batch < 1:
            raise CifarCnnError(f"--max-batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise CifarCnnError(f"--max-wait-ms must not be negative, got {max_wait_ms}")
        self.logits_fn = logits_fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.batch_sizes: Counter[int] = Counter()
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, image: np.ndarray) -> np.ndarray:
        """Logits (classes,) for one preprocessed uint8 image (3, S, S), computed in a batch with its neighbours."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(image, future))
        return await future

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the forward thread, between two batches, so that it never competes with a forward pass."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _collect(self) -> list[_Job]:
        assert self._queue is not None
        jobs = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(jobs) < self.max_batch:
            try:
                jobs.append(self._queue.get_nowait())  # already waiting: take it without a timer
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            live = [j for j in jobs if not j.future.done()]  # a client that went away cancelled its future
            if not live:
                continue
            batch = np.stack([j.image for j in live])
            try:
                logits = await loop.run_in_executor(self._executor, self.logits_fn, batch)
            except Exception as exc:  # a model failure answers every request of the batch, the loop goes on
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            self.batch_sizes[len(live)] += 1
            for j, row in zip(live, logits):
                if not j.future.done():
                    j.future.set_result(row)


class BodyLimit:
    """ASGI middleware that refuses request bodies over `limit` bytes with 413, from Content-Length when given,
    else while the body streams in, so an oversized upload is never read into memory whole."""

    def __init__(self, app: ASGIApp, limit: int, on_reject: Callable[[], None] = lambda: None) -> None:
        self.app = app
        self.limit = limit
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            self.on_reject()
            response = detail_response(413, self.message())
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    self.on_reject()
                    raise HTTPException(status_code=413, detail=self.message())
            return message

        await self.app(scope, limited, send)

    def message(self) -> str:
        return f"upload too large: the limit is {self.limit - MULTIPART_OVERHEAD:,} bytes per image"


def explainer_for(predictor: BasePredictor) -> tuple[Explainer | None, str | None]:
    """An `Explainer` when `predictor` is a PyTorch model (ONNX has no gradients: None), and why gradcam cannot run
    on it if it cannot (no spatial feature map), found now rather than at the first request."""
    if getattr(predictor, "backend", None) != "pytorch":
        return None, None
    from ..explain import Explainer

    explainer = Explainer(predictor)
    try:
        explainer.layer()
    except CifarCnnError as exc:
        return explainer, api_words(str(exc))
    return explainer, None


def api_words(message: str) -> str:
    """The library's messages name command-line options; an API caller knows them as query parameters."""
    return message.replace("--target-class ", "target_class ").replace("--method ", "method=")


def explanation(explainer: Explainer, image: np.ndarray, method: str, target: int | None, top_k: int) -> dict:
    """One image's explanation as /explain answers it: the map as nested lists rounded to MAP_DECIMALS."""
    row = explainer.explain(image[None], method, target, top_k)[0]
    row["map"] = np.round(row["map"].astype(np.float64), MAP_DECIMALS).tolist()
    return {**row, "input_size": explainer.size}


@dataclass
class Stats:
    """Counters for /metrics."""

    started: float = field(default_factory=time.time)
    requests: int = 0
    predictions: int = 0
    explanations: int = 0
    rejected: Counter[int] = field(default_factory=Counter)


def create_app(
    predictor: BasePredictor,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    limits: ServeLimits = ServeLimits(),
    allowed_hosts: frozenset[str] | None = None,
    docs: bool = False,
) -> FastAPI:
    """The FastAPI app serving `predictor` (a `Predictor` or `OnnxPredictor`). `allowed_hosts`: the Host names it
    answers to (None: any); `docs`: serve /docs and /redoc (their scripts come from a CDN)."""
    if max_upload_bytes < 1:
        raise CifarCnnError(f"--max-upload-mb must be positive, got {max_upload_bytes} bytes")
    batcher = MicroBatcher(predictor.logits, max_batch=max_batch, max_wait_ms=max_wait_ms)
    slots = DecodeSlots(limits)
    stats = Stats()
    info = predictor.describe()
    explainer, no_gradcam = explainer_for(predictor)
    methods = [m for m in EXPLAIN_METHODS if explainer is not None and not (m == "gradcam" and no_gradcam)]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        quiet_accept_errors(asyncio.get_running_loop())
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="cifar-cnn",
        summary=f"Image classification with {info.get('model', 'a CNN')} ({len(predictor.classes)} classes)",
        description="Upload an image to POST /predict (or to POST /explain for a heat map of what the answer rests "
        "on); the web page at / does the same from a browser.",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    app.add_middleware(
        BodyLimit, limit=max_upload_bytes + MULTIPART_OVERHEAD, on_reject=lambda: stats.rejected.update([413])
    )
    app.add_middleware(HostCheck, allowed=allowed_hosts, on_reject=lambda: stats.rejected.update([400]))  # outermost

    def reject(status: int, detail: str) -> HTTPException:
        stats.rejected[status] += 1
        return HTTPException(status_code=status, detail=detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return detail_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        stats.rejected[422] += 1
        return detail_response(422, validation_message(exc.errors()))

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health", summary="Liveness and what model is served")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            **info,
            "max_upload_bytes": max_upload_bytes,
            "explain": explainer is not None,
            "explain_methods": methods,
        }

    @app.get("/metrics", summary="Request counts and the batch sizes the micro-batcher used")
    async def metrics() -> dict[str, Any]:
        return {**metrics_of(stats, batcher), "decoding_waiting": slots.waiting, "max_decodes": slots.size}

    async def read_upload(file: UploadFile) -> tuple[str, np.ndarray]:
        """(the file's name, the decoded (3, S, S) uint8 image), or the 4xx both upload routes answer (503 when
        every decode slot is busy and the line is full). Read and decoded in a slot: bytes and pixels of at most
        `limits.max_decodes` uploads are in memory at once."""
        name = shown(file.filename or "upload")
        try:
            async with slots.slot():
                data = await file.read(max_upload_bytes + 1)
                await file.close()
                if not data:
                    raise reject(400, f"{name}: empty upload; send an image file in the 'file' form field")
                if len(data) > max_upload_bytes:
                    raise reject(413, f"{name}: upload too large: the limit is {max_upload_bytes:,} bytes per image")
                try:
                    return name, await run_in_threadpool(predictor.decode, data, name)
                except CifarCnnError as exc:
                    raise reject(422, str(exc)) from None
        except Busy as exc:
            await file.close()
            stats.rejected[503] += 1
            raise HTTPException(status_code=503, detail=str(exc), headers={"Retry-After": "1"}) from None

    @app.post("/predict", summary="Classify one uploaded image", response_model=Prediction, responses=ERRORS)
    async def predict(
        file: UploadFile = File(..., description=UPLOAD_HELP),
        top_k: int = Query(5, ge=1, description="how many labels to return, most probable first"),
    ) -> dict[str, Any]:
        stats.requests += 1
        name, image = await read_upload(file)
        logits = await batcher.submit(image)
        try:
            row = predictor.rows(logits[None], top_k)[0]
        except CifarCnnError as exc:  # NaN or infinite outputs (finite weights can overflow): never NaN in JSON
            raise reject(422, f"{name}: {exc}") from None
        stats.predictions += 1
        return {"filename": name, **row}

    if explainer is not None:  # ONNX: no gradients, so no /explain (404) and /health says "explain": false
        add_explain_route(app, explainer, no_gradcam, batcher, stats, reject, read_upload)
    return app


def metrics_of(stats: Stats, batcher: MicroBatcher) -> dict[str, Any]:
    """What GET /metrics answers."""
    sizes = batcher.batch_sizes
    return {
        "requests": stats.requests,
        "predictions": stats.predictions,
        "explanations": stats.explanations,
        "rejected": {str(k): v for k, v in sorted(stats.rejected.items())},
        "batches": sum(sizes.values()),
        "batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
        "max_batch_size_used": max(sizes, default=0),
        "max_batch": batcher.max_batch,
        "max_wait_ms": batcher.max_wait * 1000.0,
        "uptime_s": round(time.time() - stats.started, 3),
    }


def add_explain_route(
    app: FastAPI,
    explainer: Explainer,
    no_gradcam: str | None,
    batcher: MicroBatcher,
    stats: Stats,
    reject: Callable[[int, str], HTTPException],
    read_upload: Callable[[UploadFile], Any],
) -> None:
    """POST /explain: the upload rules of /predict (`read_upload`, `reject`), the map computed on the batcher's
    forward thread."""

    @app.post(
        "/explain",
        summary="Classify one uploaded image and map which of its pixels the answer rests on",
        response_model=Explanation,
        responses=EXPLAIN_ERRORS,
    )
    async def explain(
        file: UploadFile = File(..., description=UPLOAD_HELP),
        method: ExplainMethod = Query("gradcam", description="how the map is computed (see cifar_cnn.explain)"),
        target_class: str | None = Query(
            None, description="the class to explain, by name or index (default: the predicted label)"
        ),
        top_k: int = Query(3, ge=1, description="how many labels to return, most probable first"),
    ) -> dict[str, Any]:
        stats.requests += 1
        if method == "gradcam" and no_gradcam:
            raise reject(422, no_gradcam)
        try:
            target = explainer.target_index(target_class)
        except CifarCnnError as exc:
            raise reject(422, api_words(str(exc))) from None
        name, image = await read_upload(file)
        try:
            row = await batcher.run(explanation, explainer, image, method, target, top_k)
        except CifarCnnError as exc:  # NaN or infinite outputs
            raise reject(422, f"{name}: {exc}") from None
        stats.explanations += 1
        return {"filename": name, **row}


def serve(
    predictor: BasePredictor,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    sock: socket.socket | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    limits: ServeLimits = ServeLimits(),
    allowed_hosts: str | None = None,
    docs: bool = False,
    log_level: str = "info",
    log: Callable[[str], None] = print,
) -> None:
    """Run the app with uvicorn on `sock` (else a socket bound to host:port now) until interrupted. `allowed_hosts`:
    the --allowed-hosts text (None: the bound address's own names, see limits.parse_allowed_hosts)."""
    import uvicorn

    allowed = parse_allowed_hosts(allowed_hosts, host)
    limits = dataclasses.replace(limits, max_connections=raise_fd_limit(limits.max_connections, log))
    app = create_app(
        predictor,
        max_upload_bytes=max_upload_bytes,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        limits=limits,
        allowed_hosts=allowed,
        docs=docs,
    )
    sock = sock or bind_socket(host, port)
    if host.strip("[]") not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: --host {host} makes the server reachable from other machines; it has no authentication")
    if allowed is None and allowed_hosts is None:
        log("warning: any Host header is accepted on a wildcard address; --allowed-hosts NAMES restricts them")
    pages = "API docs at /docs" if docs else "API schema at /openapi.json"
    url = f"http://{url_host(host.strip('[]'))}:{sock.getsockname()[1]}/"
    log(f"serving {getattr(predictor, 'name', 'model')} on {url} ({pages})")
    config = uvicorn.Config(
        app,
        http=guarded_protocol(limits),
        log_level=log_level,
        access_log=log_level in ("debug", "trace"),
        timeout_keep_alive=5,
    )
    uvicorn.Server(config).run(sockets=[sock])
