"""The build summary a person reads: in the CLI, and as the Prefect markdown artifact."""

from __future__ import annotations

from pydantic import BaseModel

from indicf5.hub import SourceRef


class BranchSummary(BaseModel):
    backend: str
    dtype: str
    engine: str | None = None  # engine directory, when built
    parity_rel_l2: float | None = None
    e2e_p50_ms: dict[str, float] = {}  # total frames -> ms
    error: str | None = None  # why the branch failed, when it did


class BuildSummary(BaseModel):
    source: SourceRef
    stages: dict[str, str]  # task -> final Prefect state name ("Completed", "Cached", "Failed")
    branches: list[BranchSummary]
    mlflow_run_id: str | None = None
    tracking_uri: str
    mlflow_run_url: str | None = None  # the run's page, when MLflow is a server

    @property
    def failed(self) -> list[BranchSummary]:
        return [b for b in self.branches if b.error]

    def markdown(self) -> str:
        s = self.source
        run = f"[`{self.mlflow_run_id}`]({self.mlflow_run_url})" if self.mlflow_run_url else f"`{self.mlflow_run_id}`"
        lines = [
            f"# IndicF5 build: `{s.repo_id}` @ `{s.sha[:12]}`",
            "",
            f"MLflow run: {run} ({self.tracking_uri})",
            "",
            "| backend | dtype | parity relL2 | end-to-end p50 (ms) by frames | engine / error |",
            "| --- | --- | --- | --- | --- |",
        ]
        for b in self.branches:
            lat = ", ".join(f"{n}: {ms:.1f}" for n, ms in b.e2e_p50_ms.items()) or "-"
            rel = f"{b.parity_rel_l2:.2e}" if b.parity_rel_l2 is not None else "-"
            lines.append(
                f"| {b.backend} | {b.dtype} | {rel} | {lat} | "
                f"{('FAILED: ' + b.error) if b.error else f'`{b.engine}`'} |"
            )
        lines += ["", "| stage | state |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in self.stages.items()]
        return "\n".join(lines)
