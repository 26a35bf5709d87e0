"""The FastAPI application: A1111's /sdapi/v1 endpoints, health, readiness and metrics.

    from sdrt.serve import ServeConfig, create_app
    app = create_app(ServeConfig(model="path/to/model"))      # any ASGI server; `sdrt serve` runs uvicorn

Every error is one JSON object on one line, A1111's shape ({"error", "detail", "body", "errors"}),
with `detail` naming the input and what is accepted; never a stack trace (those go to the log).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import secrets
import threading
import time
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import a1111
from .a1111 import Img2ImgRequest, PngInfoRequest, RequestError, Txt2ImgRequest
from .config import ServeConfig
from .engine import Draining, Engine, QueueFull, Registry, Stopped
from .observability import Metrics, log

PUBLIC_PATHS = ("/healthz", "/readyz")
KNOWN_PATHS = {
    "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/png-info", "/sdapi/v1/samplers", "/sdapi/v1/schedulers",
    "/sdapi/v1/sd-models", "/sdapi/v1/options", "/sdapi/v1/progress", "/sdapi/v1/interrupt", "/sdapi/v1/loras",
    "/sdapi/v1/embeddings", "/sdapi/v1/scripts", "/sdapi/v1/refresh-checkpoints", "/healthz", "/readyz", "/metrics",
    "/docs", "/openapi.json",
}


def error_body(kind: str, detail: str) -> dict:
    detail = " ".join(str(detail).split())
    return {"error": kind, "detail": detail, "body": "", "errors": detail}


def error_response(status: int, kind: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(kind, detail), status_code=status, headers=headers)


class ImageResponse(BaseModel):
    images: Optional[list[str]] = Field(default=None, description="The generated images, base64 PNG with their parameters text.")
    parameters: dict
    info: str


class PngInfoResponse(BaseModel):
    info: str
    items: dict
    parameters: dict


class _Gate:
    """Pure ASGI middleware around the app: request id, HTTP Basic auth, body size limit, the access
    log line, metrics, and a JSON 500 (never a traceback) for anything unexpected."""

    def __init__(self, app, state: "ServiceState"):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st = self.state
        cfg = st.cfg
        path = scope.get("path", "")
        label = path if path in KNOWN_PATHS else "other"
        rid = secrets.token_hex(6)
        t0 = time.perf_counter()
        status = {"code": 500, "started": False}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode()),
                                                                 (b"x-sdrt-replica", st.replica_id.encode())]
            await send(message)

        async def respond(resp: Response):
            await resp(scope, receive, send_wrapped)

        try:
            if cfg.api_auth and path not in PUBLIC_PATHS and not self._authorized(headers.get("authorization", "")):
                st.count_error("Unauthorized")
                return await respond(error_response(401, "Unauthorized", "Incorrect username or password "
                                                    "(HTTP Basic auth, as --api-auth)", {"WWW-Authenticate": "Basic"}))
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
                st.count_error("PayloadTooLarge")
                return await respond(error_response(413, "PayloadTooLarge", f"request body of {length} bytes; at most "
                                                    f"{cfg.max_body_bytes} bytes are accepted"))
            seen = {"n": 0}

            async def receive_limited():
                message = await receive()
                if message["type"] == "http.request":
                    seen["n"] += len(message.get("body", b""))
                    if seen["n"] > cfg.max_body_bytes:
                        raise _TooLarge()
                return message

            await self.app(scope, receive_limited, send_wrapped)
        except _TooLarge:
            st.count_error("PayloadTooLarge")
            if not status["started"]:
                await respond(error_response(413, "PayloadTooLarge", f"request body over {cfg.max_body_bytes} bytes"))
        except Exception:  # noqa: BLE001 - logged with its traceback, answered with one line
            log.exception("unhandled error", extra={"fields": {"request_id": rid, "path": path}})
            st.count_error("InternalError")
            if not status["started"]:
                await respond(error_response(500, "InternalError", f"internal error (request id {rid}); see the server log"))
        finally:
            dt = time.perf_counter() - t0
            if st.metrics is not None:
                st.metrics.requests.labels(label, str(status["code"])).inc()
                st.metrics.latency.labels(label).observe(dt)
            client = scope.get("client") or ("", 0)
            log.info("request", extra={"fields": {"request_id": rid, "method": scope.get("method"), "path": path,
                                                  "status": status["code"], "ms": round(dt * 1000, 2), "client": client[0]}})

    def _authorized(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return False
        return bool(sep) and self.state.cfg.check_credentials(user, password)


class _TooLarge(Exception):
    pass


class ServiceState:
    """What one app instance holds: config, models, engine, metrics, options."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.metrics: Metrics | None = None
        self.registry: Registry | None = None
        self.engine: Engine | None = None
        self.options: dict[str, Any] = {"CLIP_stop_at_last_layers": 1}
        self.start_error: str | None = None
        self.replica_id = secrets.token_hex(4)  # which process answered (several behind Ray's proxy)
        self._options_lock = threading.Lock()

    def count_error(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(kind).inc()

    def start(self) -> None:
        try:
            self.registry.start()
            if self.metrics is not None:
                self.metrics.ready.set(1)
            log.info("ready", extra={"fields": {"model": self.registry.current, "provider": self.cfg.provider}})
        except Exception as e:  # noqa: BLE001 - reported by /readyz and the log
            self.start_error = " ".join(str(e).split()) or type(e).__name__
            log.exception("model load failed", extra={"fields": {"error": self.start_error}})


def create_app(cfg: ServeConfig | None = None, *, load_in_background: bool = True) -> FastAPI:
    """The service as an ASGI app. Models load at startup (in the background by default: /healthz
    answers at once, /readyz once the default model is loaded and warmed up)."""
    cfg = cfg or ServeConfig()
    state = ServiceState(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.metrics = Metrics()
        state.registry = Registry(cfg)
        state.engine = Engine(cfg, state.registry, state.metrics)
        state.engine.start()
        if load_in_background:
            threading.Thread(target=state.start, name="sdrt-load", daemon=True).start()
        else:
            await run_in_threadpool(state.start)
        yield
        # Shutdown: refuse new requests, let queued and running ones finish (the server waits for them).
        state.engine.drain()
        t_end = time.monotonic() + cfg.shutdown_grace
        while (state.engine.pending or state.engine.running) and time.monotonic() < t_end:
            await asyncio.sleep(0.05)
        state.engine.close(wait=False)
        log.info("stopped", extra={"fields": {}})

    app = FastAPI(
        title="sdrt",
        description="Stable Diffusion img2img, inpainting and txt2img on ONNX Runtime, behind AUTOMATIC1111's HTTP API.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.sdrt = state

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        state.count_error("ValidationError")
        return error_response(422, "ValidationError", describe_validation(exc.errors()))

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        state.count_error(exc.kind)
        return error_response(exc.status, exc.kind, str(exc), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        state.count_error(kind)
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            detail = f"no endpoint {request.url.path}; see /docs for the endpoints"
        return error_response(exc.status_code, kind, detail, getattr(exc, "headers", None))

    # ------------------------------------------------------------------ generation
    def _ready():
        if state.start_error is not None:
            raise RequestError(f"the model failed to load: {state.start_error}", status=503, kind="NotReady")
        if state.registry is None or not state.registry.ready:
            raise RequestError("the model is still loading; retry shortly (see /readyz)", status=503, kind="NotReady")
        if not state.engine.accepting:
            raise RequestError("the server is shutting down", status=503, kind="ShuttingDown")

    def _prepare(req, endpoint: str):
        """Check everything (the pipeline's own dry run included) before the request is queued."""
        from sdrt.runtime.errors import InputError

        with state._options_lock:
            options = dict(state.options)
        plan = a1111.plan_request(req, endpoint, cfg, options)
        pipe = state.registry.get(plan.model)
        try:
            for call in plan.calls:
                getattr(pipe, call.method)(*call.args, **call.kwargs, dry_run=True)
        except InputError as e:
            raise RequestError(_name_field(str(e))) from None
        return plan

    async def _generate(req, endpoint: str) -> dict:
        from sdrt.runtime.errors import InputError

        arrival = time.monotonic()
        _ready()
        plan = await run_in_threadpool(_prepare, req, endpoint)
        try:
            job = state.engine.submit(plan)
        except QueueFull as e:
            raise RequestError(status=503, kind="QueueFull", message=f"{e} (at most {cfg.max_queue} requests wait)", headers={"Retry-After": str(e.retry_after)})
        except Draining:
            raise RequestError(status=503, kind="ShuttingDown", message="the server is shutting down", headers={"Retry-After": "5"})
        left = cfg.request_timeout - (time.monotonic() - arrival)
        try:
            results = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)), timeout=max(left, 0.001))
        except asyncio.TimeoutError:
            state.engine.cancel(job, "timeout")
            raise RequestError(status=504, kind="Timeout", message=f"the request took longer than the server's request timeout of {cfg.request_timeout:g} s")
        except Stopped as e:
            kind = "Interrupted" if e.reason == "interrupted" else "Timeout"
            if kind == "Timeout":
                raise RequestError(status=504, kind=kind, message=f"the request took longer than the server's request timeout of {cfg.request_timeout:g} s")
            raise RequestError(status=409, kind=kind, message="the request was interrupted by POST /sdapi/v1/interrupt")
        except InputError as e:
            raise RequestError(_name_field(str(e))) from None
        except RequestError:
            raise
        except Exception as e:  # noqa: BLE001 - logged in full, answered in one line
            log.error("generation failed", exc_info=e, extra={"fields": {"endpoint": endpoint}})
            raise RequestError(status=500, kind="InternalError", message="generation failed inside the model runtime; see the server log")
        body = await run_in_threadpool(a1111.response, plan, results, job.extra["model_info"])
        if state.metrics is not None:
            state.metrics.images.labels(endpoint).inc(plan.images)
        return body

    @app.post("/sdapi/v1/txt2img", response_model=ImageResponse, tags=["A1111"])
    async def txt2img(req: Txt2ImgRequest):
        """Text to image (A1111's StableDiffusionProcessingTxt2Img fields)."""
        return await _generate(req, "txt2img")

    @app.post("/sdapi/v1/img2img", response_model=ImageResponse, tags=["A1111"])
    async def img2img(req: Img2ImgRequest):
        """Image to image; with `mask`, inpainting (A1111's StableDiffusionProcessingImg2Img fields)."""
        return await _generate(req, "img2img")

    @app.post("/sdapi/v1/png-info", response_model=PngInfoResponse, tags=["A1111"])
    async def png_info(req: PngInfoRequest):
        """The generation parameters stored in a PNG (its "parameters" text), raw and parsed."""
        return await run_in_threadpool(a1111.png_info, req, cfg)

    # ------------------------------------------------------------------ listings and state
    @app.get("/sdapi/v1/samplers", tags=["A1111"])
    async def samplers():
        return a1111.samplers()

    @app.get("/sdapi/v1/schedulers", tags=["A1111"])
    async def schedulers():
        return a1111.schedulers()

    @app.get("/sdapi/v1/sd-models", tags=["A1111"])
    async def sd_models():
        def listing():
            out = []
            for e in state.registry.listing().values():
                h = e.info.short_hash
                sha = (e.info.manifest or {}).get("files", {}).get("unet/model.onnx", {}).get("sha256")
                out.append({"title": f"{e.name} [{h}]" if h else e.name, "model_name": e.name, "hash": h or None,
                            "sha256": sha, "filename": e.name, "config": None})
            return out

        _require_registry()
        return await run_in_threadpool(listing)

    def _require_registry():
        if state.registry is None:
            raise RequestError("the server is starting", status=503, kind="NotReady")

    def _options() -> dict:
        name = state.registry.current
        title = name
        if name is not None:
            entry = state.registry.listing().get(name)
            if entry is not None and entry.info.short_hash:
                title = f"{name} [{entry.info.short_hash}]"
        with state._options_lock:
            clip = state.options["CLIP_stop_at_last_layers"]
        return {"sd_model_checkpoint": title, "CLIP_stop_at_last_layers": clip, "samples_format": "png",
                "eta_noise_seed_delta": 0, "sd_vae": "Automatic"}

    @app.get("/sdapi/v1/options", tags=["A1111"])
    async def get_options():
        _require_registry()
        return await run_in_threadpool(_options)

    @app.post("/sdapi/v1/options", tags=["A1111"])
    async def set_options(req: dict[str, Any]):
        """Set sd_model_checkpoint (a name from /sdapi/v1/sd-models: loads and warms it up) and
        CLIP_stop_at_last_layers. Other keys are refused, naming them."""
        _ready()
        unknown = sorted(set(req) - set(a1111.OVERRIDE_KEYS))
        if unknown:
            raise RequestError(f"options: {', '.join(unknown)} not supported by sdrt; accepted keys: {', '.join(a1111.OVERRIDE_KEYS)}")
        a1111.check_neutral_options(req, "options")
        clip = req.get("CLIP_stop_at_last_layers")
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int) or not 1 <= clip <= 12):
            raise RequestError(f"CLIP_stop_at_last_layers must be an integer from 1 to 12, got {clip!r}")
        model = req.get("sd_model_checkpoint")
        if model is not None:
            if not isinstance(model, str):
                raise RequestError(f"sd_model_checkpoint must be a model name (see /sdapi/v1/sd-models), got {model!r}")
            await run_in_threadpool(state.registry.switch, model)
        if clip is not None:
            with state._options_lock:
                state.options["CLIP_stop_at_last_layers"] = clip
        return None

    @app.post("/sdapi/v1/refresh-checkpoints", tags=["A1111"])
    async def refresh_checkpoints():
        """The model list is read from the folder on every request; nothing to refresh."""
        return None

    @app.get("/sdapi/v1/progress", tags=["A1111"])
    async def progress(skip_current_image: bool = False):
        if state.engine is None:
            raise RequestError("the server is starting", status=503, kind="NotReady")
        return state.engine.progress()

    @app.post("/sdapi/v1/interrupt", tags=["A1111"])
    async def interrupt():
        """Stop the running request(s) at their next step; they answer 409 Interrupted."""
        if state.engine is not None:
            state.engine.interrupt()
        return {}

    @app.get("/sdapi/v1/loras", tags=["A1111"])
    async def loras():
        return []

    @app.get("/sdapi/v1/embeddings", tags=["A1111"])
    async def embeddings():
        return {"loaded": {}, "skipped": {}}

    @app.get("/sdapi/v1/scripts", tags=["A1111"])
    async def scripts():
        return {"txt2img": [], "img2img": []}

    # ------------------------------------------------------------------ operations
    @app.get("/healthz", tags=["operations"])
    async def healthz():
        """The process is alive and answering."""
        return {"status": "alive"}

    @app.get("/readyz", tags=["operations"])
    async def readyz():
        """200 once the default model is loaded and warmed up (503 while loading, after a failed
        load, or while shutting down)."""
        if state.start_error is not None:
            return error_response(503, "NotReady", f"the model failed to load: {state.start_error}")
        if state.registry is None or not state.registry.ready:
            return error_response(503, "NotReady", "loading the model")
        if not state.engine.accepting:
            return error_response(503, "ShuttingDown", "the server is shutting down")
        return {"status": "ready", "model": state.registry.current, "loaded": state.registry.loaded()}

    @app.get("/metrics", tags=["operations"])
    async def metrics():
        """Prometheus metrics: queue depth, in flight, latency per endpoint, images, errors by kind."""
        if state.metrics is None:
            return Response("", media_type="text/plain")
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype)

    app.add_middleware(_Gate, state=state)
    return app


def _name_field(message: str) -> str:
    """The pipeline's InputError names its own arguments (guidance, strength, image, ...); say
    which A1111 field that is."""
    for sdrt_name, field_name in (("guidance", "cfg_scale"), ("strength", "denoising_strength"), ("image", "init_images"),
                                  ("sampler", "sampler_name"), ("schedule", "scheduler"), ("clip_skip", "CLIP_stop_at_last_layers")):
        if message.startswith(sdrt_name) or message.startswith(f"unknown {sdrt_name}"):
            return f"{field_name}: {message}"
    return message


def describe_validation(errors: list[dict]) -> str:
    """FastAPI's validation errors as one line: which field, what was wrong, what is accepted."""
    parts = []
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        name = ".".join(loc) or "request body"
        kind = e.get("type", "")
        if kind == "extra_forbidden":
            parts.append(f"{name}: unknown field (not an A1111 API field sdrt accepts; see /docs)")
        elif kind == "json_invalid":
            parts.append(f"request body: malformed JSON ({e.get('ctx', {}).get('error', e.get('msg', ''))})")
        elif kind == "missing" and name == "request body":
            parts.append("request body: a JSON object is required")
        elif kind == "missing":
            parts.append(f"{name}: required")
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, (str, bytes)) or len(got) < 60 else f"{type(got).__name__} of {len(got)} characters"
            parts.append(f"{name}: {e.get('msg', 'invalid')}, got {shown}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more
