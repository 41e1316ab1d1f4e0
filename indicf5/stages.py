"""The runbook's stages as plain functions over the artifact store.

    (synthetic ─> the embedded snapshot, a local source)
    source ─download─> snapshot ─export─> transformer export
    for each (backend, dtype): export ─convert─> checkpoint ─build─> engine ─verify─> parity ─benchmark─> latencies

Each stage's key hashes what its output depends on: the content hashes of its inputs, its
settings, and the source of the code that makes it. Nothing here knows Prefect: tasks/ wraps
these functions, and its cache keys come from `Stage.cached`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from indicf5 import benchmark as benchmark_module
from indicf5 import checkpoint as checkpoint_module
from indicf5 import hub, model, parity, plots, sampler, synthetic
from indicf5.backends import EngineSpec, build_engine, get_backend, load_engine
from indicf5.benchmark import BenchmarkConfig, benchmark_engine
from indicf5.checkpoint import build_model, export_transformer, load_export
from indicf5.audio import write_wav
from indicf5.config import DType, SamplingConfig
from indicf5.environment import EnvironmentReport
from indicf5.errors import InputError
from indicf5.parity import ParityConfig, check_parity
from indicf5.store import ArtifactStore, Manifest, code_hash
from indicf5.synth import Synthesizer
from indicf5.synthetic import REF_TEXT, reference_clip, write_synthetic

SAMPLE_TEXT = "नमस्ते! संगीत की तरह जीवन भी खूबसूरत होता है।"


class ParityError(Exception):
    """An engine's output strayed from the fp32 reference beyond its dtype's threshold."""


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: Callable[..., dict[str, Any]]  # params -> what the key is computed from
    make: Callable[..., dict[str, Any]]  # (out_dir, **params) -> facts for the manifest

    def key(self, store: ArtifactStore, **params) -> str:
        return store.key(self.name, self.inputs(**params))

    def cached(self, store: ArtifactStore, **params) -> Manifest | None:
        """The verified artifact, if one was made from exactly these inputs."""
        return store.load(self.name, self.key(store, **params))

    def run(self, store: ArtifactStore, versions: dict[str, str] | None = None, **params) -> Manifest:
        return store.build(self.name, self.inputs(**params), lambda out: self.make(out, **params), versions)


def hashes(manifest: Manifest) -> dict[str, str]:
    return {name: f.sha256 for name, f in manifest.outputs.items()}


# --- the synthetic snapshot: ours to make, so a damaged one is made again like any artifact

SYNTHETIC = Stage(
    "synthetic", inputs=lambda: {"code": code_hash(synthetic, model)}, make=lambda out: write_synthetic(out)
)


# --- download: the bytes stay in huggingface_hub's cache (or the local snapshot); the store's
#     artifact links to them and records their hashes, so a cache hit still re-checks every byte


def _download(out: Path, source: hub.SourceRef) -> dict[str, Any]:
    if source.kind == "hub":
        path = hub.download_snapshot(source)
    else:
        path = Path(source.repo_id)
        changed = [n for n, f in source.files.items() if not hub.file_matches(path / n, f)]
        if changed:
            raise InputError(f"{', '.join(changed)} in {path} changed while the build ran: start it again")
    for name in source.files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).symlink_to((path / name).resolve())
    return {"repo_id": source.repo_id, "sha": source.sha, "linked_from": str(path)}


DOWNLOAD = Stage("download", inputs=lambda source: {"source": source.model_dump()}, make=_download)


# --- export (runbook step 1)

EXPORT = Stage(
    "export",
    inputs=lambda download: {"files": hashes(download), "code": code_hash(checkpoint_module, model)},
    make=lambda out, download: export_transformer(download.path, out),
)


# --- convert and build, per (backend, dtype) (runbook steps 4 and 5; step 3 inside the trtllm build)


def _convert_inputs(export: Manifest, backend: str, dtype: DType) -> dict[str, Any]:
    return {
        "export": hashes(export),
        "backend": backend,
        "dtype": dtype,
        "code": code_hash(*get_backend(backend).modules),
    }


def _convert(out: Path, export: Manifest, backend: str, dtype: DType) -> dict[str, Any]:
    impl = get_backend(backend)
    impl.require()
    return impl.convert(Path(export.path), dtype, out)


CONVERT = Stage("convert", inputs=_convert_inputs, make=_convert)


def _build_inputs(
    convert: Manifest,
    export: Manifest,
    backend: str,
    dtype: DType,
    flags: dict[str, Any],
    environment: EnvironmentReport,
) -> dict[str, Any]:
    return {
        "convert": hashes(convert),
        "export": hashes(export),
        "backend": backend,
        "dtype": dtype,
        "flags": flags,
        "device": environment.device,
        "gpu": environment.gpu,
        "torch": environment.torch,
        "code": code_hash(*get_backend(backend).modules),
    }


def _build(
    out: Path,
    convert: Manifest,
    export: Manifest,
    backend: str,
    dtype: DType,
    flags: dict[str, Any],
    environment: EnvironmentReport,
) -> dict[str, Any]:
    spec, info = build_engine(
        Path(export.path), Path(convert.path), backend, dtype, out, environment.device, flags, environment.versions()
    )
    return {"spec": spec.model_dump(), **info}


BUILD = Stage("build", inputs=_build_inputs, make=_build)


# --- verify parity against the fp32 reference (runbook step 6, checked)


def _verify_inputs(engine: Manifest, export: Manifest, config: ParityConfig, device: str) -> dict[str, Any]:
    return {
        "engine": hashes(engine),
        "export": hashes(export),
        "config": config.model_dump(),
        "device": device,
        "code": code_hash(parity, sampler, model),
    }


def _verify(out: Path, engine: Manifest, export: Manifest, config: ParityConfig, device: str) -> dict[str, Any]:
    reference_ckpt = load_export(Path(export.path))
    reference = build_model(reference_ckpt, device)
    model_, spec, _, _ = load_engine(engine.path, device)
    report = check_parity(reference, model_, spec.dtype, reference_ckpt.config.text_num_embeds, device, config)
    (out / "parity.json").write_text(report.model_dump_json(indent=2))
    if not report.passed:
        raise ParityError(
            f"{spec.backend}/{spec.dtype} engine fails parity (threshold {report.threshold:.0e}): "
            + "; ".join(report.failures())
        )
    return {"worst_rel_l2": report.worst_rel_l2, "threshold": report.threshold}


VERIFY = Stage("verify", inputs=_verify_inputs, make=_verify)


# --- benchmark, with a sample utterance and the figures (runbook step 6, timed)


def _benchmark_inputs(engine: Manifest, config: BenchmarkConfig, environment: EnvironmentReport) -> dict[str, Any]:
    return {
        "engine": hashes(engine),
        "config": config.model_dump(),
        "device": environment.device,
        "gpu": environment.gpu,
        "torch": environment.torch,
        "code": code_hash(benchmark_module, sampler),
    }


def _benchmark(out: Path, engine: Manifest, config: BenchmarkConfig, environment: EnvironmentReport) -> dict[str, Any]:
    device = environment.device
    synth = Synthesizer.from_engine(engine.path, device=device)
    spec = EngineSpec.model_validate(engine.info["spec"])
    report = benchmark_engine(synth.model, synth.vocoder, spec.dtype, spec.model.text_num_embeds, device, config)
    (out / "benchmark.json").write_text(report.model_dump_json(indent=2))
    label = f"{spec.backend} {spec.dtype}"
    plots.latency_plot(
        {
            f"{label} end-to-end": ([r.frames for r in report.results], [r.end_to_end.p50_ms for r in report.results]),
            f"{label} ODE loop": ([r.frames for r in report.results], [r.loop.p50_ms for r in report.results]),
        },
        out / "latency.png",
        f"{label} on {environment.gpu or 'CPU'}, {config.nfe} NFE",
    )
    ref_wav = out / "reference.wav"
    write_wav(ref_wav, reference_clip(), 24_000)
    speech = synth.synthesize(
        SAMPLE_TEXT, ref_wav, REF_TEXT, SamplingConfig(seed=config.seed, nfe=config.nfe, schedule=config.schedule)
    )
    ref_wav.unlink()
    write_wav(out / "sample.wav", speech.wave, speech.sample_rate)
    plots.mel_plot(speech.mel, out / "mel.png", f"{label}: generated mel")
    return {
        "summary": {
            str(r.frames): {"e2e_p50_ms": r.end_to_end.p50_ms, "loop_p50_ms": r.loop.p50_ms, "rtf": r.rtf}
            for r in report.results
        }
    }


BENCHMARK = Stage("benchmark", inputs=_benchmark_inputs, make=_benchmark)
