from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from indicf5 import compare
from indicf5.settings import Settings


@task(name="compare_engines")
def compare_engines(repo_id: str | None, sha: str | None) -> compare.Comparison:
    """Backend x dtype of one revision (default: the newest build's, of `repo_id` when given), from MLflow."""
    settings = Settings()
    return compare.compare_engines(settings, sha or compare.newest_sha(settings, repo_id))


@task(name="record_comparison")
def record_comparison(comparison: compare.Comparison) -> compare.Comparison:
    """The comparison in MLflow (table, chart) and the champion alias; the table as Prefect artifacts."""
    recorded = compare.record_comparison(Settings(), comparison)
    create_table_artifact(
        recorded.rows(),
        key="engine-comparison",
        description=f"{recorded.repo_id}@{recorded.sha[:12]}: champion {recorded.champion}",
    )
    create_markdown_artifact(
        recorded.markdown() + f"\n\nMLflow run: `{recorded.run_id}` (chart: comparison.png)",
        key="engine-comparison-summary",
    )
    return recorded
