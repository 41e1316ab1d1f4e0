"""Engines of one revision side by side, from MLflow: backend x dtype, latency p50/p95 per length,
speedup over the fp32 eager reference, parity error, engine bytes, build time. The fastest engine
(end-to-end p50 at the longest length) among those that passed parity becomes the `champion`
alias of the registered model, which `indicf5 serve --engine champion` loads.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from indicf5 import plots
from indicf5.errors import InputError
from indicf5.settings import Settings
from indicf5.tracking import REGISTERED, REGISTERED_MODEL, TAG, use_tracking

CHAMPION = "champion"


class EngineResult(BaseModel):
    backend: str
    dtype: str
    run_id: str
    model_version: str | None = None  # its version of the registered model
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
        return [
            {
                "engine": r.label,
                **{f"p50 ms @{n}": round(r.p50_ms[n], 1) for n in lengths if n in r.p50_ms},
                **{f"p95 ms @{n}": round(r.p95_ms[n], 1) for n in lengths if n in r.p95_ms},
                **{f"speedup @{n}": round(r.speedup[n], 2) for n in lengths if n in r.speedup},
                "parity relL2": f"{r.parity_rel_l2:.2e}",
                "engine MB": round(r.engine_bytes / 2**20, 1),
                "build s": round(r.build_seconds, 1),
                "champion": r.label == self.champion,
            }
            for r in self.results
        ]

    def chart_series(self) -> list[plots.EngineLatency]:
        return [
            plots.EngineLatency(r.label, r.p50_ms, r.p95_ms, r.speedup, r.parity_rel_l2, r.label == self.champion)
            for r in self.results
        ]

    def markdown(self) -> str:
        rows = self.rows()
        head = list(rows[0]) if rows else ["engine"]
        lines = [
            f"# Engines of `{self.repo_id}` @ `{self.sha[:12]}`",
            "",
            f"Champion: **{self.champion or 'none'}**"
            + (f" (model version {self.champion_version})" if self.champion_version else ""),
            "",
            "| " + " | ".join(head) + " |",
            "| " + " | ".join("---" for _ in head) + " |",
        ]
        lines += ["| " + " | ".join(str(row.get(h, "-")) for h in head) + " |" for row in rows]
        return "\n".join(lines)


def _by_length(client: MlflowClient, run_id: str, metric: str) -> dict[int, float]:
    """A metric logged per length (the length as its step): length -> value."""
    return {m.step: m.value for m in client.get_metric_history(run_id, metric)}


def _result(client: MlflowClient, run: Run) -> EngineResult:
    m, tags = run.data.metrics, run.data.tags
    return EngineResult(
        backend=tags[f"{TAG}backend"],
        dtype=tags[f"{TAG}dtype"],
        run_id=run.info.run_id,
        model_version=tags.get(f"{TAG}model_version"),
        parity_rel_l2=m.get("parity_worst_rel_l2", float("nan")),
        engine_bytes=int(m.get("engine_bytes", 0)),
        build_seconds=m.get("build_seconds", 0.0),
        p50_ms=_by_length(client, run.info.run_id, "end_to_end_p50_ms"),
        p95_ms=_by_length(client, run.info.run_id, "end_to_end_p95_ms"),
    )


def newest_sha(settings: Settings, repo_id: str | None = None) -> str:
    """The sha of the newest registered build (of `repo_id`, or of any source)."""
    experiment = use_tracking(settings)
    query = f"tags.`{TAG}kind` = 'build' and {REGISTERED}"
    if repo_id:
        query += f" and tags.`{TAG}repo_id` = '{repo_id}'"
    runs = MlflowClient().search_runs([experiment], query, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise InputError(
            f"no build{' of ' + repo_id if repo_id else ''} is registered in MLflow ({settings.tracking_uri}): "
            "run indicf5 build first"
        )
    return runs[0].data.tags[f"{TAG}sha"]


def compare_engines(settings: Settings, sha: str) -> Comparison:
    """The newest engine run of each backend x dtype built from `sha`."""
    experiment = use_tracking(settings)
    client = MlflowClient()
    runs = client.search_runs(
        [experiment],
        f"tags.`{TAG}kind` = 'engine' and tags.`{TAG}sha` = '{sha}'",
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        raise InputError(f"no engine built from {sha} is registered in MLflow ({settings.tracking_uri})")
    newest: dict[str, EngineResult] = {}
    for run in runs:
        label = f"{run.data.tags[f'{TAG}backend']}-{run.data.tags[f'{TAG}dtype']}"
        if label not in newest:
            newest[label] = _result(client, run)
    results = sorted(newest.values(), key=lambda r: (r.backend != "eager", r.backend, r.dtype))
    if (reference := newest.get("eager-fp32")) is not None:
        for r in results:
            r.speedup = {n: reference.p50_ms[n] / ms for n, ms in r.p50_ms.items() if n in reference.p50_ms and ms > 0}
    longest = max((n for r in results for n in r.p50_ms), default=None)
    timed = [r for r in results if longest in r.p50_ms]
    champion = min(timed, key=lambda r: r.p50_ms[longest]).label if timed else None  # registered engines passed parity
    return Comparison(repo_id=runs[0].data.tags[f"{TAG}repo_id"], sha=sha, results=results, champion=champion)


def record_comparison(settings: Settings, comparison: Comparison) -> Comparison:
    """An MLflow run with the table (MLflow's table view, markdown, JSON) and the chart; the champion
    alias on its model version."""
    experiment = use_tracking(settings)
    client = MlflowClient()
    champion = next((r for r in comparison.results if r.label == comparison.champion), None)
    version = champion.model_version if champion is not None else None
    if version is not None:
        client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, version)
    comparison = comparison.model_copy(update={"champion_version": version})
    with mlflow.start_run(
        experiment_id=experiment,
        run_name=f"compare@{comparison.sha[:10]}",
        tags={
            f"{TAG}kind": "comparison",
            f"{TAG}sha": comparison.sha,
            f"{TAG}repo_id": comparison.repo_id,
            f"{TAG}champion": comparison.champion or "",
        },
    ) as run:
        for r in comparison.results:
            for n, speedup in r.speedup.items():
                mlflow.log_metric(f"speedup_{r.label}", speedup, step=n)
        mlflow.log_table(pd.DataFrame(comparison.rows()), "comparison_table.json")
        with tempfile.TemporaryDirectory() as tmp:
            chart = Path(tmp) / "comparison.png"
            plots.comparison_chart(
                comparison.chart_series(),
                chart,
                f"{comparison.repo_id.split('/')[-1]} @ {comparison.sha[:10]}: end-to-end latency",
            )
            mlflow.log_artifact(str(chart))
        comparison = comparison.model_copy(update={"run_id": run.info.run_id})
        mlflow.log_text(comparison.markdown(), "comparison.md")
        mlflow.log_dict(comparison.model_dump(), "comparison.json")
    return comparison
