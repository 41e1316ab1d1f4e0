"""Operated as the user will: real `prefect server` and `mlflow server` on loopback, the
deployments of prefect.yaml on a process worker, builds triggered through the Prefect API from
the local hub, scheduled-style watching of new revisions, the comparison with its champion alias,
and the Prefect UI as headless Chromium renders it."""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from hub_server import snapshot_files
from stack import REPO, Stack, start_stack

BUILD = {"backends": ["eager"], "dtypes": ["fp32", "fp16"], "nfe": 4, "bench_lengths": [64, 128],
         "parity": {"lengths": [64], "nfe": 4}}
SCREENSHOTS = REPO / "test-output"


@pytest.fixture(scope="module")
def stack(hub, tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    stack = start_stack(root, {"HF_HUB_CACHE": str(root / "hf-cache")})
    yield stack
    stack.stop()


def api(stack: Stack):
    return temporary_settings(updates={PREFECT_API_URL: stack.prefect_api})


def wait_final(stack: Stack, flow_run_id, timeout_s: float = 600):
    deadline = time.monotonic() + timeout_s
    with api(stack), get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            time.sleep(1)
    raise TimeoutError(f"flow run {flow_run_id} did not finish; worker log:\n{(stack.root / 'worker.log').read_text()[-4000:]}")


def runs_tagged(stack: Stack, tag: str) -> list:
    with api(stack), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))


def mlflow_runs(stack: Stack, query: str) -> list[dict]:
    experiment = httpx.get(f"{stack.mlflow_url}/api/2.0/mlflow/experiments/get-by-name",
                           params={"experiment_name": "indicf5-engines"}).json()["experiment"]["experiment_id"]
    body = {"experiment_ids": [experiment], "filter": query, "max_results": 100}
    return httpx.post(f"{stack.mlflow_url}/api/2.0/mlflow/runs/search", json=body).json().get("runs", [])


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.fixture(scope="module")
def built(stack, hub):
    """build-engine triggered through the Prefect API, run by the worker, for the hub's main."""
    with api(stack):
        flow_run = run_deployment("build-engine/build-engine", timeout=0,
                                  parameters={"repo_id": "ai4bharat/IndicF5", "revision": "main", **BUILD})
    run = wait_final(stack, flow_run.id)
    assert run.state.is_completed(), (run.state, (stack.root / "worker.log").read_text()[-4000:])
    return run, hub.repos["ai4bharat/IndicF5"].refs["main"]


def test_a_deployed_build_completes_and_lands_in_mlflow(stack, built):
    run, sha = built
    runs = mlflow_runs(stack, f"tags.`indicf5.sha` = '{sha}'")
    kinds = sorted(tags(r)["indicf5.kind"] for r in runs)
    assert kinds == ["build", "engine", "engine"]
    parent = next(r for r in runs if tags(r)["indicf5.kind"] == "build")
    assert run.state.message == f"registered: MLflow run {parent['info']['run_id']}"


def test_a_new_revision_triggers_exactly_one_build_and_then_none(stack, hub, snapshot, built):
    repo = hub.repos["ai4bharat/IndicF5"]
    files = snapshot_files(snapshot)
    files["README.md"] = b"a new revision\n"
    new_sha = repo.add_commit(files)
    watch = {"build_parameters": BUILD}
    def trigger_watch(_):
        with api(stack):  # settings are per thread
            return run_deployment("watch-revisions/watch-revisions", parameters=watch, timeout=0)

    with ThreadPoolExecutor(2) as pool:  # two watchers see the same new sha at once
        watchers = list(pool.map(trigger_watch, range(2)))
    finished = [wait_final(stack, w.id) for w in watchers]
    assert all(w.state.is_completed() for w in finished), [w.state for w in finished]
    builds = runs_tagged(stack, f"sha:{new_sha}")
    assert len(builds) == 1 and builds[0].parameters["revision"] == new_sha
    assert wait_final(stack, builds[0].id).state.is_completed()

    with api(stack):
        again = run_deployment("watch-revisions/watch-revisions", parameters=watch, timeout=0)
    again = wait_final(stack, again.id)
    assert again.state.is_completed() and again.state.message.startswith(f"{new_sha[:12]}: built")
    assert len(runs_tagged(stack, f"sha:{new_sha}")) == 1


def test_compare_tables_the_engines_and_crowns_the_fastest(stack, built):
    _, sha = built
    with api(stack):
        flow_run = run_deployment("compare-engines/compare-engines", parameters={"revision": sha}, timeout=0)
    assert wait_final(stack, flow_run.id).state.is_completed()
    engines = {tags(r)["indicf5.dtype"]: r for r in mlflow_runs(stack, f"tags.`indicf5.sha` = '{sha}' and tags.`indicf5.kind` = 'engine'")}
    longest = max(int(m["key"].rsplit("_", 1)[1]) for m in engines["fp32"]["data"]["metrics"] if m["key"].startswith("end_to_end_p50"))
    p50 = {d: next(m["value"] for m in r["data"]["metrics"] if m["key"] == f"end_to_end_p50_ms_{longest}") for d, r in engines.items()}
    fastest = min(p50, key=p50.get)
    alias = httpx.get(f"{stack.mlflow_url}/api/2.0/mlflow/registered-models/alias",
                      params={"name": "indicf5-engine", "alias": "champion"}).json()["model_version"]
    assert alias["run_id"] == engines[fastest]["info"]["run_id"]
    comparison = mlflow_runs(stack, f"tags.`indicf5.sha` = '{sha}' and tags.`indicf5.kind` = 'comparison'")[0]
    files = httpx.get(f"{stack.mlflow_url}/api/2.0/mlflow/artifacts/list", params={"run_id": comparison["info"]["run_id"]}).json()
    assert {"comparison.png", "comparison.md", "comparison.json"} <= {f["path"] for f in files["files"]}
    with api(stack), get_client(sync_client=True) as client:
        table = client.read_latest_artifacts()  # latest version of every key
    table = next(a for a in table if a.key == "engine-comparison")
    assert table.type == "table" and f"eager-{fastest}" in str(table.data)


def chromium(url: str, screenshot: Path) -> str:
    """The page's DOM after its scripts ran, as headless Chromium renders it; a screenshot beside."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("Chromium is not installed: apt-get install chromium (CI's .ci/run installs it)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--window-size=1400,1000", "--virtual-time-budget=20000", "--run-all-compositor-stages-before-draw"]
    subprocess.run([*flags, f"--screenshot={screenshot}", url], check=True, capture_output=True, timeout=120)
    return subprocess.run([*flags, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120).stdout


def test_the_prefect_ui_shows_the_finished_build_and_its_summary(stack, built):
    run, _ = built
    SCREENSHOTS.mkdir(exist_ok=True)
    page = chromium(f"{stack.prefect_url}/runs/flow-run/{run.id}", SCREENSHOTS / "build-engine-run.png")
    assert "Completed" in page and run.name in page
    with api(stack), get_client(sync_client=True) as client:
        summary = next(a for a in client.read_artifacts() if a.key == "build-summary" and a.flow_run_id == run.id)
    mlflow_run = run.state.message.rsplit(" ", 1)[1]
    artifact_page = chromium(f"{stack.prefect_url}/artifacts/artifact/{summary.id}", SCREENSHOTS / "build-summary-artifact.png")
    assert mlflow_run in artifact_page
    assert (SCREENSHOTS / "build-engine-run.png").stat().st_size > 10_000
