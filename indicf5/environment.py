"""What this machine can build and run: versions, the accelerator, the optional backends' packages."""

from __future__ import annotations

import importlib.metadata
import platform

import torch
from pydantic import BaseModel


# the packages whose versions an engine's build depends on, beside python and torch
PACKAGES = ("tensorrt_llm", "tensorrt", "triton", "vocos", "prefect", "mlflow")


class EnvironmentReport(BaseModel):
    python: str
    torch: str
    cuda: str | None
    gpu: str | None
    device: str  # where engines run here: "cuda" or "cpu"
    packages: dict[str, str | None]  # PACKAGES: version, or None if absent
    backends: dict[str, str | None]  # backend -> None if it can build here, else the remediation

    def versions(self) -> dict[str, str]:
        return {
            "python": self.python,
            "torch": self.torch,
            "cuda": self.cuda or "none",
            "gpu": self.gpu or "none",
            **{k: v or "absent" for k, v in self.packages.items()},
        }


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_environment() -> EnvironmentReport:
    from indicf5.backends import BACKENDS

    cuda = torch.cuda.is_available()
    return EnvironmentReport(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda if cuda else None,
        gpu=torch.cuda.get_device_name() if cuda else None,
        device="cuda" if cuda else "cpu",
        packages={name: package_version(name) for name in PACKAGES},
        backends={name: backend().unavailable() for name, backend in BACKENDS.items()},
    )
