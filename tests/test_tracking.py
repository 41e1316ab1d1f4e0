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
