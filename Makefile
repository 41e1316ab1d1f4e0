# The two front-door commands: `make demo` (main job on the embedded synthetic default) and
# `make test`. Each creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
export INDICF5_HOME ?= $(CURDIR)/artifacts

# Upstream F5-TTS and IndicF5's tokenizer, as test oracles only (installed without their
# training/UI dependencies; tests/upstream.py imports just the DiT, the CFM and the tokenizer).
ORACLE := f5-tts==1.1.22 x-transformers==2.31.10 einx==0.4.3 einops loguru torch-einops-utils frozendict \
          torchdiffeq jieba==0.42.1 pypinyin pydub==0.25.1

# Run it for real (README): the servers, and a worker that deploys prefect.yaml and runs builds.
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
# MLflow's default of 4 workers is too many on a small machine (a child died on start on 2 cores)
MLFLOW_WORKERS ?= 1
STACK ?= $(CURDIR)/.stack
QUIET := set -a && . indicf5/quiet.env && set +a
# the UI in the browser calls the API at this address: without it, it calls port 4200 whatever PREFECT_PORT is
UI_ENV := PREFECT_UI_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api
CLIENT_ENV := PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT) \
              INDICF5_REPO=$(CURDIR)

.PHONY: demo test clean prefect-server mlflow-server worker

# Every target below reinstalls .venv when pyproject.toml is newer than the last install, and says so.
$(VENV)/.runtime: pyproject.toml
	@if [ -e $@ ]; then echo "pyproject.toml changed since $(VENV) was installed: reinstalling $(VENV)"; \
	 else echo "creating $(VENV)"; fi
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e ".[dev]"
	touch $@

$(VENV)/.oracle: $(VENV)/.runtime
	$(PIP) install --no-deps $(ORACLE)
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m indicf5.cli build --synthetic

# headless Chromium for the test that looks at the Prefect UI (Debian's package)
$(VENV)/.chromium: $(VENV)/.runtime
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
	    || (sudo apt-get update -qq && sudo apt-get install -y -qq chromium)
	touch $@

test: $(VENV)/.oracle $(VENV)/.chromium
	$(PY) -m ruff check .
	$(PY) -m pytest

prefect-server: $(VENV)/.runtime
	$(QUIET) && export $(UI_ENV) && $(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

mlflow-server: $(VENV)/.runtime
	mkdir -p $(STACK)
	$(QUIET) && $(VENV)/bin/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) --workers $(MLFLOW_WORKERS) \
	    --backend-store-uri sqlite:///$(STACK)/mlflow.db --artifacts-destination $(STACK)/mlartifacts

worker: $(VENV)/.runtime
	$(QUIET) && export $(CLIENT_ENV) && \
	$(VENV)/bin/prefect work-pool create gpu-builders --type process --overwrite && \
	$(VENV)/bin/prefect --no-prompt deploy --all && \
	$(VENV)/bin/prefect worker start --pool gpu-builders

clean:
	rm -rf $(VENV) artifacts/*/
