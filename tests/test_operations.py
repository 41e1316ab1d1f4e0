"""Operated as the user will: real `prefect server` and `mlflow server` on loopback, the
deployments of prefect.yaml on a process worker, builds triggered through the Prefect API from
the local hub, scheduled-style watching of new revisions, the comparison with its champion alias,
and the Prefect UI as headless Chromium renders it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mlflow
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from conftest import QUIET
from hub_server import snapshot_files
from indicf5.audio import write_wav
from indicf5.mlflow_model import EXAMPLE_PARAMS, decode_audio
from indicf5.serve.process import ServerProcess
from indicf5.synthetic import REF_TEXT, reference_clip
from stack import REPO, Stack, start_stack

BUILD = {
    "backends": ["eager"],
    "dtypes": ["fp32", "fp16"],
    "nfe": 4,
    "bench_lengths": [64, 128],
    "parity": {"lengths": [64], "nfe": 4},
}
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
    raise TimeoutError(
        f"flow run {flow_run_id} did not finish; worker log:\n{(stack.root / 'worker.log').read_text()[-4000:]}"
    )


def runs_tagged(stack: Stack, tag: str) -> list:
    with api(stack), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))


def mlflow_runs(stack: Stack, query: str) -> list[dict]:
    experiment = httpx.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "indicf5-engines"}
    ).json()["experiment"]["experiment_id"]
    body = {"experiment_ids": [experiment], "filter": query, "max_results": 100}
    return httpx.post(f"{stack.mlflow_url}/api/2.0/mlflow/runs/search", json=body).json().get("runs", [])


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.fixture(scope="module")
def built(stack, hub):
    """build-engine triggered through the Prefect API, run by the worker, for the hub's main."""
    with api(stack):
        flow_run = run_deployment(
            "build-engine/build-engine",
            timeout=0,
            parameters={"repo_id": "ai4bharat/IndicF5", "revision": "main", **BUILD},
        )
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


def metric_by_step(stack: Stack, run: dict, key: str) -> dict[int, float]:
    history = httpx.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/metrics/get-history",
        params={"run_id": run["info"]["run_id"], "metric_key": key},
    ).json()["metrics"]
    return {int(m.get("step", 0)): m["value"] for m in history}


def test_compare_with_its_defaults_tables_the_newest_build_and_crowns_the_fastest(stack, built):
    with api(stack):
        flow_run = run_deployment("compare-engines/compare-engines", timeout=0)  # the deployment's defaults
    assert wait_final(stack, flow_run.id).state.is_completed()
    newest = max(mlflow_runs(stack, "tags.`indicf5.kind` = 'build'"), key=lambda r: int(r["info"]["start_time"]))
    sha = tags(newest)["indicf5.sha"]
    engines = {
        tags(r)["indicf5.dtype"]: r
        for r in mlflow_runs(stack, f"tags.`indicf5.sha` = '{sha}' and tags.`indicf5.kind` = 'engine'")
    }
    p50 = {d: metric_by_step(stack, r, "end_to_end_p50_ms") for d, r in engines.items()}
    assert all(set(by_length) == set(BUILD["bench_lengths"]) for by_length in p50.values())  # the length as step
    longest = max(BUILD["bench_lengths"])
    fastest = min(p50, key=lambda d: p50[d][longest])
    alias = httpx.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/registered-models/alias",
        params={"name": "indicf5-engine", "alias": "champion"},
    ).json()["model_version"]
    assert alias["version"] == tags(engines[fastest])["indicf5.model_version"]
    comparison = mlflow_runs(stack, f"tags.`indicf5.sha` = '{sha}' and tags.`indicf5.kind` = 'comparison'")[0]
    files = httpx.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/artifacts/list", params={"run_id": comparison["info"]["run_id"]}
    ).json()
    logged = {f["path"] for f in files["files"]}
    assert {"comparison.png", "comparison.md", "comparison.json", "comparison_table.json"} <= logged
    with api(stack), get_client(sync_client=True) as client:
        table = client.read_latest_artifacts()  # latest version of every key
    table = next(a for a in table if a.key == "engine-comparison")
    assert table.type == "table" and f"eager-{fastest}" in str(table.data)


def test_identical_engines_of_two_builds_share_one_model_version(stack, built):
    # the watched revision changed only README.md: its engines are byte for byte the main build's
    engines = mlflow_runs(stack, "tags.`indicf5.kind` = 'engine'")
    by_dtype: dict[str, set[str]] = {}
    for run in engines:
        by_dtype.setdefault(tags(run)["indicf5.dtype"], set()).add(tags(run)["indicf5.model_version"])
    versions = httpx.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/model-versions/search", params={"filter": "name = 'indicf5-engine'"}
    ).json()["model_versions"]
    assert len({tags(r)["indicf5.sha"] for r in engines}) == 2, "expected the main build and the watched revision's"
    assert all(len(v) == 1 for v in by_dtype.values()) and len(versions) == len(by_dtype) == 2, (by_dtype, versions)


def test_the_build_run_spans_its_flow_run_and_links_to_it(stack, built):
    run, sha = built
    build = next(r for r in mlflow_runs(stack, f"tags.`indicf5.sha` = '{sha}' and tags.`indicf5.kind` = 'build'"))
    t, info = tags(build), build["info"]
    assert info["status"] == "FINISHED" and len(t["mlflow.source.git.commit"]) == 40
    assert t["mlflow.source.name"] == "flows/build.py:build_engine_flow"
    link = t["indicf5.prefect_flow_run_url"]  # Prefect's own page of the flow run
    assert link.startswith(f"{stack.prefect_url}/") and link.endswith(f"/flow-run/{run.id}")
    assert int(info["start_time"]) / 1000 <= run.start_time.timestamp() + 1  # opened as the flow started
    assert int(info["end_time"]) / 1000 >= run.end_time.timestamp() - 2  # and closed as it ended
    experiment = httpx.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/experiments/get", params={"experiment_id": info["experiment_id"]}
    ).json()["experiment"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
    with api(stack), get_client(sync_client=True) as client:
        summary = next(a for a in client.read_artifacts() if a.key == "build-summary" and a.flow_run_id == run.id)
    link = f"{stack.mlflow_url}/#/experiments/{info['experiment_id']}/runs/{info['run_id']}"
    assert f"[`{info['run_id']}`]({link})" in summary.data  # the summary links back to the MLflow run


def test_the_champion_is_an_mlflow_model_that_speaks_as_indicf5_synth(stack, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow_url)
    mlflow.set_tracking_uri(stack.mlflow_url)
    model = mlflow.pyfunc.load_model("models:/indicf5-engine@champion")
    example = model.input_example
    speech = model.predict(example, params=EXAMPLE_PARAMS)
    ref = tmp_path / "ref.wav"
    ref.write_bytes(decode_audio(example["ref_audio"][0]))
    champion = httpx.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/registered-models/alias",
        params={"name": "indicf5-engine", "alias": "champion"},
    ).json()["model_version"]
    run = httpx.get(f"{stack.mlflow_url}/api/2.0/mlflow/runs/get", params={"run_id": champion["run_id"]}).json()["run"]
    engine = tags(run)
    out = tmp_path / "synth.wav"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "indicf5.cli",
            "synth",
            "--engine",
            engine["indicf5.engine_path"],
            "--text",
            example["text"][0],
            "--ref-audio",
            str(ref),
            "--ref-text",
            example["ref_text"][0],
            "--nfe",
            str(EXAMPLE_PARAMS["nfe"]),
            "--seed",
            str(EXAMPLE_PARAMS["seed"]),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert decode_audio(speech["audio"][0]) == out.read_bytes()


def test_serve_fetches_the_champion_from_mlflow_when_the_builders_store_is_gone(stack, tmp_path):
    shutil.rmtree(stack.root / "home")  # the builder's workspace: its engines are only in MLflow now
    home = tmp_path / "server-home"
    ref = tmp_path / "ref.wav"
    write_wav(ref, reference_clip(), 24_000)
    env = {**QUIET, "INDICF5_HOME": str(home), "MLFLOW_TRACKING_URI": stack.mlflow_url}
    with ServerProcess("champion", tmp_path / "serve.log", env=env, ready_timeout_s=300) as server:
        with ref.open("rb") as f:
            form = {"text": "नमस्ते", "ref_text": REF_TEXT, "seed": "1"}
            r = httpx.post(
                f"{server.url}/v1/synthesize", data=form, files={"ref_audio": ("ref.wav", f, "audio/wav")}, timeout=300
            )
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav" and len(r.content) > 1000
    assert list(home.glob("models/*/engine.json"))  # downloaded into the server's workspace


def chromium(url: str, screenshot: Path) -> str:
    """The page's DOM after its scripts ran, as headless Chromium renders it; a screenshot beside."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("Chromium is not installed: apt-get install chromium (CI's .ci/run installs it)")
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--window-size=1400,1000",
        "--virtual-time-budget=20000",
        "--run-all-compositor-stages-before-draw",
    ]
    subprocess.run([*flags, f"--screenshot={screenshot}", url], check=True, capture_output=True, timeout=120)
    return subprocess.run([*flags, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120).stdout


def test_the_prefect_ui_shows_the_finished_build_and_its_summary(stack, built):
    run, _ = built
    SCREENSHOTS.mkdir(exist_ok=True)
    page = chromium(f"{stack.prefect_url}/runs/flow-run/{run.id}", SCREENSHOTS / "build-engine-run.png")
    assert "Can't connect to Server API" not in page  # the UI calls the API on the server's own port
    assert "Completed" in page and run.name in page
    assert "marketing-banner" not in page  # no promotional banner
    with api(stack), get_client(sync_client=True) as client:
        summary = next(a for a in client.read_artifacts() if a.key == "build-summary" and a.flow_run_id == run.id)
    mlflow_run = run.state.message.rsplit(" ", 1)[1]
    artifact_page = chromium(
        f"{stack.prefect_url}/artifacts/artifact/{summary.id}", SCREENSHOTS / "build-summary-artifact.png"
    )
    assert mlflow_run in artifact_page
    assert (SCREENSHOTS / "build-engine-run.png").stat().st_size > 10_000
