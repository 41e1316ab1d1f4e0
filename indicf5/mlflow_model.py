"""An engine as an MLflow model: a pyfunc (``mlflow.pyfunc.PythonModel``) over the engine directory,
logged with its signature, an input example and pip requirements, and registered as a version of
``indicf5-engine`` once per engine content.

The model's input is a table with one utterance a row (MLflow's column-based signature):

- ``text``: the text to speak;
- ``ref_audio``: the reference clip, a WAV/FLAC/OGG file as base64 (JSON-safe, so the same input
  serves ``predict`` in Python and ``mlflow models serve``);
- ``ref_text``: the reference clip's transcript.

Its output is a table with one column, ``audio``: base64 of a 16-bit mono WAV at 24 kHz, the bytes
``indicf5 synth`` writes for the same input and seed. Inference parameters (``params``): ``nfe``,
``cfg_strength``, ``speed``, ``seed``.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from indicf5.audio import audio_bytes
from indicf5.config import SamplingConfig

ENGINE_ARTIFACT = "engine"  # the engine directory, as the model's artifact of this name
MODEL_NAME = "engine"  # the logged model's name in its run
PACKAGE = "indicf5-engines"
MODEL_CODE = Path(__file__).with_name("engine_pyfunc.py")  # MLflow's models from code: no pickled class
BACKEND_EXTRAS = {"trtllm": "trtllm"}  # backends that need an extra of the package

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "text"), ColSpec("string", "ref_audio"), ColSpec("string", "ref_text")]),
    outputs=Schema([ColSpec("string", "audio")]),
    params=ParamSchema(
        [
            ParamSpec("nfe", "integer", 32),
            ParamSpec("cfg_strength", "double", 2.0),
            ParamSpec("speed", "double", 1.0),
            ParamSpec("seed", "integer", 0),
        ]
    ),
)
EXAMPLE_PARAMS = {"nfe": 8, "seed": 0}  # a short run: logging checks the example by predicting it


def encode_audio(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_audio(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


class EngineModel(PythonModel):
    """Speech from the engine directory the model carries (any backend; on CUDA when there is one)."""

    def load_context(self, context: PythonModelContext) -> None:
        import torch

        from indicf5.synth import Synthesizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.synth = Synthesizer.from_engine(context.artifacts[ENGINE_ARTIFACT], device=device)

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        sampling = SamplingConfig(**(params or {}))  # MLflow fills in the signature's defaults
        audio = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, row in enumerate(model_input.itertuples(index=False)):
                ref = Path(tmp) / f"ref-{i}"
                ref.write_bytes(decode_audio(row.ref_audio))
                speech = self.synth.synthesize(row.text, ref, row.ref_text, sampling)
                audio.append(encode_audio(audio_bytes(speech.wave, speech.sample_rate)))
        return pd.DataFrame({"audio": audio})


def input_example() -> pd.DataFrame:
    """One utterance in the voice of the synthetic reference clip."""
    from indicf5.stages import SAMPLE_TEXT
    from indicf5.synthetic import REF_TEXT, reference_clip

    return pd.DataFrame(
        {
            "text": [SAMPLE_TEXT],
            "ref_audio": [encode_audio(audio_bytes(reference_clip(), 24_000))],
            "ref_text": [REF_TEXT],
        }
    )


def pip_requirements(backend: str, version: str) -> list[str]:
    """This package at its version, with the extra the backend needs to load the engine."""
    extra = BACKEND_EXTRAS.get(backend)
    return [f"{PACKAGE}[{extra}]=={version}" if extra else f"{PACKAGE}=={version}"]


def log_engine_model(engine_dir: Path, backend: str, version: str) -> ModelInfo:
    """The engine directory as an MLflow model of the active run."""
    return mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=str(MODEL_CODE),
        artifacts={ENGINE_ARTIFACT: str(engine_dir)},
        signature=SIGNATURE,
        input_example=(input_example(), EXAMPLE_PARAMS),
        pip_requirements=pip_requirements(backend, version),
    )


def engine_dir_of(model_dir: Path) -> Path | None:
    """The engine directory inside a downloaded model, where its MLmodel puts the artifact (pyfunc
    keeps it under artifacts/, by the logged directory's name); None when it is no engine model."""
    try:
        artifacts = Model.load(str(model_dir)).flavors["python_function"]["artifacts"]
        engine = model_dir / artifacts[ENGINE_ARTIFACT]["path"]
    except (MlflowException, OSError, KeyError):
        return None
    return engine if (engine / "engine.json").is_file() else None
