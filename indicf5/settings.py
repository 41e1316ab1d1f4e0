"""Where things live, from the environment (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    home: Path = Field(
        Path("artifacts"),
        validation_alias="INDICF5_HOME",
        description="workspace: artifact store, MLflow sqlite, synthetic snapshot",
    )
    mlflow_tracking_uri: str | None = Field(None, validation_alias="MLFLOW_TRACKING_URI")
    mlflow_experiment: str = Field("indicf5-engines", validation_alias="INDICF5_EXPERIMENT")

    @property
    def store_root(self) -> Path:
        return self.home.resolve()

    @property
    def tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI, else a sqlite database in the workspace."""
        return self.mlflow_tracking_uri or f"sqlite:///{self.store_root / 'mlflow.db'}"
