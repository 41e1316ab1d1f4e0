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
          torchdiffeq jieba==0.42.1 pypinyin

.PHONY: demo test clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e ".[dev]"
	touch $@

$(VENV)/.oracle: $(VENV)/.runtime
	$(PIP) install --no-deps $(ORACLE)
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m indicf5.cli build --synthetic

test: $(VENV)/.oracle
	$(PY) -m pytest

clean:
	rm -rf $(VENV) artifacts/*/
