"""The build-engine flow end to end on synthetic snapshots: caching, resumption, failures, MLflow."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import QUIET
from flows.build import BuildFailed, build_engine_flow
from indicf5.parity import ParityConfig
from indicf5.settings import Settings
from indicf5.store import ArtifactStore

RUNBOOK_STAGES = (
    "resolve_revision",
    "download_snapshot",
    "export_transformer",
    "check_environment",
    "convert_checkpoint",
    "build_engine",
    "verify_parity",
    "benchmark",
    "register",
)
SMALL = dict(bench_lengths=[120], nfe=8, parity=ParityConfig(lengths=[64, 150], nfe=4))


def build(**params):
    """Runs the flow in this process; returns its summary."""
    state = build_engine_flow(**{**SMALL, **params}, return_state=True)
    outcome = state.result(raise_on_failure=False)
    summary = outcome.summary if isinstance(outcome, BuildFailed) else outcome
    if isinstance(outcome, BaseException) and not isinstance(outcome, BuildFailed):
        raise outcome
    return summary


def runbook_states(summary) -> dict[str, str]:
    return {k: v for k, v in summary.stages.items() if k.split("/")[-1] in RUNBOOK_STAGES}


def test_rebuild_of_an_unchanged_build_is_all_cached_in_its_own_workspace(home, tmp_path, prefect_api, monkeypatch):
    first = build(synthetic=True, dtypes=["fp32", "fp16"])
    assert not first.failed
    assert all(state == "Completed" for state in runbook_states(first).values()), first.stages
    second = build(synthetic=True, dtypes=["fp32", "fp16"])
    assert len(runbook_states(second)) == 4 + 4 * 2 + 1
    assert all(state == "Cached" for state in runbook_states(second).values()), second.stages
    assert second.mlflow_run_id == first.mlflow_run_id
    assert [b.engine for b in second.branches] == [b.engine for b in first.branches]

    # another workspace shares Prefect's home, hence its cache records: a hit must be one in its own store
    other = tmp_path / "other"
    monkeypatch.setenv("INDICF5_HOME", str(other))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # exported by the first workspace's MLflow
    assert runbook_states(build(synthetic=True, dtypes=["fp32"]))["eager-fp32/build_engine"] == "Completed"
    shutil.rmtree(home)
    again = build(synthetic=True, dtypes=["fp32"])
    assert all(state == "Cached" for state in runbook_states(again).values()), again.stages
    engine = Path(again.branches[0].engine)
    assert engine.is_relative_to(other) and (engine / "engine.json").is_file()
    assert str(other) in again.tracking_uri
    client = MlflowClient(again.tracking_uri)
    children = client.search_runs(
        [client.get_run(again.mlflow_run_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{again.mlflow_run_id}'"
    )
    assert [r.data.tags["indicf5.engine_path"] for r in children] == [str(engine)]


def test_a_corrupted_or_deleted_artifact_is_rebuilt_not_trusted(home, prefect_api):
    first = build(synthetic=True, dtypes=["fp32"])
    engine = Path(first.branches[0].engine)
    (engine / "model.safetensors").write_bytes(b"corrupted")
    export_dir = next((home / "export").iterdir())
    (export_dir / "indicf5_transformer.pt").unlink()
    synthetic_weights = Path(first.source.repo_id) / "model.safetensors"
    intact = synthetic_weights.read_bytes()
    synthetic_weights.write_bytes(intact[: len(intact) // 2])  # the synthetic snapshot is ours: made again
    second = build(synthetic=True, dtypes=["fp32"])
    assert synthetic_weights.read_bytes() == intact and second.source.sha == first.source.sha
    assert second.stages["export_transformer"] == "Completed"
    assert second.stages["eager-fp32/build_engine"] == "Completed"
    store = ArtifactStore(home)
    for stage in ("export", "build"):
        for d in (home / stage).iterdir():
            assert store.load(stage, d.name) is not None, f"{stage}/{d.name} left invalid"
    third = build(synthetic=True, dtypes=["fp32"])
    assert all(state == "Cached" for state in runbook_states(third).values()), third.stages


def processes_in_group(pgid: int) -> list[str]:
    """The live (not zombie) processes of a process group, as their command lines."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):  # gone meanwhile
            continue
        if int(group) == pgid and state != "Z":
            found.append(f"{stat.parent.name}: {cmdline}")
    return found


KILL_DURING_BUILD = """
import os, sys, time
from indicf5.backends.eager import EagerBackend
build = EagerBackend.build
def slow_build(self, *args, **kwargs):
    open(os.environ["BUILD_STARTED"], "w").close()
    time.sleep(120)
    return build(self, *args, **kwargs)
EagerBackend.build = slow_build
from indicf5.cli import main
sys.exit(main(sys.argv[1:]))
"""


SMALL_CLI_BUILD = [
    "build",
    "--synthetic",
    "--dtype",
    "fp32",
    "--bench-lengths",
    "120",
    "--nfe",
    "8",
    "--parity-nfe",
    "4",
]


def cli_build(*args, env=None, **popen):
    cmd = [sys.executable, "-m", "indicf5.cli", *SMALL_CLI_BUILD, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **popen)


def cli_stages(stdout: str) -> dict[str, str]:
    return dict(kv.split("=") for kv in stdout.split("stages: ")[1].splitlines()[0].split(", "))


def test_sigkill_of_the_command_during_build_leaves_nothing_running_and_the_rerun_completes_from_cache(home, tmp_path):
    env = dict(os.environ, BUILD_STARTED=str(tmp_path / "started"))
    cmd = [sys.executable, "-c", KILL_DURING_BUILD, *SMALL_CLI_BUILD]
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "started").exists():
            assert proc.poll() is None and time.time() < deadline, (
                f"the build never reached build_engine:\n{(tmp_path / 'stderr').read_text()[-3000:]}"
            )
            time.sleep(0.2)
        assert len(processes_in_group(proc.pid)) >= 2  # the command and Prefect's temporary server
        proc.kill()  # the command only, as `kill -9 PID` does: its server must go with it
        proc.wait()
        deadline = time.time() + 30
        while (left := processes_in_group(proc.pid)) and time.time() < deadline:
            time.sleep(0.2)
        assert not left, f"left running after the command was killed: {left}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    [killed_write] = (home / "build").iterdir()
    assert killed_write.name.startswith(".tmp-") and f"-{proc.pid}@" in killed_write.name

    done = cli_build(env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = cli_stages(done.stdout)
    for stage in ("resolve_revision", "download_snapshot", "export_transformer", "eager-fp32/convert_checkpoint"):
        assert stages[stage] == "Cached", stages
    assert stages["eager-fp32/build_engine"] == "Completed"
    assert [p.name for p in (home / "build").iterdir()] == [Path(engine_path(done.stdout)).name]  # swept
    client = MlflowClient(Settings().tracking_uri)
    builds = client.search_runs(
        [client.get_experiment_by_name(Settings().mlflow_experiment).experiment_id], "tags.`indicf5.kind` = 'build'"
    )
    by_status = {run.info.status: run for run in builds}
    assert len(builds) == 2 and set(by_status) == {"KILLED", "FINISHED"}  # the killed build's run closed by the rerun
    assert by_status["KILLED"].data.tags["indicf5.writer"].startswith(f"{proc.pid}@")


def engine_path(stdout: str) -> str:
    return re.search(r": engine (\S+)", stdout)[1]


BUILD_TOGETHER = """
import os, sys, time
from pathlib import Path
import indicf5.cli as cli
start_prefect_api = cli.start_prefect_api
def start_then_wait_for_the_other():
    start_prefect_api()
    ready = Path(os.environ["READY_DIR"])
    (ready / str(os.getpid())).touch()
    while len(list(ready.iterdir())) < 2:
        time.sleep(0.05)
cli.start_prefect_api = start_then_wait_for_the_other
sys.exit(cli.main(sys.argv[1:]))
"""


def test_two_builds_started_together_on_a_new_workspace_both_succeed_with_one_record(home, tmp_path):
    ready = tmp_path / "ready"
    ready.mkdir()
    env = dict(os.environ, READY_DIR=str(ready))
    cmd = [sys.executable, "-c", BUILD_TOGETHER, *SMALL_CLI_BUILD]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    for stage in ("synthetic", "download", "export", "convert", "build", "verify", "benchmark"):
        assert len(list((home / stage).iterdir())) == 1, f"{stage}: {list((home / stage).iterdir())}"
    assert engine_path(outputs[0][0]) == engine_path(outputs[1][0])
    client = MlflowClient(Settings().tracking_uri)
    builds = client.search_runs(
        [client.get_experiment_by_name(Settings().mlflow_experiment).experiment_id], "tags.`indicf5.kind` = 'build'"
    )
    assert len(builds) == 1 and all(f"MLflow run {builds[0].info.run_id}" in out for out, _ in outputs)


def test_a_failing_branch_does_not_stop_the_others(home, prefect_api):
    strict = ParityConfig(lengths=[64], nfe=4, thresholds={"fp32": 1e-4, "fp16": 1e-9, "bf16": 2e-2})
    summary = build(synthetic=True, backends=["eager", "nosuch"], dtypes=["fp32", "fp16"], parity=strict)
    by_name = {f"{b.backend}-{b.dtype}": b for b in summary.branches}
    assert by_name["eager-fp32"].error is None and by_name["eager-fp32"].engine
    assert "fails parity" in by_name["eager-fp16"].error
    assert "unknown backend 'nosuch'" in by_name["nosuch-fp32"].error
    assert summary.stages["eager-fp16/verify_parity"] == "Failed"
    assert "eager-fp16/benchmark" not in summary.stages
    client = MlflowClient(Settings().tracking_uri)
    children = client.search_runs(
        [client.get_run(summary.mlflow_run_id).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{summary.mlflow_run_id}'",
    )
    assert [r.data.tags["indicf5.dtype"] for r in children] == ["fp32"]  # the failed branch registered nothing


def test_mlflow_records_the_build_and_no_secret_leaks(home, hub, prefect_api, monkeypatch, capfd):
    secret = "hf_NeverLogThisToken0123456789"
    repo = hub.repos["ai4bharat/IndicF5"]
    repo.token = secret
    monkeypatch.setenv("HF_TOKEN", secret)
    try:
        summary = build(repo_id="ai4bharat/IndicF5", revision="main", dtypes=["fp32", "fp16"])
    finally:
        repo.token = None
    assert not summary.failed
    sha = repo.refs["main"]
    client = MlflowClient(Settings().tracking_uri)
    parent = client.get_run(summary.mlflow_run_id)
    assert parent.data.params["sha"] == sha and parent.data.tags["indicf5.sha"] == sha
    assert {"download_seconds", "export_seconds", "parameters"} <= set(parent.data.metrics)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.source.name"] == "flows/build.py:build_engine_flow"
    assert len(parent.data.tags["mlflow.source.git.commit"]) == 40
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(parent.data.tags["indicf5.prefect_flow_run_id"])
    assert flow_run.flow_id and flow_run.state.is_completed()
    # the run spans the flow: opened as the flow started, closed as it ended
    assert parent.info.start_time / 1000 <= flow_run.start_time.timestamp() + 2
    assert parent.info.end_time / 1000 >= flow_run.end_time.timestamp() - 2
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["indicf5.dtype"] for r in children) == ["fp16", "fp32"]
    for run in children:
        params, metrics = run.data.params, run.data.metrics
        assert params["backend"] == "eager" and params["sha"] == sha and params["nfe"] == "8"
        assert {"torch", "python", "gpu", "cuda"} <= set(params)
        for m in (
            "build_seconds",
            "convert_seconds",
            "verify_seconds",
            "benchmark_seconds",
            "engine_bytes",
            "parity_worst_rel_l2",
            "peak_memory_mb",
        ):
            assert m in metrics, m
        for m, lengths in (
            ("parity_mel_rel_l2", {64, 150}),
            ("end_to_end_p50_ms", {120}),
            ("loop_p95_ms", {120}),
            ("vocoder_p50_ms", {120}),
            ("step_p50_ms", {120}),
            ("rtf", {120}),
        ):
            assert {h.step for h in client.get_metric_history(run.info.run_id, m)} == lengths, m  # the length as step
        assert metrics["engine_bytes"] > 0
        artifacts = {
            a.path
            for folder in ("results", "manifests", "engine")
            for a in client.list_artifacts(run.info.run_id, folder)
        }
        assert {
            "results/parity.json",
            "results/benchmark.json",
            "results/sample.wav",
            "results/mel.png",
            "results/latency.png",
            "manifests/engine_manifest.json",
            "engine/engine.json",
        } <= artifacts

    assert any(auth == f"Bearer {secret}" for _, _, auth in hub.requests)  # the gated repo was read with it

    # the token is in no log, param, tag, result, manifest or artifact
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        logs = " ".join(log.message for log in prefect.read_logs())
        params = json.dumps([run.parameters for run in prefect.read_flow_runs()])
    assert "download_snapshot" in logs or "Finished" in logs  # the logs were there to search
    assert secret not in logs and secret not in params
    out, err = capfd.readouterr()
    assert secret not in out + err
    for run in [parent, *children]:
        assert secret not in json.dumps({**run.data.params, **run.data.tags})
    for root in (home, Path(os.environ["PREFECT_HOME"])):
        for f in root.rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f


def test_compiled_engine_builds_on_cpu_and_passes_its_parity_gate(home, prefect_api):
    """... sampled on f5-tts 1.1's pruned grid (schedule epss at 7 steps) in parity and benchmark."""
    parity = ParityConfig(lengths=[64, 150, 300], nfe=7, schedule="epss")  # inside buckets and across two of them
    summary = build(synthetic=True, backends=["compiled"], dtypes=["fp32"], parity=parity, nfe=7, schedule="epss")
    assert not summary.failed, summary.branches
    reports = [json.loads(p.read_text()) for p in home.rglob("benchmark.json")]  # the store's, MLflow's copy
    assert reports and all((r["nfe"], r["schedule"]) == (7, "epss") for r in reports)
    branch = summary.branches[0]
    assert branch.parity_rel_l2 <= 1e-4
    assert (Path(branch.engine) / "compile_cache.bin").stat().st_size > 0
    spec = json.loads((Path(branch.engine) / "engine.json").read_text())
    assert spec["backend"] == "compiled" and spec["build_flags"]["device"] == "cpu"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="tensorrt_llm is installed here")
def test_without_tensorrt_llm_the_trtllm_branch_fails_with_the_remediation_and_the_cli_reads_clean(home, tmp_path):
    # a fresh workspace and a fresh ephemeral Prefect database, with only the command's own quiet settings
    env = {k: v for k, v in os.environ.items() if k not in QUIET} | {"PREFECT_HOME": str(tmp_path / "prefect")}
    done = cli_build("--backend", "trtllm", "--backend", "eager", env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    failed = next(line for line in done.stdout.splitlines() if "trtllm" in line and "FAILED" in line)
    # the stage and the remediation, the branch's label not repeated
    assert "FAILED check_environment: the trtllm backend needs TensorRT-LLM" in failed and "pip install" in failed
    assert "trtllm-fp32/" not in output
    for noise in ("Traceback", "NoneType: None", "database is locked", "telemetry"):
        assert noise not in output, f"{noise!r} in the build's output:\n{output[-6000:]}"
    run_id = done.stdout.split("MLflow run ")[1].split()[0]
    client = MlflowClient(Settings().tracking_uri)
    build = client.get_run(run_id)
    assert build.info.status == "FAILED" and "trtllm-fp32: check_environment:" in build.data.tags["indicf5.error"]
    children = client.search_runs([build.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    assert [r.data.tags["indicf5.backend"] for r in children] == ["eager"]  # the other branch registered


def test_offline_the_watch_fails_once_saying_the_hub_is_unreachable(hub, home, prefect_api, caplog):
    from flows.watch import watch_revisions_flow

    hub.failures = [503] * 4  # the first attempt and its three retries
    try:
        state = watch_revisions_flow(return_state=True)
    finally:
        hub.failures = []
    assert state.is_failed() and state.message.startswith("hub unreachable: "), state
    assert "Retries are exhausted" in caplog.text  # the run's log lines, as formatted with any traceback
    assert caplog.text.count("hub unreachable") == 1 and "Traceback" not in caplog.text, caplog.text[-4000:]


def test_long_stages_log_at_a_steady_cadence(prefect_api):
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from tasks.common import heartbeat

    @task
    def slow_stage():
        with heartbeat("slow stage", every_s=0.1):
            time.sleep(0.55)

    @flow
    def one_slow_stage():
        slow_stage()

    state = one_slow_stage(return_state=True)
    time.sleep(2)  # logs reach the API in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    beats = [log.message for log in logs if log.message.startswith("slow stage: still running")]
    assert len(beats) >= 3 and any(log.message.startswith("slow stage: done in") for log in logs)


def test_compare_from_the_command_line_crowns_the_fastest_engine(home, prefect_api, capsys):
    from mlflow.tracking import MlflowClient

    from indicf5.cli import main
    from indicf5.tracking import REGISTERED_MODEL

    assert main(["compare"]) == 2 and "no build" in capsys.readouterr().err  # nothing registered yet
    summary = build(synthetic=True, dtypes=["fp32", "fp16"])
    assert main(["compare"]) == 0  # its defaults: the newest build, here of the synthetic snapshot (a local path)
    out = capsys.readouterr().out
    assert f"@ `{summary.source.sha[:12]}`" in out
    assert out.count("| eager-fp32 |") == 1 and out.count("| eager-fp16 |") == 1 and "speedup @120" in out  # once
    champion = MlflowClient(Settings().tracking_uri).get_model_version_by_alias(REGISTERED_MODEL, "champion")
    fastest = min(summary.branches, key=lambda b: b.e2e_p50_ms["120"])
    assert f"Champion: **{fastest.backend}-{fastest.dtype}**" in out
    assert MlflowClient(Settings().tracking_uri).get_run(champion.run_id).data.tags["indicf5.dtype"] == fastest.dtype
    assert f"alias champion -> version {champion.version}\n" in out
