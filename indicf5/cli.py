"""The ``indicf5`` command. Exit status: 0 done, 2 bad input (one line on stderr), 1 failure."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from indicf5.errors import InputError


def _make_synthetic(args) -> None:
    from indicf5.synthetic import make_synthetic

    out = make_synthetic(args.dir, dim=args.dim, depth=args.depth, heads=args.heads, text_dim=args.text_dim,
                         conv_layers=args.conv_layers, seed=args.seed, replace=args.force)
    print(f"synthetic IndicF5 snapshot: {out}")
    print(f"  reference: {out / 'reference.wav'} ({(out / 'reference.txt').read_text().strip()})")


def _synth(args) -> None:
    from indicf5.audio import write_wav
    from indicf5.config import SamplingConfig
    from indicf5.synth import Synthesizer

    ref_text = args.ref_text
    if ref_text is None:
        ref_txt = Path(args.ref_audio).with_suffix(".txt")
        if not ref_txt.is_file():
            raise InputError(f"no --ref-text given and no transcript at {ref_txt}: give --ref-text")
        ref_text = ref_txt.read_text(encoding="utf-8").strip()
    sampling = SamplingConfig(nfe=args.nfe, cfg_strength=args.cfg, speed=args.speed, seed=args.seed)
    if args.engine:
        synth = Synthesizer.from_engine(args.engine, device=args.device, vocoder_dir=args.vocoder)
    else:
        synth = Synthesizer.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype, vocab=args.vocab,
                                            vocoder_dir=args.vocoder)
    speech = synth.synthesize(args.text, args.ref_audio, ref_text, sampling, progress=True)
    write_wav(args.out, speech.wave, speech.sample_rate)
    print(f"{args.out}: {len(speech.wave) / speech.sample_rate:.2f} s at {speech.sample_rate} Hz, {len(speech.chunks)} chunk(s)")


def _build(args) -> int:
    from flows.build import BuildFailed, StageFailed, build_engine_flow
    from indicf5.parity import ParityConfig
    from indicf5.settings import Settings

    params = dict(repo_id=args.repo_id, revision=args.revision, checkpoint=args.checkpoint, synthetic=args.synthetic,
                  backends=args.backend or ["eager"], dtypes=args.dtype or ["fp32", "fp16"], nfe=args.nfe,
                  bench_lengths=args.bench_lengths, parity=ParityConfig(nfe=args.parity_nfe))
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
            print(f"  {b.backend:8} {b.dtype}: engine {b.engine}  (parity relL2 {b.parity_rel_l2:.1e}; manifest {b.engine}/manifest.json)")
    print("  stages: " + ", ".join(f"{k}={v}" for k, v in summary.stages.items()))
    print(f"MLflow run {summary.mlflow_run_id} in {summary.tracking_uri}")
    print(f"  open it:   mlflow ui --backend-store-uri {settings.tracking_uri}   (then http://127.0.0.1:5000)")
    print("  Prefect:   prefect server start   (then http://127.0.0.1:4200; set PREFECT_API_URL=http://127.0.0.1:4200/api")
    print("             before a build to watch it live)")
    return 1 if summary.failed else 0


class FlowFailed(Exception):
    """A flow run by a command failed inside a stage (exit status 1)."""


def _flow_outcome(flow_fn, **params):
    """The flow's return value; bad input raises InputError (exit 2), other failures FlowFailed."""
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
    print(f"\nMLflow run {comparison.run_id}: comparison.md, comparison.png; alias champion -> version {comparison.champion_version}")


def _watch(args) -> None:
    from flows.watch import watch_revisions_flow

    result = _flow_outcome(watch_revisions_flow, repo_id=args.repo_id, branch=args.branch)
    print(f"{result.repo_id}@{result.branch} = {result.sha}: {result.action} ({result.detail})")


def _serve(args) -> None:
    import uvicorn

    from indicf5.serve.app import ServerConfig, create_app

    overrides = {k: v for k, v in (("backend", args.backend), ("devices", args.device), ("voices_dir", args.voices_dir),
                                   ("max_batch_rows", args.max_batch), ("max_queue", args.max_queue)) if v is not None}
    config = ServerConfig(**overrides)
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
    print(f"serving {engine_dir} on http://{args.host}:{args.port} (docs at /docs)", flush=True)
    uvicorn.run(create_app(engine_dir, config), host=args.host, port=args.port, log_level="info")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="indicf5", description="IndicF5 text-to-speech: reference library and engine builds")
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
    weights.add_argument("--checkpoint", type=Path, help="snapshot directory or .safetensors/.pt file (reference model)")
    weights.add_argument("--engine", type=Path, help="a built engine directory (any backend; its dtype is the engine's)")
    s.add_argument("--text", required=True)
    s.add_argument("--ref-audio", required=True, type=Path)
    s.add_argument("--ref-text", help="transcript of the reference (default: the .txt beside --ref-audio)")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--vocab", type=Path, help="vocab.txt, when --checkpoint is a single file")
    s.add_argument("--vocoder", type=Path, help="local vocos directory, when the checkpoint bundles no vocoder")
    s.add_argument("--nfe", type=int, default=32)
    s.add_argument("--cfg", type=float, default=2.0)
    s.add_argument("--speed", type=float, default=1.0)
    s.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="with --checkpoint")
    s.add_argument("--device", default="cpu")
    s.add_argument("--seed", type=int)
    s.set_defaults(run=_synth)

    s = sub.add_parser("build", help="build engines: resolve, download, export, convert, build, verify, benchmark, register")
    source = s.add_mutually_exclusive_group()
    source.add_argument("--synthetic", action="store_true", help="the embedded synthetic snapshot (no hub)")
    source.add_argument("--checkpoint", help="a local IndicF5 snapshot directory")
    source.add_argument("--repo-id", default="ai4bharat/IndicF5")
    s.add_argument("--revision", default="main", help="branch, tag or commit sha")
    s.add_argument("--backend", action="append", help="eager, compiled, trtllm (repeatable; default eager)")
    s.add_argument("--dtype", action="append", choices=["fp32", "fp16", "bf16"], help="repeatable; default fp32 and fp16")
    s.add_argument("--nfe", type=int, default=32)
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
    s.add_argument("--engine", default="champion",
                   help="engine directory, MLflow engine run id, alias of the registered model (default champion), "
                        "or MLflow model URI (models:/..., runs:/...); one not on this machine is downloaded")
    s.add_argument("--backend", help="eager (the PyTorch path), compiled or trtllm; default the engine's own (env TTS_BACKEND)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--device", action="append", help="one inference worker per device (repeatable); default every GPU, else cpu")
    s.add_argument("--voices-dir", type=Path, help="named voices (default $INDICF5_HOME/voices)")
    s.add_argument("--max-batch", type=int, help="utterance chunks per engine batch (default 8)")
    s.add_argument("--max-queue", type=int, help="queued requests before answering 429 (default 64)")
    s.set_defaults(run=_serve)
    return p


QUIET_ENV = Path(__file__).with_name("quiet.env")  # no telemetry, analytics or promotional calls


def quiet_settings() -> dict[str, str]:
    return dict(line.split("=", 1) for line in QUIET_ENV.read_text().splitlines() if line and not line.startswith("#"))


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
