"""The engine model's code as MLflow logs it (MLflow's "models from code"): names the model class."""

from mlflow.models import set_model

from indicf5.mlflow_model import EngineModel

set_model(EngineModel())
