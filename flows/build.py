"""The `build-engine` flow: the runbook as a DAG of cached, retryable stages.

    resolve ─> download ─> export ─┬─> for each (backend, dtype): convert ─> build ─> verify ─> benchmark
             check_environment ────┘                                                              │
                                              register (MLflow parent + nested runs) <────────────┘

The build's MLflow run opens as the flow starts and closes as it ends. A branch that fails (backend
unavailable, parity gate) does not stop the others; the flow ends Failed, naming them, after the
branches that passed are registered. Expected failures end the flow in a Failed state with the
reason as its message, not a traceback.
"""

from __future__ import annotations

import time
from itertools import product
from typing import Any

from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.states import Completed, Failed

from indicf5.benchmark import BenchmarkConfig
from indicf5.config import DType, Schedule
from indicf5.hub import DEFAULT_REPO
from indicf5.mlflow_lock import tracking_lock
from indicf5.parity import ParityConfig
from indicf5.settings import Settings
from indicf5.summary import BranchSummary, BuildSummary
from indicf5.tracking import BranchRecord, run_url
from tasks.benchmark import benchmark
from tasks.build import build_engine
from tasks.common import sweep_stale_writes
from tasks.convert import convert_checkpoint
from tasks.download import download_snapshot
from tasks.environment import check_environment
from tasks.export import export_transformer
from tasks.progress import PROGRESS_KEY
from tasks.register import end_build_run, publish_summary, register, start_build_run
from tasks.resolve import prepare_synthetic, resolve_revision
from tasks.verify import verify_parity


class StageFailed(Exception):
    def __init__(self, stage: str, error: BaseException):
        self.stage, self.error = stage, error
        super().__init__(f"{stage}: {error}")

    def __reduce__(self):  # pickled with a failed state's data
        return StageFailed, (self.stage, self.error)


class BuildFailed(Exception):
    def __init__(self, summary: BuildSummary):
        self.summary = summary
        super().__init__("; ".join(f"{b.backend}-{b.dtype}: {b.error}" for b in summary.failed))

    def __reduce__(self):
        return BuildFailed, (self.summary,)


class Stages:
    """Runs the flow's tasks, noting each final state (Completed / Cached / Failed) for the summary,
    and shows the build's progress in the UI as a progress artifact (stages finished; during parity
    and benchmark stages, the length and repeat they are at: tasks/progress.py)."""

    def __init__(self, total: int):
        self.states: dict[str, str] = {}
        self.total = total
        self.progress = create_progress_artifact(0.0, key=PROGRESS_KEY, description=self.description())

    def description(self) -> str:
        return f"{len(self.states)} of {self.total} stages finished"

    def run(self, task, label: str, *args, **kwargs) -> Any:
        """The task's value; StageFailed, naming the stage, when it fails."""
        state = task(*args, return_state=True, **kwargs)
        self.states[label] = state.name
        update_progress_artifact(self.progress, min(100.0, 100.0 * len(self.states) / self.total), self.description())
        if state.is_failed():
            error = state.result(raise_on_failure=False)
            raise StageFailed(label, error if isinstance(error, BaseException) else RuntimeError(state.message))
        return state.result()


@flow(name="build-engine", log_prints=True)
def build_engine_flow(
    repo_id: str = DEFAULT_REPO,
    revision: str = "main",
    checkpoint: str | None = None,
    synthetic: bool = False,
    backends: list[str] = ["eager"],  # Prefect copies parameters per run
    dtypes: list[DType] = ["fp32", "fp16"],
    nfe: int = 32,
    schedule: Schedule = "uniform",
    bench_lengths: list[int] = [250, 500],
    parity: ParityConfig = ParityConfig(),
    build_flags: dict[str, Any] = {},
) -> BuildSummary:
    """Build IndicF5 inference engines from a HuggingFace revision or a local snapshot.

    Args:
        repo_id: HuggingFace repo of the IndicF5 checkpoint.
        revision: Branch, tag or commit sha; resolved to a commit sha before anything is built.
        checkpoint: A local snapshot directory to build instead of the hub (the runbook's --checkpoint).
        synthetic: Build the embedded synthetic snapshot (no hub access).
        backends: Engine backends to build (eager, compiled, trtllm).
        dtypes: Engine dtypes to build (fp32, fp16, bf16).
        nfe: Flow steps for the benchmark and the sample utterance.
        schedule: Their time grid: uniform, or epss (f5-tts 1.1's, for 5, 6, 7, 10, 12 and 16 steps).
        bench_lengths: Total frames to benchmark at (about 94 frames a second).
        parity: The parity gate: lengths, steps and relative-L2 thresholds per dtype.
        build_flags: Backend build flags, overriding the backend's defaults.
    """
    sweep_stale_writes()
    with tracking_lock(Settings()):  # builds started together find, or create, one parent run
        mlflow_run = start_build_run(started=time.time())
    try:
        summary = _build(
            mlflow_run,
            repo_id,
            revision,
            checkpoint,
            synthetic,
            list(product(backends, dtypes)),
            nfe,
            BenchmarkConfig(lengths=bench_lengths, nfe=nfe, schedule=schedule),
            parity,
            build_flags,
        )
    except StageFailed as e:  # a stage every branch needs: the build ends here, saying which and why
        end_build_run(mlflow_run, None, str(e))
        return Failed(message=str(e), data=e)
    except BaseException as e:
        end_build_run(mlflow_run, None, repr(e))
        raise
    end_build_run(mlflow_run, summary.mlflow_run_id, str(BuildFailed(summary)) if summary.failed else None)
    publish_summary(summary)
    if summary.failed:  # expected failures of some branches: a Failed state naming them, no traceback
        failed = BuildFailed(summary)
        return Failed(message=str(failed), data=failed)
    return Completed(message=f"registered: MLflow run {summary.mlflow_run_id}", data=summary)


def _build(
    mlflow_run: str,
    repo_id: str,
    revision: str,
    checkpoint: str | None,
    synthetic: bool,
    pairs: list[tuple[str, DType]],
    nfe: int,
    bench_config: BenchmarkConfig,
    parity: ParityConfig,
    build_flags: dict[str, Any],
) -> BuildSummary:
    """The stages, in order; a branch that fails is noted in the summary and the others go on."""
    stages = Stages(total=int(synthetic) + 4 + 4 * len(pairs) + 1)
    if synthetic:
        checkpoint = stages.run(prepare_synthetic, "prepare_synthetic")
    source = stages.run(resolve_revision, "resolve_revision", repo_id, revision, checkpoint)
    snapshot = stages.run(download_snapshot, "download_snapshot", source)
    export = stages.run(export_transformer, "export_transformer", snapshot)
    environment = stages.run(check_environment, "check_environment")

    records: list[BranchRecord] = []
    branches: list[BranchSummary] = []
    for backend, dtype in pairs:
        name = f"{backend}-{dtype}"
        if (why := environment.backends.get(backend)) is not None:  # cannot build here: an expected failure, no task
            branches.append(BranchSummary(backend=backend, dtype=dtype, error=f"check_environment: {why}"))
            stages.total -= 4
            continue
        try:
            convert = stages.run(convert_checkpoint, f"{name}/convert_checkpoint", export, backend, dtype)
            engine = stages.run(
                build_engine, f"{name}/build_engine", convert, export, backend, dtype, build_flags, environment
            )
            verify = stages.run(verify_parity, f"{name}/verify_parity", engine, export, parity, environment.device)
            bench = stages.run(benchmark, f"{name}/benchmark", engine, bench_config, environment)
        except StageFailed as e:  # the branch fails; the others go on
            branches.append(BranchSummary(backend=backend, dtype=dtype, error=f"{e.stage.split('/')[-1]}: {e.error}"))
            continue
        records.append(
            BranchRecord(backend=backend, dtype=dtype, convert=convert, engine=engine, verify=verify, benchmark=bench)
        )
        branches.append(
            BranchSummary(
                backend=backend,
                dtype=dtype,
                engine=engine.path,
                parity_rel_l2=verify.info["worst_rel_l2"],
                e2e_p50_ms={n: v["e2e_p50_ms"] for n, v in bench.info["summary"].items()},
            )
        )

    failures = {f"{b.backend}-{b.dtype}": b.error for b in branches if b.error}
    with tracking_lock(Settings()):
        run_id = stages.run(
            register, "register", mlflow_run, source, environment, snapshot, export, records, failures, nfe
        )
    update_progress_artifact(stages.progress, 100.0, stages.description())
    settings = Settings()
    return BuildSummary(
        source=source,
        stages=stages.states,
        branches=branches,
        mlflow_run_id=run_id,
        tracking_uri=settings.tracking_uri,
        mlflow_run_url=run_url(settings, run_id),
    )
