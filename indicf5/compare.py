"""Engines of one revision side by side, from MLflow: backend x dtype, latency p50/p95 per length,
speedup over the fp32 eager reference, parity error, engine bytes, build time. The fastest engine
(end-to-end p50 at the longest length) among those that passed parity becomes the `champion`
alias of the registered model, which `indicf5 serve --engine champion` loads.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from indicf5 import plots
from indicf5.errors import InputError
from indicf5.settings import Settings
from indicf5.tracking import REGISTERED_MODEL, TAG, use_tracking

CHAMPION = "champion"
_E2E = re.compile(r"^end_to_end_(p50|p95)_ms_(\d+)$")


class EngineResult(BaseModel):
    backend: str
    dtype: str
    run_id: str
    parity_rel_l2: float
    engine_bytes: int
    build_seconds: float
    p50_ms: dict[int, float]  # total frames -> end-to-end latency
    p95_ms: dict[int, float]
    speedup: dict[int, float] = {}  # over the fp32 eager reference of the same revision, per length

    @property
    def label(self) -> str:
        return f"{self.backend}-{self.dtype}"


class Comparison(BaseModel):
    repo_id: str
    sha: str
    results: list[EngineResult]
    champion: str | None = None  # label of the fastest engine that passed parity
    champion_version: str | None = None  # its version of the registered model
    run_id: str | None = None  # the MLflow run holding the comparison

    def rows(self) -> list[dict]:
        """The table, one dict per engine (the Prefect table artifact)."""
        lengths = sorted({n for r in self.results for n in r.p50_ms})
        return [{"engine": r.label, **{f"p50 ms @{n}": round(r.p50_ms[n], 1) for n in lengths if n in r.p50_ms},
                 **{f"p95 ms @{n}": round(r.p95_ms[n], 1) for n in lengths if n in r.p95_ms},
                 **{f"speedup @{n}": round(r.speedup[n], 2) for n in lengths if n in r.speedup},
                 "parity relL2": f"{r.parity_rel_l2:.2e}", "engine MB": round(r.engine_bytes / 2**20, 1),
                 "build s": round(r.build_seconds, 1), "champion": r.label == self.champion} for r in self.results]

    def markdown(self) -> str:
        rows = self.rows()
        head = list(rows[0]) if rows else ["engine"]
        lines = [f"# Engines of `{self.repo_id}` @ `{self.sha[:12]}`", "",
                 f"Champion: **{self.champion or 'none'}**" + (f" (model version {self.champion_version})" if self.champion_version else ""),
                 "", "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
        lines += ["| " + " | ".join(str(row.get(h, "-")) for h in head) + " |" for row in rows]
        return "\n".join(lines)


def _result(run: Run) -> EngineResult:
    m = run.data.metrics
    p50, p95 = {}, {}
    for name, value in m.items():
        if match := _E2E.match(name):
            (p50 if match[1] == "p50" else p95)[int(match[2])] = value
    tags = run.data.tags
    return EngineResult(backend=tags[f"{TAG}backend"], dtype=tags[f"{TAG}dtype"], run_id=run.info.run_id,
                        parity_rel_l2=m.get("parity_worst_rel_l2", float("nan")), engine_bytes=int(m.get("engine_bytes", 0)),
                        build_seconds=m.get("build_seconds", 0.0), p50_ms=p50, p95_ms=p95)


def newest_sha(settings: Settings, repo_id: str | None = None) -> str:
    """The sha of the newest registered build (of `repo_id`, or of any source)."""
    experiment = use_tracking(settings)
    query = f"tags.`{TAG}kind` = 'build'" + (f" and tags.`{TAG}repo_id` = '{repo_id}'" if repo_id else "")
    runs = MlflowClient().search_runs([experiment], query, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise InputError(f"no build{' of ' + repo_id if repo_id else ''} is registered in MLflow ({settings.tracking_uri}): "
                         "run indicf5 build first")
    return runs[0].data.tags[f"{TAG}sha"]


def compare_engines(settings: Settings, sha: str) -> Comparison:
    """The newest engine run of each backend x dtype built from `sha`."""
    experiment = use_tracking(settings)
    runs = MlflowClient().search_runs([experiment], f"tags.`{TAG}kind` = 'engine' and tags.`{TAG}sha` = '{sha}'",
                                      order_by=["attributes.start_time DESC"])
    if not runs:
        raise InputError(f"no engine built from {sha} is registered in MLflow ({settings.tracking_uri})")
    newest: dict[str, EngineResult] = {}
    for run in runs:
        result = _result(run)
        newest.setdefault(result.label, result)
    results = sorted(newest.values(), key=lambda r: (r.backend != "eager", r.backend, r.dtype))
    if (reference := newest.get("eager-fp32")) is not None:
        for r in results:
            r.speedup = {n: reference.p50_ms[n] / ms for n, ms in r.p50_ms.items() if n in reference.p50_ms and ms > 0}
    longest = max((n for r in results for n in r.p50_ms), default=None)
    timed = [r for r in results if longest in r.p50_ms]
    champion = min(timed, key=lambda r: r.p50_ms[longest]).label if timed else None  # registered engines passed parity
    return Comparison(repo_id=runs[0].data.tags[f"{TAG}repo_id"], sha=sha, results=results, champion=champion)


def record_comparison(settings: Settings, comparison: Comparison) -> Comparison:
    """An MLflow run with the table (markdown, JSON) and the chart; the champion alias on its model version."""
    experiment = use_tracking(settings)
    client = MlflowClient()
    champion = next((r for r in comparison.results if r.label == comparison.champion), None)
    version = None
    if champion is not None:
        versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}' and run_id = '{champion.run_id}'")
        if versions:
            version = str(max(versions, key=lambda v: int(v.version)).version)
            client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, version)
    comparison = comparison.model_copy(update={"champion_version": version})
    with mlflow.start_run(experiment_id=experiment, run_name=f"compare@{comparison.sha[:10]}",
                          tags={f"{TAG}kind": "comparison", f"{TAG}sha": comparison.sha, f"{TAG}repo_id": comparison.repo_id,
                                f"{TAG}champion": comparison.champion or ""}) as run:
        for r in comparison.results:
            for n, speedup in r.speedup.items():
                mlflow.log_metric(f"speedup_{r.label}_{n}", speedup)
        with tempfile.TemporaryDirectory() as tmp:
            chart = Path(tmp) / "comparison.png"
            plots.comparison_chart({r.label: r.p50_ms for r in comparison.results}, chart,
                                   f"{comparison.repo_id} @ {comparison.sha[:10]}: end-to-end p50")
            mlflow.log_artifact(str(chart))
        comparison = comparison.model_copy(update={"run_id": run.info.run_id})
        mlflow.log_text(comparison.markdown(), "comparison.md")
        mlflow.log_dict(comparison.model_dump(), "comparison.json")
    return comparison
