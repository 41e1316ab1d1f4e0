"""The HTTP API. Handlers validate and prepare a request (text checks, reference audio) in a thread,
queue its rows for an inference worker, wait for them (freeing the slot if the client leaves or
the request times out), then join and encode the audio (`speak`). Routes live on a module-level
`APIRouter` and read the server's parts from `app.state` (config, engine, queue, voices, metrics);
library errors map to statuses by their class (`ERROR_STATUS`).

    POST /v1/audio/speech   OpenAI-compatible: {"input", "voice", "speed", "response_format"}
    POST /v1/synthesize     multipart: text, ref_audio (file), ref_text
    GET/POST/DELETE /v1/voices
    GET /healthz  GET /readyz  GET /metrics  GET /docs (Swagger UI from local assets)

With TTS_API_KEY set, every route but the probes (/healthz, /readyz) and the docs (/docs,
/openapi.json and their assets) wants `Authorization: Bearer <key>`, as OpenAI clients send it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, AsyncIterator, Callable, Literal

import torch
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from indicf5.audio import AudioTooLong, CrossFade, audio_bytes, pcm16, prepare_reference, wav_stream_header
from indicf5.backends import read_spec
from indicf5.config import SEED_MAX, Device, SamplingConfig, Schedule, Seed
from indicf5.errors import InputError
from indicf5.settings import Settings
from indicf5.serve.batching import InferenceFailed, InferenceQueue, InferenceWorker, QueueFull
from indicf5.serve.metrics import Metrics
from indicf5.serve.middleware import BodyLimit, Measure, error_response
from indicf5.serve.voices import UnknownVoice, Voice, VoiceExists, VoiceQuotaExceeded, VoiceStore, audio_suffix
from indicf5.synth import Row, Synthesizer

log = logging.getLogger(__name__)

AUDIO_FORMATS = {"wav": ("WAV", "audio/wav"), "flac": ("FLAC", "audio/flac"), "pcm": ("RAW", "audio/pcm")}
ResponseFormat = Literal["wav", "pcm", "flac"]


class ServerConfig(BaseSettings):
    """What `indicf5 serve` runs; every field is also an environment variable (TTS_BACKEND, ...)."""

    model_config = SettingsConfigDict(env_prefix="TTS_", extra="ignore")

    backend: str | None = Field(None, description="run the engine on this backend (eager = the PyTorch path)")
    devices: list[Device] = Field(
        default_factory=list, description="one inference worker each; default every GPU, else cpu"
    )
    voices_dir: Path | None = Field(None, description="named voices; default $INDICF5_HOME/voices")
    max_queue: int = Field(64, ge=1, description="queued requests before 429")
    max_batch_rows: int = Field(8, ge=1, description="utterance chunks per engine batch")
    batch_wait_ms: float = Field(10.0, ge=0, description="how long a worker waits for batch-mates")
    request_timeout_s: float = Field(120.0, gt=0)
    max_text_chars: int = Field(2000, ge=1)
    max_upload_bytes: int = Field(10 * 2**20, ge=1)
    nfe: int = Field(32, ge=1, le=1024)
    schedule: Schedule = Field("uniform", description="time grid of requests that name none (SamplingConfig)")
    api_key: SecretStr | None = Field(None, description="when set, requests need Authorization: Bearer <api_key>")
    max_voices: int = Field(100, ge=0, description="stored voices before POST /v1/voices answers 507")
    max_voices_bytes: int = Field(2**30, ge=0, description="disk the stored voices may use before 507")

    def worker_devices(self) -> list[str]:
        if self.devices:
            return self.devices
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]


class SpeechRequest(BaseModel):
    """OpenAI's /v1/audio/speech body (``model`` and ``instructions`` are accepted and ignored)."""

    input: str = Field(description="text to speak")
    voice: str = Field(description="a voice added with POST /v1/voices")
    model: str | None = None
    instructions: str | None = None
    speed: float = Field(1.0, ge=0.25, le=4.0)
    response_format: ResponseFormat = "wav"
    seed: Seed | None = Field(None, description=f"same seed, same audio (0 to {SEED_MAX})")
    schedule: Schedule | None = Field(None, description="time grid: uniform or epss (default: the server's)")
    stream: bool = Field(
        False, description="send the audio as each text chunk is rendered (chunked transfer; pcm or wav)"
    )
    stream_format: Literal["audio"] | None = Field(
        None, description="OpenAI's: raw audio bytes (server-sent events are not served)"
    )


@dataclass
class Engine:
    """The loaded engine: one synthesizer per device, their workers, and the queue they share."""

    engine_dir: Path
    config: ServerConfig
    queue: InferenceQueue
    metrics: Metrics
    synthesizers: list[Synthesizer] = field(default_factory=list)
    workers: list[InferenceWorker] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    failure: Exception | None = None
    on_failure: Callable[[], None] | None = None  # `indicf5 serve` stops the server: no engine, no service

    def load(self) -> None:
        """Loads and warms an engine per device, captures every shape its batches can take, then
        starts their workers (on a thread: /healthz answers meanwhile)."""
        try:
            for device in self.config.worker_devices():
                synth = Synthesizer.from_engine(self.engine_dir, device=device, backend=self.config.backend)
                warm_up(synth, self.config)
                self.synthesizers.append(synth)
            model = self.synthesizers[0].model
            if hasattr(model, "max_batch"):  # the engine's token budget bounds a batch's rows at each length
                self.queue.rows_for = model.max_batch
            if hasattr(model, "batch_seconds"):  # and its measured cost, which batch sizes pay
                self.queue.batch_cost = model.batch_seconds
            self.queue.workers = len(self.synthesizers)
            self.watch_after_ready()
            self.workers = [InferenceWorker(self.queue, s) for s in self.synthesizers]
            for w in self.workers:
                w.start()
            self.ready.set()
            log.info("engine %s ready on %s", self.engine_dir, ", ".join(s.device for s in self.synthesizers))
        except Exception as e:
            self.failure = e
            if isinstance(e, InputError):
                log.error("loading the engine %s failed: %s", self.engine_dir, e)
            else:
                log.exception("loading the engine %s failed", self.engine_dir)
            if self.on_failure is not None:
                self.on_failure()

    def watch_after_ready(self) -> None:
        """The metrics of what the engines compile and capture from now on (nothing, when load did it all)."""
        from torch._dynamo.utils import counters

        models = [s.model for s in self.synthesizers]
        captures = lambda: sum(getattr(m, "captures", 0) for m in models)
        compiles = lambda: counters["stats"]["unique_graphs"]
        captured, compiled = captures(), compiles()
        self.metrics.captures_after_ready.set_function(lambda: captures() - captured)
        self.metrics.compiles_after_ready.set_function(lambda: compiles() - compiled)
        self.metrics.graph_memory.set_function(
            lambda: sum(m.graph_memory_bytes() for m in models if hasattr(m, "graph_memory_bytes"))
        )

    def close(self) -> None:
        self.queue.close()
        for w in self.workers:
            w.join(timeout=30)


def warm_up(synth: Synthesizer, config: ServerConfig) -> None:
    """One guided utterance through the engine, so the first request pays no first-call costs, and
    an engine that captures its shapes captures every one of up to max_batch_rows utterances."""
    n_mels = synth.mel_config.n_mels
    row = Row(torch.zeros(64, n_mels, device=synth.device), torch.zeros(16, dtype=torch.long), 160, 64, 0)
    synth.render([row], SamplingConfig(nfe=config.nfe))
    if hasattr(synth.model, "capture"):
        with torch.inference_mode():
            synth.model.capture(max_batch=config.max_batch_rows)


# --- errors: always JSON (middleware.error_response), counted by Measure


class ApiError(Exception):
    """An answer other than 200 that a handler decides on, with its status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# Library errors by class; a subclass takes its nearest listed ancestor's status.
ERROR_STATUS: dict[type[Exception], int] = {
    InputError: 400,
    UnknownVoice: 404,
    VoiceExists: 409,
    AudioTooLong: 413,
    VoiceQuotaExceeded: 507,
}


def error_status(e: Exception) -> int:
    return next(ERROR_STATUS[c] for c in type(e).__mro__ if c in ERROR_STATUS)


async def api_error(request: Request, e: ApiError) -> Response:
    return error_response(e.status, e.message, e.headers)


async def library_error(request: Request, e: Exception) -> Response:
    return error_response(error_status(e), str(e))


async def validation_error(request: Request, e: RequestValidationError) -> Response:
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'] if p != 'body')}: {err['msg']}" for err in e.errors())
    return error_response(422, f"invalid request: {problems}")


async def http_error(request: Request, e: HTTPException) -> Response:
    return error_response(e.status_code, str(e.detail), e.headers)


async def server_error(request: Request, e: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path)  # the details (paths, values) stay in the log
    return error_response(500, f"internal error ({type(e).__name__}); the server's log has the details")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    for error in ERROR_STATUS:
        app.add_exception_handler(error, library_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)


# --- request checks


bearer = HTTPBearer(auto_error=False, description="the server's TTS_API_KEY, when it has one")


def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    key = request.app.state.config.api_key
    if key is None:
        return
    given = credentials.credentials.encode() if credentials else b""
    if not secrets.compare_digest(given, key.get_secret_value().encode()):
        raise ApiError(
            401,
            "missing or wrong API key: send Authorization: Bearer <the server's TTS_API_KEY>",
            {"WWW-Authenticate": "Bearer"},
        )


def require_ready(engine: Engine) -> Synthesizer:
    if engine.failure is not None:
        raise ApiError(503, f"the engine failed to load: {engine.failure}")
    if not engine.ready.is_set():
        raise ApiError(503, "the engine is still loading; retry shortly", {"Retry-After": "5"})
    return engine.synthesizers[0]


def content_type(expected: str):
    """A route dependency: the request's media type must be `expected`."""

    def check(request: Request) -> None:
        got = request.headers.get("content-type", "").split(";")[0].strip().lower()  # media types ignore case
        if got != expected:
            raise ApiError(415, f"content type {got or 'missing'!r}: this endpoint takes {expected}")

    return Depends(check)


json_body, multipart_body = content_type("application/json"), content_type("multipart/form-data")


def check_text(text: str, what: str, config: ServerConfig) -> None:
    if not text.strip():
        raise ApiError(400, f"{what} is empty: give the text to speak")
    if len(text) > config.max_text_chars:
        raise ApiError(
            413,
            f"{what} is {len(text)} characters; the limit is {config.max_text_chars}: split it into several requests",
        )


@asynccontextmanager
async def received(upload: UploadFile, config: ServerConfig) -> AsyncIterator[Path]:
    """The upload as a file of the server's naming in a temporary directory (a client's name may be `..` or
    too long for the filesystem); errors about it name the upload, never the temporary file."""
    shown = Path(upload.filename or "").name[:64] or "the upload"
    if upload.size is not None and upload.size > config.max_upload_bytes:
        raise ApiError(413, f"{shown}: {upload.size} bytes; uploads are limited to {config.max_upload_bytes} bytes")
    if not upload.size:
        raise ApiError(400, f"{shown} is empty: send a WAV or FLAC reference clip")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload{audio_suffix(upload.filename)}"
        with path.open("wb") as f:
            await run_in_threadpool(shutil.copyfileobj, upload.file, f)
        try:
            yield path
        except InputError as e:
            raise type(e)(str(e).replace(str(path), shown)) from None


def sampling_for(
    config: ServerConfig, speed: float, seed: int | None, schedule: Schedule | None = None
) -> SamplingConfig:
    return SamplingConfig(nfe=config.nfe, speed=speed, seed=seed, schedule=schedule or config.schedule)


# --- speaking: prepare -> queue -> wait -> finish -> encode


def submit(queue: InferenceQueue, rows: list[Row], sampling: SamplingConfig, after=None):
    """The rows queued as one job (its future); a full queue is a 429 with its Retry-After."""
    try:
        return queue.submit(rows, sampling, after)
    except QueueFull as e:
        raise ApiError(429, str(e), {"Retry-After": str(e.retry_after_s)}) from None


async def speak(
    request: Request, text: str, ref_audio: Path, ref_text: str, sampling: SamplingConfig, fmt: str
) -> Response:
    state = request.app.state
    synth = require_ready(state.engine)
    stages = state.queue.metrics.stage_seconds
    with stages.labels("prepare").time():
        utterance = await run_in_threadpool(synth.prepare, text, ref_audio, ref_text, sampling)
    future = submit(state.queue, utterance.rows, sampling)
    rendered = await wait_for(future, request, state.config.request_timeout_s)
    with stages.labels("encode").time():
        speech = synth.finish(utterance, rendered, sampling)
        container, media_type = AUDIO_FORMATS[fmt]
        body = await run_in_threadpool(audio_bytes, speech.wave, speech.sample_rate, container)
    seconds = len(speech.wave) / speech.sample_rate
    return Response(
        body,
        media_type=media_type,
        headers={"X-Audio-Seconds": f"{seconds:.3f}", "X-Sample-Rate": str(speech.sample_rate)},
    )


async def wait_for(future, request: Request | None, timeout_s: float):
    """The job's result; cancels it (freeing its queue slot) when the client leaves or time runs out.
    Without `request` only the time is watched (a stream's body: Starlette cancels it when the client leaves)."""
    waiting = asyncio.wrap_future(future)
    deadline = time.monotonic() + timeout_s
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        if done:
            return waiting.result()
        if request is not None and await request.is_disconnected():
            future.cancel()
            raise ApiError(499, "client closed the request")
        if time.monotonic() >= deadline:
            future.cancel()
            raise ApiError(504, f"no result within {timeout_s:g} s; the server is busy, retry later")


async def speak_stream(
    request: Request, text: str, ref_audio: Path, ref_text: str, sampling: SamplingConfig, fmt: str
) -> StreamingResponse:
    """`speak`'s audio as it is rendered: the first chunk queued alone, the rest as one job that
    follows it, each chunk's final samples sent as soon as it is vocoded (the same samples as
    the whole response: audio.CrossFade)."""
    if fmt not in ("pcm", "wav"):
        raise ApiError(422, f"invalid request: response_format {fmt!r} cannot stream; stream pcm or wav")
    state = request.app.state
    synth = require_ready(state.engine)
    with state.queue.metrics.stage_seconds.labels("prepare").time():
        utterance = await run_in_threadpool(synth.prepare, text, ref_audio, ref_text, sampling)
    futures = [submit(state.queue, utterance.rows[:1], sampling)]
    if len(utterance.rows) > 1:
        try:
            futures.append(submit(state.queue, utterance.rows[1:], sampling, after=futures[0]))
        except ApiError:
            futures[0].cancel()
            raise
    rate, deadline = synth.mel_config.sample_rate, time.monotonic() + state.config.request_timeout_s
    scale, joiner = synth.loudness_scale(utterance, sampling), CrossFade(rate, sampling.cross_fade_s)

    async def audio():
        try:
            if fmt == "wav":
                yield wav_stream_header(rate)
            for future in futures:
                for rendered in await wait_for(future, None, max(0.0, deadline - time.monotonic())):
                    yield pcm16(joiner.push(rendered.wave * scale)).tobytes()
            yield pcm16(joiner.close()).tobytes()
        except (ApiError, InferenceFailed) as e:  # the status is sent already: the stream ends short
            log.warning("stream ended early: %s", e)
        finally:
            for future in futures:
                future.cancel()

    return StreamingResponse(audio(), media_type=AUDIO_FORMATS[fmt][1], headers={"X-Sample-Rate": str(rate)})


# --- routes


api = APIRouter(dependencies=[Depends(require_api_key)])
probes = APIRouter()  # open to load balancers and orchestrators, key or not
AUDIO_RESPONSES = {200: {"content": {"audio/wav": {}, "audio/flac": {}, "audio/pcm": {}}}}


@api.post(
    "/v1/audio/speech", response_class=Response, tags=["speech"], dependencies=[json_body], responses=AUDIO_RESPONSES
)
async def audio_speech(request: Request, body: SpeechRequest):
    """Speech for `input` in a stored voice; `pcm` is raw 16-bit little-endian mono at 24 kHz."""
    config = request.app.state.config
    check_text(body.input, "input", config)
    voice, audio = request.app.state.voices.get(body.voice)
    sampling = sampling_for(config, body.speed, body.seed, body.schedule)
    respond = speak_stream if body.stream else speak
    return await respond(request, body.input, audio, voice.ref_text, sampling, body.response_format)


@api.post(
    "/v1/synthesize", response_class=Response, tags=["speech"], dependencies=[multipart_body], responses=AUDIO_RESPONSES
)
async def synthesize(
    request: Request,
    text: Annotated[str, Form()],
    ref_audio: Annotated[UploadFile, File()],
    ref_text: Annotated[str, Form()],
    speed: Annotated[float, Form(ge=0.25, le=4.0)] = 1.0,
    seed: Annotated[int | None, Form(ge=0, le=SEED_MAX)] = None,
    schedule: Annotated[Schedule | None, Form()] = None,
    response_format: Annotated[ResponseFormat, Form()] = "wav",
):
    """Speech for `text` in the voice of an uploaded reference clip and its transcript."""
    config = request.app.state.config
    check_text(text, "text", config)
    check_text(ref_text, "ref_text", config)
    async with received(ref_audio, config) as path:
        return await speak(request, text, path, ref_text, sampling_for(config, speed, seed, schedule), response_format)


@api.get("/v1/voices", tags=["voices"])
async def list_voices(request: Request) -> list[Voice]:
    return request.app.state.voices.list()


@api.post("/v1/voices", status_code=201, tags=["voices"], dependencies=[multipart_body])
async def add_voice(
    request: Request,
    name: Annotated[str, Form()],
    audio: Annotated[UploadFile, File()],
    ref_text: Annotated[str, Form()],
) -> Voice:
    """Stores a named reference voice (the clip and its transcript) for /v1/audio/speech."""
    config, voices = request.app.state.config, request.app.state.voices
    check_text(ref_text, "ref_text", config)
    async with received(audio, config) as path:
        await run_in_threadpool(prepare_reference, path, SamplingConfig().target_rms)  # refuses what cannot be one
        return await run_in_threadpool(voices.add, name, path, ref_text)


@api.delete("/v1/voices/{name}", status_code=204, tags=["voices"])
async def delete_voice(request: Request, name: str) -> Response:
    request.app.state.voices.delete(name)
    return Response(status_code=204)


@probes.get("/healthz", tags=["operations"])
async def healthz():
    """The process answers."""
    return {"status": "ok"}


@probes.get("/readyz", tags=["operations"])
async def readyz(request: Request):
    """Ready once the engine is loaded and warmed on every device."""
    engine, config = request.app.state.engine, request.app.state.config
    require_ready(engine)
    spec = read_spec(engine.engine_dir)
    return {
        "ready": True,
        "engine": str(engine.engine_dir),
        "backend": config.backend or spec.backend,
        "dtype": spec.dtype,
        "devices": [s.device for s in engine.synthesizers],
        "queue_depth": len(engine.queue),
    }


@api.get("/metrics", tags=["operations"])
async def prometheus_metrics(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# --- the app


@asynccontextmanager
async def lifespan(app: FastAPI):
    engine = app.state.engine
    threading.Thread(target=engine.load, name="engine-load", daemon=True).start()
    yield
    engine.close()


def create_app(engine_dir: Path, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    metrics = Metrics()
    queue = InferenceQueue(metrics, config.max_queue, config.max_batch_rows, config.batch_wait_ms / 1000)
    app = FastAPIOffline(
        title="IndicF5 TTS",
        version="0.1.0",
        lifespan=lifespan,
        description="Speech in the voice of a reference clip, from a built IndicF5 engine.",
    )
    app.state.config, app.state.metrics, app.state.queue = config, metrics, queue
    app.state.engine = Engine(Path(engine_dir), config, queue, metrics)
    app.state.voices = VoiceStore(
        config.voices_dir or Settings().store_root / "voices", config.max_voices, config.max_voices_bytes
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes + 2**16)  # the upload plus its form fields
    app.add_middleware(Measure, metrics=metrics)
    app.include_router(api)
    app.include_router(probes)
    return app
