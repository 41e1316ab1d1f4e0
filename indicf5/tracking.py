"""MLflow records of builds: a run per build, a nested run and a registered model per engine.

A build's run opens when its flow starts and closes when it ends (FAILED when the build fails,
KILLED when the next build finds its process gone), linked to its Prefect flow run and the git
commit of the code. Once registered it carries the tag
``indicf5.build_key`` (a hash of every artifact the build used), which makes registering
idempotent: a rerun of an unchanged build finds its run instead of adding one. Runs are tagged
with the repo and the resolved sha so watchers and comparisons can query them. Every engine that
passed its parity gate is logged as an MLflow model (``indicf5.mlflow_model``) and is a version of
the registered model ``indicf5-engine``, one version per engine content. Servers load engines by
such a version's alias (``champion``), by engine run id, by ``models:/`` or ``runs:/`` URI, or by
path, downloading them from MLflow's artifact store when they are not on this machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from indicf5.benchmark import BenchmarkReport
from indicf5.environment import EnvironmentReport
from indicf5.errors import InputError
from indicf5.hub import SourceRef
from indicf5.mlflow_model import ENGINE_ARTIFACT, PACKAGE, engine_dir_of, log_engine_model
from indicf5.parity import ParityReport
from indicf5.settings import Settings
from indicf5.store import Manifest, publish_dir, stable_hash, temp_dir_beside, writer, writer_gone

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


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3's UI: model training, not GenAI
SOURCE_NAME = "flows/build.py:build_engine_flow"
REGISTERED = f"tags.`{TAG}build_key` LIKE '%'"  # a build run that registered its engines (not a running or failed one)


def _local_store(tracking_uri: str) -> bool:
    """A tracking URI MLflow keeps on this machine (sqlite, a file store), not a server."""
    return urlparse(tracking_uri).scheme in ("sqlite", "file", "")


def use_tracking(settings: Settings) -> str:
    """Points MLflow at the configured server (or the workspace's sqlite) and returns the experiment id.
    On a local store the experiment's artifacts live in the workspace (not ./mlruns of the current
    directory); a server chooses its own artifact root."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(settings.mlflow_experiment)
    if experiment is None:
        location = (settings.store_root / "mlartifacts").as_uri() if _local_store(settings.tracking_uri) else None
        return client.create_experiment(settings.mlflow_experiment, artifact_location=location, tags=EXPERIMENT_KIND)
    for key, value in EXPERIMENT_KIND.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


# --- the build's run: opened when the flow starts, closed when it ends


def git_commit() -> str | None:
    """The commit of the code that runs the build, when it runs from a git checkout."""
    from mlflow.utils.git_utils import get_git_commit

    return get_git_commit(str(Path(__file__).resolve().parent))


def start_build(settings: Settings, started: float, flow_run_id: str | None, flow_run_url: str | None) -> str:
    """A RUNNING MLflow run for a build that started at `started` (epoch seconds), linked to its
    Prefect flow run and tagged with this process (`close_abandoned_builds`); its id."""
    experiment = use_tracking(settings)
    tags = {"mlflow.source.name": SOURCE_NAME, "mlflow.source.type": "JOB", f"{TAG}kind": "build"}
    tags[f"{TAG}writer"] = writer()
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    if flow_run_id:
        tags[f"{TAG}prefect_flow_run_id"] = flow_run_id
    if flow_run_url:
        tags[f"{TAG}prefect_flow_run_url"] = flow_run_url
        tags["mlflow.note.content"] = f"Prefect flow run: [{flow_run_id}]({flow_run_url})"
    run = MlflowClient().create_run(experiment, start_time=int(started * 1000), tags=tags, run_name="build")
    return run.info.run_id


def end_build(settings: Settings, run_id: str, registered: str | None, error: str | None) -> None:
    """Closes the build's run: FINISHED, or FAILED with the reason. A rebuild of a build MLflow
    already holds (every stage cached) leaves that build's run as the record and drops its own."""
    use_tracking(settings)
    client = MlflowClient()
    if registered is not None and registered != run_id:
        client.delete_run(run_id)
        return
    if error:
        client.set_tag(run_id, f"{TAG}error", error[:5000])
    client.set_terminated(run_id, "FAILED" if error else "FINISHED")


def close_abandoned_builds(settings: Settings) -> list[str]:
    """Closes as KILLED, with the reason in their error tag, the build runs left RUNNING by a
    process of this host that has ended (a killed build cannot close its own run); builds still
    running and other hosts' are left alone. The ids of the runs closed."""
    experiment = use_tracking(settings)
    client, closed = MlflowClient(), []
    running = client.search_runs([experiment], f"attributes.status = 'RUNNING' and tags.`{TAG}kind` = 'build'")
    for run in running:
        recorded = run.data.tags.get(f"{TAG}writer", "")
        if writer_gone(recorded):
            client.set_tag(
                run.info.run_id, f"{TAG}error", f"the build's process ({recorded}) ended without closing its run"
            )
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


def run_url(settings: Settings, run_id: str) -> str | None:
    """The run's page in the MLflow UI, when MLflow is a server."""
    if _local_store(settings.tracking_uri):
        return None
    run = MlflowClient(settings.tracking_uri).get_run(run_id)
    return f"{settings.tracking_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def build_key(source: SourceRef, download: Manifest, export: Manifest, branches: list[BranchRecord]) -> str:
    return stable_hash(
        {
            "source": source.sha,
            "download": download.key,
            "export": export.key,
            "branches": sorted((b.backend, b.dtype, b.engine.key, b.verify.key, b.benchmark.key) for b in branches),
        }
    )[:32]


def find_build(settings: Settings, key: str) -> str | None:
    experiment = use_tracking(settings)
    runs = MlflowClient().search_runs([experiment], f"tags.`{TAG}build_key` = '{key}'", max_results=1)
    return runs[0].info.run_id if runs else None


def find_build_of(settings: Settings, repo_id: str, sha: str) -> str | None:
    """The newest MLflow parent run of a registered build of `repo_id` at `sha`, if any."""
    experiment = use_tracking(settings)
    runs = MlflowClient().search_runs(
        [experiment],
        f"tags.`{TAG}kind` = 'build' and tags.`{TAG}repo_id` = '{repo_id}' "
        f"and tags.`{TAG}sha` = '{sha}' and {REGISTERED}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


# --- what a build registers: its facts on its run, a nested run and a model per engine


def _flat(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in values.items()}


def _branch_metrics(b: BranchRecord) -> list[Metric]:
    """Per-engine metrics; those measured per length (parity, latency, RTF) have the length as step."""
    parity = ParityReport.model_validate_json(b.verify.file("parity.json").read_text())
    bench = BenchmarkReport.model_validate_json(b.benchmark.file("benchmark.json").read_text())
    now = int(time.time() * 1000)
    flat = {
        "convert_seconds": b.convert.seconds,
        "build_seconds": b.engine.seconds,
        "verify_seconds": b.verify.seconds,
        "benchmark_seconds": b.benchmark.seconds,
        "engine_bytes": b.engine.bytes,
        "parity_worst_rel_l2": parity.worst_rel_l2,
        "peak_memory_mb": bench.peak_memory_mb,
    }
    metrics = [Metric(k, float(v), now, 0) for k, v in flat.items()]
    for n, outputs in parity.errors.items():
        for name, e in outputs.items():
            metrics += [
                Metric(f"parity_{name}_rel_l2", e.rel_l2, now, int(n)),
                Metric(f"parity_{name}_max_abs", e.max_abs, now, int(n)),
            ]
    for r in bench.results:
        for part in ("step", "loop", "vocoder", "end_to_end"):
            timing = getattr(r, part)
            metrics += [
                Metric(f"{part}_p50_ms", timing.p50_ms, now, r.frames),
                Metric(f"{part}_p95_ms", timing.p95_ms, now, r.frames),
            ]
        metrics.append(Metric("rtf", r.rtf, now, r.frames))
    return metrics


def register_build(
    settings: Settings,
    run_id: str,
    source: SourceRef,
    environment: EnvironmentReport,
    download: Manifest,
    export: Manifest,
    branches: list[BranchRecord],
    failures: dict[str, str],
    nfe: int,
) -> str:
    """The build's facts on its run `run_id` and a nested run per engine; returns the run that records
    the build: `run_id`, or the run of the same build (same key) when MLflow already holds one."""
    key = build_key(source, download, export, branches)
    if (existing := find_build(settings, key)) is not None:
        return existing
    experiment = use_tracking(settings)
    client = MlflowClient()
    common_tags = {f"{TAG}repo_id": source.repo_id, f"{TAG}sha": source.sha, f"{TAG}revision": source.revision}
    client.update_run(run_id, name=f"{source.repo_id.split('/')[-1]}@{source.sha[:10]}")
    for k, v in {**common_tags, f"{TAG}failed_branches": json.dumps(failures)}.items():
        client.set_tag(run_id, k, v)
    now = int(time.time() * 1000)
    params = {
        "repo_id": source.repo_id,
        "revision": source.revision,
        "sha": source.sha,
        "source": source.kind,
        "nfe": nfe,
        "branches": ",".join(f"{b.backend}-{b.dtype}" for b in branches),
        **environment.versions(),
    }
    metrics = {
        "download_seconds": download.seconds,
        "export_seconds": export.seconds,
        "parameters": export.info.get("parameters", 0),
        "branches_failed": len(failures),
    }
    client.log_batch(
        run_id,
        params=[Param(k, str(v)) for k, v in params.items()],
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
    )
    for m in (download, export):
        client.log_dict(run_id, m.model_dump(), f"manifests/{m.stage}_manifest.json")
    for b in branches:
        spec = b.engine.info["spec"]
        tags = {
            **common_tags,
            f"{TAG}kind": "engine",
            f"{TAG}backend": b.backend,
            f"{TAG}dtype": b.dtype,
            f"{TAG}parity_passed": "true",
            f"{TAG}engine_path": b.engine.path,
            f"{TAG}engine_content": engine_content(b.engine),
            "mlflow.source.name": SOURCE_NAME,
        }
        with mlflow.start_run(
            experiment_id=experiment, run_name=f"{b.backend}-{b.dtype}", nested=True, parent_run_id=run_id, tags=tags
        ) as engine_run:
            mlflow.log_params(
                {
                    "repo_id": source.repo_id,
                    "sha": source.sha,
                    "backend": b.backend,
                    "dtype": b.dtype,
                    "nfe": nfe,
                    "device": environment.device,
                    **environment.versions(),
                    **_flat("flag.", spec["build_flags"]),
                }
            )
            client.log_batch(engine_run.info.run_id, metrics=_branch_metrics(b))
            mlflow.log_dict(b.engine.model_dump(), "manifests/engine_manifest.json")
            mlflow.log_dict(spec, "engine/engine.json")
            for m, name in (
                (b.verify, "parity.json"),
                (b.benchmark, "benchmark.json"),
                (b.benchmark, "sample.wav"),
                (b.benchmark, "mel.png"),
                (b.benchmark, "latency.png"),
            ):
                mlflow.log_artifact(str(m.file(name)), "results")
            register_engine(
                engine_run.info.run_id, b.engine, {"backend": b.backend, "dtype": b.dtype, "sha": source.sha}
            )
    client.set_tag(run_id, f"{TAG}build_key", key)  # last: the build is registered once its engines are
    return run_id


def engine_content(engine: Manifest) -> str:
    """A hash of the engine's files: identical engines of different builds share it."""
    return stable_hash({name: f.sha256 for name, f in sorted(engine.outputs.items())})[:32]


def _registered_model(client: MlflowClient) -> None:
    try:
        client.get_registered_model(REGISTERED_MODEL)
    except MlflowException:
        client.create_registered_model(
            REGISTERED_MODEL, description="IndicF5 inference engines that passed their parity gate"
        )


def register_engine(run_id: str, engine: Manifest, tags: dict[str, str]) -> str:
    """The engine as an MLflow model (logged in the active engine run) and its version of the
    registered model, once per engine content: an identical engine reuses its version. Returns it."""
    client = MlflowClient()
    _registered_model(client)
    content = engine_content(engine)
    same = client.search_model_versions(f"name = '{REGISTERED_MODEL}' and tags.`{TAG}engine_content` = '{content}'")
    if same:
        version = min(same, key=lambda v: int(v.version))
    else:
        model = log_engine_model(Path(engine.path), engine.info["spec"]["backend"], package_version())
        version = client.create_model_version(
            REGISTERED_MODEL,
            source=model.model_uri,
            run_id=run_id,
            model_id=model.model_id,
            tags={**tags, f"{TAG}engine_content": content},
        )
    client.set_tag(run_id, f"{TAG}model_version", str(version.version))
    client.set_tag(run_id, f"{TAG}model_uri", version.source)
    return str(version.version)


def package_version() -> str:
    from importlib.metadata import version

    return version(PACKAGE)


def _engine_run(client: MlflowClient, ref: str) -> Run:
    try:
        run = client.get_run(ref)
    except MlflowException:
        try:
            run = client.get_run(client.get_model_version_by_alias(REGISTERED_MODEL, ref).run_id)
        except MlflowException:
            raise InputError(
                f"{ref!r} is neither an engine directory, nor an MLflow engine run id, nor an alias of "
                f"the registered model {REGISTERED_MODEL}, nor a models:/ or runs:/ URI: give one of "
                "those (indicf5 compare sets 'champion')"
            ) from None
    if run.data.tags.get(f"{TAG}kind") != "engine":
        raise InputError(
            f"MLflow run {run.info.run_id} is not an engine run (kind {run.data.tags.get(f'{TAG}kind')}): "
            "give the run of one engine (backend-dtype) of a build"
        )
    return run


def resolve_engine(settings: Settings, ref: str, backend: str | None = None) -> tuple[Path, str | None]:
    """(engine directory, backend to run it on or None for its own) for an engine run id, an alias, or
    a ``models:/`` / ``runs:/`` URI. With `backend`, a run id or alias switches to the same build's
    engine of that backend (the same dtype preferred); a build without one runs the engine's files on
    that backend. An engine not on this machine is downloaded from MLflow into the workspace."""
    use_tracking(settings)
    client = MlflowClient()
    if ref.startswith(("models:/", "runs:/")):
        return fetch_engine(settings, ref), backend
    run = _engine_run(client, ref)
    tags = run.data.tags
    if backend is not None and tags[f"{TAG}backend"] != backend:
        siblings = client.search_runs(
            [run.info.experiment_id],
            f"tags.`{TAG}kind` = 'engine' and tags.`{TAG}sha` = '{tags[f'{TAG}sha']}' "
            f"and tags.`{TAG}backend` = '{backend}' and tags.`mlflow.parentRunId` = '{tags['mlflow.parentRunId']}'",
        )
        if siblings:
            run = sorted(siblings, key=lambda r: r.data.tags[f"{TAG}dtype"] != tags[f"{TAG}dtype"])[0]
            tags = run.data.tags
    path = Path(tags[f"{TAG}engine_path"])
    if not path.is_dir():
        path = fetch_engine(settings, tags[f"{TAG}model_uri"])
    return path, backend if backend != tags[f"{TAG}backend"] else None


def _immutable_uri(client: MlflowClient, uri: str) -> str:
    """`models:/name@alias` and `models:/name/version` as the model they point at now."""
    name, sep, which = uri.removeprefix("models:/").partition("@")
    if uri.startswith("models:/") and sep:
        return client.get_model_version_by_alias(name, which).source
    name, sep, which = uri.removeprefix("models:/").partition("/")
    if uri.startswith("models:/") and sep:
        return client.get_model_version(name, which).source
    return uri


def fetch_engine(settings: Settings, uri: str) -> Path:
    """The engine of an MLflow model URI, downloaded once into $INDICF5_HOME/models (whole or not at all)."""
    client = MlflowClient()
    try:
        model_uri = _immutable_uri(client, uri)
        cache = settings.store_root / "models" / stable_hash(model_uri)[:32]
        if (cache / "engine.json").is_file():
            return cache
        with temp_dir_beside(cache) as tmp:
            model = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp)))
            if (engine := engine_dir_of(model)) is None:
                raise InputError(
                    f"{uri} is not an engine model (no pyfunc artifact '{ENGINE_ARTIFACT}' with an "
                    f"engine.json): give a version of {REGISTERED_MODEL} or an engine run's model"
                )
            publish_dir(engine, cache)
    except MlflowException as e:
        raise InputError(f"cannot fetch the engine {uri} from MLflow ({settings.tracking_uri}): {e.message}") from None
    return cache
