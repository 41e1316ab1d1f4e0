"""MLflow's experiment as the builds set it up, without a build."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from indicf5.settings import Settings
from indicf5.tracking import use_tracking


def test_a_hand_set_sqlite_tracking_uri_keeps_artifacts_in_the_workspace(home, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    monkeypatch.chdir(tmp_path)  # not ./mlruns of wherever the command runs
    settings = Settings()
    experiment = MlflowClient(settings.tracking_uri).get_experiment(use_tracking(settings))
    assert experiment.artifact_location == (home / "mlartifacts").resolve().as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3: model training
    assert not (tmp_path / "mlruns").exists()


def test_build_runs_of_killed_processes_are_closed_as_killed_and_others_left_running(home):
    """A build killed with SIGKILL cannot close its run; the next build closes it, but not a run
    whose process still lives (a build running beside it) or one of another host."""
    import socket
    import subprocess
    import sys

    from indicf5.tracking import close_abandoned_builds, start_build

    settings = Settings()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live_run = start_build(settings, 0.0, None, None)  # this process's
    client = MlflowClient(settings.tracking_uri)
    experiment = use_tracking(settings)
    runs = {
        writer: client.create_run(experiment, tags={"indicf5.kind": "build", "indicf5.writer": writer}).info.run_id
        for writer in (f"{gone.stdout.strip()}@{socket.gethostname()}", "1@another-host", "not a writer")
    }
    killed = runs[f"{gone.stdout.strip()}@{socket.gethostname()}"]
    assert close_abandoned_builds(settings) == [killed]
    run = client.get_run(killed)
    assert run.info.status == "KILLED" and "ended without closing its run" in run.data.tags["indicf5.error"]
    for run_id in (live_run, runs["1@another-host"], runs["not a writer"]):
        assert client.get_run(run_id).info.status == "RUNNING"
    assert close_abandoned_builds(settings) == []  # once
