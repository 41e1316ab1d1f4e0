"""MLflow records of builds: a parent run per build, a nested run per (backend, dtype) engine.

Parent runs carry the tag ``indicf5.build_key`` (a hash of every artifact the build used), which
makes registering idempotent: a rerun of an unchanged build finds its run instead of adding one.
Runs are tagged with the repo and the resolved sha so watchers and comparisons can query them.
Every engine that passed its parity gate is a version of the registered model ``indicf5-engine``;
servers load engines by such a version's alias (``champion``), by engine run id, or by path.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from indicf5.benchmark import BenchmarkReport
from indicf5.environment import EnvironmentReport
from indicf5.errors import InputError
from indicf5.hub import SourceRef
from indicf5.parity import ParityReport
from indicf5.settings import Settings
from indicf5.store import Manifest, stable_hash

TAG = "indicf5."
REGISTERED_MODEL = "indicf5-engine"


class BranchRecord(BaseModel):
    """The artifacts of one (backend, dtype) branch that passed its parity gate."""

    backend: str
    dtype: str
    convert: Manifest
    engine: Manifest
    verify: Manifest
    benchmark: Manifest


def use_tracking(settings: Settings) -> str:
    """Points MLflow at the configured server (or the workspace's sqlite) and returns the experiment id."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(settings.mlflow_experiment)
    if experiment is not None:
        return experiment.experiment_id
    local = settings.mlflow_tracking_uri is None  # a server chooses its own artifact root
    location = (settings.store_root / "mlartifacts").as_uri() if local else None
    return client.create_experiment(settings.mlflow_experiment, artifact_location=location)


def build_key(source: SourceRef, download: Manifest, export: Manifest, branches: list[BranchRecord]) -> str:
    return stable_hash({"source": source.sha, "download": download.key, "export": export.key,
                        "branches": sorted((b.backend, b.dtype, b.engine.key, b.verify.key, b.benchmark.key) for b in branches)})[:32]


def find_build(settings: Settings, key: str) -> str | None:
    experiment = use_tracking(settings)
    runs = MlflowClient().search_runs([experiment], f"tags.`{TAG}build_key` = '{key}'", max_results=1)
    return runs[0].info.run_id if runs else None


def find_build_of(settings: Settings, repo_id: str, sha: str) -> str | None:
    """The newest MLflow parent run of a build of `repo_id` at `sha`, if any."""
    experiment = use_tracking(settings)
    runs = MlflowClient().search_runs([experiment], f"tags.`{TAG}kind` = 'build' and tags.`{TAG}repo_id` = '{repo_id}' "
                                      f"and tags.`{TAG}sha` = '{sha}'", order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _flat(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in values.items()}


def _branch_metrics(b: BranchRecord) -> dict[str, float]:
    parity = ParityReport.model_validate_json(b.verify.file("parity.json").read_text())
    bench = BenchmarkReport.model_validate_json(b.benchmark.file("benchmark.json").read_text())
    metrics = {"convert_seconds": b.convert.seconds, "build_seconds": b.engine.seconds, "verify_seconds": b.verify.seconds,
               "benchmark_seconds": b.benchmark.seconds, "engine_bytes": b.engine.bytes,
               "parity_worst_rel_l2": parity.worst_rel_l2, "peak_memory_mb": bench.peak_memory_mb}
    for n, outputs in parity.errors.items():
        for name, e in outputs.items():
            metrics[f"parity_{name}_rel_l2_{n}"] = e.rel_l2
            metrics[f"parity_{name}_max_abs_{n}"] = e.max_abs
    for r in bench.results:
        for part in ("step", "loop", "vocoder", "end_to_end"):
            timing = getattr(r, part)
            metrics[f"{part}_p50_ms_{r.frames}"] = timing.p50_ms
            metrics[f"{part}_p95_ms_{r.frames}"] = timing.p95_ms
        metrics[f"rtf_{r.frames}"] = r.rtf
    return metrics


def register_build(settings: Settings, source: SourceRef, environment: EnvironmentReport, download: Manifest,
                   export: Manifest, branches: list[BranchRecord], failures: dict[str, str], nfe: int) -> str:
    """The parent run id; the runs are created once per distinct build."""
    key = build_key(source, download, export, branches)
    if (existing := find_build(settings, key)) is not None:
        return existing
    experiment = use_tracking(settings)
    common_tags = {f"{TAG}repo_id": source.repo_id, f"{TAG}sha": source.sha, f"{TAG}revision": source.revision}
    with mlflow.start_run(experiment_id=experiment, run_name=f"{source.repo_id.split('/')[-1]}@{source.sha[:10]}",
                          tags={**common_tags, f"{TAG}kind": "build", f"{TAG}build_key": key,
                                f"{TAG}failed_branches": json.dumps(failures)}) as parent:
        mlflow.log_params({"repo_id": source.repo_id, "revision": source.revision, "sha": source.sha, "source": source.kind,
                           "nfe": nfe, "branches": ",".join(f"{b.backend}-{b.dtype}" for b in branches),
                           **environment.versions()})
        mlflow.log_metrics({"download_seconds": download.seconds, "export_seconds": export.seconds,
                            "parameters": export.info.get("parameters", 0), "branches_failed": len(failures)})
        with tempfile.TemporaryDirectory() as tmp:
            for m in (download, export):
                (Path(tmp) / f"{m.stage}_manifest.json").write_text(m.model_dump_json(indent=2))
                mlflow.log_artifact(str(Path(tmp) / f"{m.stage}_manifest.json"), "manifests")
        for b in branches:
            spec = b.engine.info["spec"]
            with mlflow.start_run(experiment_id=experiment, run_name=f"{b.backend}-{b.dtype}", nested=True,
                                  parent_run_id=parent.info.run_id,
                                  tags={**common_tags, f"{TAG}kind": "engine", f"{TAG}backend": b.backend,
                                        f"{TAG}dtype": b.dtype, f"{TAG}parity_passed": "true",
                                        f"{TAG}engine_path": b.engine.path}):
                mlflow.log_params({"repo_id": source.repo_id, "sha": source.sha, "backend": b.backend, "dtype": b.dtype,
                                   "nfe": nfe, "device": environment.device, **environment.versions(),
                                   **_flat("flag.", spec["build_flags"])})
                mlflow.log_metrics(_branch_metrics(b))
                mlflow.log_dict(b.engine.model_dump(), "manifests/engine_manifest.json")
                mlflow.log_dict(spec, "engine/engine.json")
                for m, name in ((b.verify, "parity.json"), (b.benchmark, "benchmark.json"), (b.benchmark, "sample.wav"),
                                (b.benchmark, "mel.png"), (b.benchmark, "latency.png")):
                    mlflow.log_artifact(str(m.file(name)), "results")
                register_engine(mlflow.active_run(), {"backend": b.backend, "dtype": b.dtype, "sha": source.sha})
    return parent.info.run_id


def register_engine(run: Run, tags: dict[str, str]) -> str:
    """A new version of the registered engine model for an engine run; returns its version."""
    client = MlflowClient()
    try:
        client.get_registered_model(REGISTERED_MODEL)
    except MlflowException:
        client.create_registered_model(REGISTERED_MODEL, description="IndicF5 inference engines that passed their parity gate")
    return client.create_model_version(REGISTERED_MODEL, source=f"{run.info.artifact_uri}/engine", run_id=run.info.run_id,
                                       tags=tags).version


def _engine_run(client: MlflowClient, ref: str) -> Run:
    try:
        run = client.get_run(ref)
    except MlflowException:
        try:
            run = client.get_run(client.get_model_version_by_alias(REGISTERED_MODEL, ref).run_id)
        except MlflowException:
            raise InputError(f"{ref!r} is neither an engine directory, nor an MLflow run id, nor an alias of the "
                             f"registered model {REGISTERED_MODEL}: give one of those (indicf5 compare sets 'champion')") from None
    if run.data.tags.get(f"{TAG}kind") != "engine":
        raise InputError(f"MLflow run {run.info.run_id} is not an engine run (kind {run.data.tags.get(f'{TAG}kind')}): "
                         "give the run of one engine (backend-dtype) of a build")
    return run


def resolve_engine(settings: Settings, ref: str, backend: str | None = None) -> tuple[Path, str | None]:
    """(engine directory, backend to run it on or None for its own) for an engine run id or an alias.
    With `backend`, it switches to the same build's engine of that backend (the same dtype
    preferred); a build without one runs the engine's files on that backend."""
    use_tracking(settings)
    client = MlflowClient()
    run = _engine_run(client, ref)
    tags = run.data.tags
    if backend is not None and tags[f"{TAG}backend"] != backend:
        siblings = client.search_runs(
            [run.info.experiment_id], f"tags.`{TAG}kind` = 'engine' and tags.`{TAG}sha` = '{tags[f'{TAG}sha']}' "
            f"and tags.`{TAG}backend` = '{backend}' and tags.`mlflow.parentRunId` = '{tags['mlflow.parentRunId']}'")
        if siblings:
            run = sorted(siblings, key=lambda r: r.data.tags[f"{TAG}dtype"] != tags[f"{TAG}dtype"])[0]
            tags = run.data.tags
    path = Path(tags[f"{TAG}engine_path"])
    if not path.is_dir():
        raise InputError(f"engine {path} of MLflow run {run.info.run_id} is not on this machine: "
                         "serve on the machine that built it, or copy the engine directory here and give its path")
    return path, backend if backend != tags[f"{TAG}backend"] else None
