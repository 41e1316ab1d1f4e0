"""The `compare-engines` flow: one revision's engines side by side, and the champion alias."""

from __future__ import annotations

from prefect import flow, get_run_logger

from indicf5.compare import Comparison
from tasks.compare import compare_engines, record_comparison


@flow(name="compare-engines")
def compare_engines_flow(repo_id: str | None = None, revision: str | None = None) -> Comparison:
    """Compare the engines built from one revision and crown the fastest that passed parity.

    Args:
        repo_id: Repo whose newest build to compare when no revision is given (none: any source's).
        revision: Commit sha of the builds to compare.
    """
    comparison = record_comparison(compare_engines(repo_id, revision))
    get_run_logger().info(
        "champion %s (model version %s); the table is the artifact engine-comparison, MLflow run %s",
        comparison.champion,
        comparison.champion_version,
        comparison.run_id,
    )
    return comparison
