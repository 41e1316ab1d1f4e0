"""The ``indicf5`` command. Exit status: 0 done, 2 bad input (one line on stderr), 1 failure."""

from __future__ import annotations

import argparse
import ctypes
import functools
import ipaddress
import logging
import os
import signal
import socket
import sys
import warnings
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ValidationError

from indicf5.errors import InputError

SCHEDULE_HELP = (
    "time grid: uniform (IndicF5's), or epss (f5-tts 1.1's for 5, 6, 7, 10, 12, 16 steps; uniform otherwise)"
)


def _validated(model: type[BaseModel], options: dict[str, str] | None = None, **values) -> BaseModel:
    """model(**values), checked before any work; a refused value is bad input named by its option
    (--field-name unless `options` names it otherwise)."""
    try:
        return model(**values)
    except ValidationError as e:
        problems = []
        for error in e.errors():
            message = error["msg"].removeprefix("Value error, ")
            if error["loc"]:
                field = str(error["loc"][0])
                option = (options or {}).get(field, "--" + field.replace("_", "-"))
                message = f"{option} {values.get(field, error['input'])}: {message}"
            problems.append(message)
        raise InputError("; ".join(problems)) from None


def _make_synthetic(args) -> None:
    from indicf5.config import ModelConfig
    from indicf5.synthetic import make_synthetic

    _validated(
        ModelConfig,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        dim_head=args.dim // max(args.heads, 1),
        text_dim=args.text_dim,
        conv_layers=args.conv_layers,
    )
    out = make_synthetic(
        args.dir,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        text_dim=args.text_dim,
        conv_layers=args.conv_layers,
        seed=args.seed,
        replace=args.force,
    )
    print(f"synthetic IndicF5 snapshot: {out}")
    print(f"  reference: {out / 'reference.wav'} ({(out / 'reference.txt').read_text().strip()})")


def _stream(synth, args, ref_text: str, sampling) -> None:
    """WAV with a streaming header, written chunk by chunk as the text is rendered (`--out -`: stdout)."""
    from indicf5.audio import pcm16, wav_stream_header

    out = sys.stdout.buffer if str(args.out) == "-" else open(args.out, "wb")
    try:
        out.write(wav_stream_header(synth.mel_config.sample_rate))
        for samples in synth.stream(args.text, args.ref_audio, ref_text, sampling):
            out.write(pcm16(samples).tobytes())
            out.flush()
    finally:
        if out is not sys.stdout.buffer:
            out.close()


def _synth(args) -> None:
    from indicf5.audio import check_writable, write_wav
    from indicf5.config import SamplingConfig, check_device
    from indicf5.synth import Synthesizer

    sampling = _validated(
        SamplingConfig,
        {"cfg_strength": "--cfg"},
        nfe=args.nfe,
        cfg_strength=args.cfg,
        speed=args.speed,
        seed=args.seed,
        schedule=args.schedule,
    )
    try:
        check_device(args.device)
    except ValueError as e:
        raise InputError(f"--device: {e}") from None
    check_writable(args.out)
    ref_text = args.ref_text
    if ref_text is None:
        ref_txt = Path(args.ref_audio).with_suffix(".txt")
        if not ref_txt.is_file():
            raise InputError(f"no --ref-text given and no transcript at {ref_txt}: give --ref-text")
        ref_text = ref_txt.read_text(encoding="utf-8").strip()
    if args.engine:
        synth = Synthesizer.from_engine(args.engine, device=args.device, vocoder_dir=args.vocoder)
    else:
        synth = Synthesizer.from_checkpoint(
            args.checkpoint, device=args.device, dtype=args.dtype, vocab=args.vocab, vocoder_dir=args.vocoder
        )
    if args.stream:
        _stream(synth, args, ref_text, sampling)
        return
    speech = synth.synthesize(args.text, args.ref_audio, ref_text, sampling, progress=True)
    write_wav(args.out, speech.wave, speech.sample_rate)
    print(
        f"{args.out}: {len(speech.wave) / speech.sample_rate:.2f} s at {speech.sample_rate} Hz, "
        f"{len(speech.chunks)} chunk(s)"
    )


def _build(args) -> int:
    from indicf5.backends import get_backend
    from indicf5.config import SamplingConfig

    for backend in args.backend or []:
        get_backend(backend)  # an unknown name is bad input, before Prefect starts
    _validated(SamplingConfig, nfe=args.nfe)
    _validated(SamplingConfig, {"nfe": "--parity-nfe"}, nfe=args.parity_nfe)

    from flows.build import BuildFailed, StageFailed, build_engine_flow
    from indicf5.parity import ParityConfig
    from indicf5.settings import Settings

    params = dict(
        repo_id=args.repo_id,
        revision=args.revision,
        checkpoint=args.checkpoint,
        synthetic=args.synthetic,
        backends=args.backend or ["eager"],
        dtypes=args.dtype or ["fp32", "fp16"],
        nfe=args.nfe,
        schedule=args.schedule,
        bench_lengths=args.bench_lengths,
        parity=ParityConfig(nfe=args.parity_nfe, schedule=args.schedule),
    )
    start_prefect_api()
    state = build_engine_flow(**params, return_state=True)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, StageFailed) and isinstance(outcome.error, InputError):
        raise InputError(f"{outcome.stage}: {outcome.error}")
    if isinstance(outcome, StageFailed):
        print(f"indicf5 build: stage {outcome.stage} failed: {outcome.error}", file=sys.stderr)
        return 1
    summary = outcome.summary if isinstance(outcome, BuildFailed) else outcome
    settings = Settings()
    print(f"\nbuilt {summary.source.repo_id} @ {summary.source.sha[:12]}")
    for b in summary.branches:
        if b.error:
            print(f"  {b.backend:8} {b.dtype}: FAILED {b.error}")
        else:
            print(
                f"  {b.backend:8} {b.dtype}: engine {b.engine}  (parity relL2 {b.parity_rel_l2:.1e}; "
                f"manifest {b.engine}/manifest.json)"
            )
    print("  stages: " + ", ".join(f"{k}={v}" for k, v in summary.stages.items()))
    print(f"MLflow run {summary.mlflow_run_id} in {summary.tracking_uri}")
    print(f"  open it:   mlflow ui --backend-store-uri {settings.tracking_uri}   (then http://127.0.0.1:5000)")
    print(
        "  Prefect:   prefect server start   (then http://127.0.0.1:4200; set PREFECT_API_URL=http://127.0.0.1:4200/api"
    )
    print("             before a build to watch it live)")
    return 1 if summary.failed else 0


class FlowFailed(Exception):
    """A flow run by a command failed inside a stage (exit status 1)."""


def _flow_outcome(flow_fn, **params):
    """The flow's return value; bad input raises InputError (exit 2), other failures FlowFailed."""
    start_prefect_api()
    outcome = flow_fn(**params, return_state=True).result(raise_on_failure=False)
    if isinstance(outcome, InputError):
        raise outcome
    if isinstance(outcome, BaseException):
        raise FlowFailed(str(outcome))
    return outcome


def _compare(args) -> None:
    from flows.compare import compare_engines_flow

    comparison = _flow_outcome(compare_engines_flow, repo_id=args.repo_id, revision=args.revision)
    print(comparison.markdown())
    print(
        f"\nMLflow run {comparison.run_id}: comparison.md, comparison.png; "
        f"alias champion -> version {comparison.champion_version}"
    )


def _watch(args) -> None:
    from flows.watch import watch_revisions_flow

    result = _flow_outcome(watch_revisions_flow, repo_id=args.repo_id, branch=args.branch)
    print(f"{result.repo_id}@{result.branch} = {result.sha}: {result.action} ({result.detail})")


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything loads: a taken port is bad input, said in one line."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}; stop what uses it or pick another --port")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _serve(args) -> int:
    import uvicorn

    from indicf5.serve.app import ServerConfig, create_app

    overrides = {
        k: v
        for k, v in (
            ("backend", args.backend),
            ("devices", args.device),
            ("voices_dir", args.voices_dir),
            ("max_batch_rows", args.max_batch),
            ("max_queue", args.max_queue),
        )
        if v is not None
    }
    config = _validated(ServerConfig, {"max_batch_rows": "--max-batch", "devices": "--device"}, **overrides)
    if config.backend is not None:
        from indicf5.backends import get_backend

        get_backend(config.backend)  # an unknown name is bad input, before anything loads
    if Path(args.engine).is_dir():
        engine_dir = Path(args.engine)
    else:  # an MLflow reference (MLflow is imported only for these)
        from indicf5.settings import Settings
        from indicf5.tracking import resolve_engine

        engine_dir, backend = resolve_engine(Settings(), args.engine, config.backend)
        config = config.model_copy(update={"backend": backend})
    sock = _listen(args.host, args.port)
    if config.api_key is None and not _is_loopback(args.host):
        warnings.warn(
            f"serving on {args.host} without an API key: anyone who reaches it can add and delete voices; "
            "set TTS_API_KEY to require Authorization: Bearer <key>"
        )
    app = create_app(engine_dir, config)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
    engine = app.state.engine
    engine.on_failure = lambda: setattr(server, "should_exit", True)  # uvicorn's way to stop a running server
    print(f"serving {engine_dir} on http://{args.host}:{args.port} (docs at /docs)", flush=True)
    server.run(sockets=[sock])
    if isinstance(engine.failure, InputError):
        raise InputError(f"the engine {engine_dir} failed to load: {engine.failure}")
    if engine.failure is not None:
        reason = f"{type(engine.failure).__name__}: {engine.failure}"
        print(f"indicf5 serve: the engine {engine_dir} failed to load: {reason}", file=sys.stderr)
        return 1
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="indicf5", description="IndicF5 text-to-speech: reference library and engine builds"
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-synthetic", help="write a synthetic IndicF5 snapshot (random weights, real layout)")
    s.add_argument("dir", type=Path)
    s.add_argument("--dim", type=int, default=64)
    s.add_argument("--depth", type=int, default=2)
    s.add_argument("--heads", type=int, default=4)
    s.add_argument("--text-dim", type=int, default=32)
    s.add_argument("--conv-layers", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace an existing directory")
    s.set_defaults(run=_make_synthetic)

    s = sub.add_parser("synth", help="speak text in the voice of a reference clip")
    weights = s.add_mutually_exclusive_group(required=True)
    weights.add_argument(
        "--checkpoint", type=Path, help="snapshot directory or .safetensors/.pt file (reference model)"
    )
    weights.add_argument(
        "--engine", type=Path, help="a built engine directory (any backend; its dtype is the engine's)"
    )
    s.add_argument("--text", required=True)
    s.add_argument("--ref-audio", required=True, type=Path)
    s.add_argument("--ref-text", help="transcript of the reference (default: the .txt beside --ref-audio)")
    s.add_argument("--out", required=True, type=Path, help="the WAV to write; with --stream, - writes to stdout")
    s.add_argument(
        "--stream",
        action="store_true",
        help="write the audio as each text chunk is rendered (a WAV with a streaming header; the same samples)",
    )
    s.add_argument("--vocab", type=Path, help="vocab.txt, when --checkpoint is a single file")
    s.add_argument("--vocoder", type=Path, help="local vocos directory, when the checkpoint bundles no vocoder")
    s.add_argument("--nfe", type=int, default=32)
    s.add_argument("--schedule", choices=["uniform", "epss"], default="uniform", help=SCHEDULE_HELP)
    s.add_argument("--cfg", type=float, default=2.0)
    s.add_argument("--speed", type=float, default=1.0)
    s.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="with --checkpoint")
    s.add_argument("--device", default="cpu")
    s.add_argument("--seed", type=int)
    s.set_defaults(run=_synth)

    s = sub.add_parser(
        "build", help="build engines: resolve, download, export, convert, build, verify, benchmark, register"
    )
    source = s.add_mutually_exclusive_group()
    source.add_argument("--synthetic", action="store_true", help="the embedded synthetic snapshot (no hub)")
    source.add_argument("--checkpoint", help="a local IndicF5 snapshot directory")
    source.add_argument("--repo-id", default="ai4bharat/IndicF5")
    s.add_argument("--revision", default="main", help="branch, tag or commit sha")
    s.add_argument("--backend", action="append", help="eager, compiled, trtllm (repeatable; default eager)")
    s.add_argument(
        "--dtype", action="append", choices=["fp32", "fp16", "bf16"], help="repeatable; default fp32 and fp16"
    )
    s.add_argument("--nfe", type=int, default=32)
    s.add_argument("--schedule", choices=["uniform", "epss"], default="uniform", help=SCHEDULE_HELP)
    s.add_argument("--bench-lengths", type=int, nargs="+", default=[250, 500], metavar="FRAMES")
    s.add_argument("--parity-nfe", type=int, default=8)
    s.set_defaults(run=_build)

    s = sub.add_parser("compare", help="engines of one revision side by side from MLflow; sets the champion alias")
    s.add_argument("--repo-id", help="compare the newest build of this repo (default: the newest build of any source)")
    s.add_argument("--revision", help="commit sha of the builds (default: the newest registered build's)")
    s.set_defaults(run=_compare)

    s = sub.add_parser("watch", help="trigger the build-engine deployment for a new commit of the watched branch")
    s.add_argument("--repo-id", default="ai4bharat/IndicF5")
    s.add_argument("--branch", default="main")
    s.set_defaults(run=_watch)

    s = sub.add_parser("serve", help="HTTP text-to-speech server over a built engine (FastAPI; docs at /docs)")
    s.add_argument(
        "--engine",
        default="champion",
        help="engine directory, MLflow engine run id, alias of the registered model (default champion), "
        "or MLflow model URI (models:/..., runs:/...); one not on this machine is downloaded",
    )
    s.add_argument(
        "--backend", help="eager (the PyTorch path), compiled or trtllm; default the engine's own (env TTS_BACKEND)"
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--device", action="append", help="one inference worker per device (repeatable); default every GPU, else cpu"
    )
    s.add_argument("--voices-dir", type=Path, help="named voices (default $INDICF5_HOME/voices)")
    s.add_argument("--max-batch", type=int, help="utterance chunks per engine batch (default 8)")
    s.add_argument("--max-queue", type=int, help="queued requests before answering 429 (default 64)")
    s.set_defaults(run=_serve)
    return p


QUIET_ENV = Path(__file__).with_name("quiet.env")  # no telemetry, analytics or promotional calls


def quiet_settings() -> dict[str, str]:
    return dict(line.split("=", 1) for line in QUIET_ENV.read_text().splitlines() if line and not line.startswith("#"))


PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies


def _dies_with(parent: int) -> Callable[[], None]:
    """A preexec_fn: the child gets SIGTERM when `parent` ends, however it ends (Linux)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent was gone before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def start_prefect_api() -> None:
    """Without PREFECT_API_URL, Prefect's temporary API server for this command, started here and
    bound to this process: SIGKILL leaves Prefect no chance to stop it, so the kernel does (parent-
    death signal). Starts are serialised per Prefect home: a first start migrates its database."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled or not sys.platform.startswith("linux"):
        return
    import subprocess

    from filelock import FileLock
    from prefect.server.api.server import SubprocessASGIServer

    class ServerOfThisProcess(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            popen = subprocess.Popen  # Prefect's own command, with the signal armed in its child
            subprocess.Popen = functools.partial(popen, preexec_fn=_dies_with(os.getpid()))
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = popen

    settings.home.mkdir(parents=True, exist_ok=True)
    with FileLock(settings.home / "indicf5-server-start.lock"):
        ServerOfThisProcess().start()  # the instance Prefect's clients use (one server a process)


def use_prefect_defaults() -> None:
    """Settings Prefect and MLflow read when first imported; a user's own environment wins."""
    # Without PREFECT_API_URL a build runs on Prefect's ephemeral API, which migrates a new database on its
    # first start: 19-25 s on a 2-core machine, past Prefect's default 20 s wait, and the build then fails.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    for key, value in quiet_settings().items():  # the ephemeral server started offline keeps quiet too
        os.environ.setdefault(key, value)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    use_prefect_defaults()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("indicf5").setLevel(logging.INFO)
    warnings.formatwarning = lambda message, category, *_: f"warning: {message}\n"
    try:
        return args.run(args) or 0
    except InputError as e:
        print(f"indicf5 {args.command}: {e}", file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"indicf5 {args.command}: {e}; pass --force to replace it", file=sys.stderr)
        return 2
    except FlowFailed as e:
        print(f"indicf5 {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
