# Two commands a new user needs:  `make demo`  and  `make test`.
# Both create .venv with --system-site-packages, so a torch you already have (a CUDA build, say)
# is reused and never replaced; pip only installs what is missing.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip

.PHONY: demo test test-thorough lint typecheck format docs docs-serve bench clean

$(VENV)/.created:
	$(PYTHON) -m venv --system-site-packages $(VENV)
	touch $@

$(VENV)/.installed-%: pyproject.toml $(VENV)/.created
	$(PIP) install -q -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-examples
	$(PY) examples/flagship_demo.py

test: $(VENV)/.installed-test
	$(PY) -m pytest

test-thorough: $(VENV)/.installed-test
	HYPOTHESIS_PROFILE=thorough $(PY) -m pytest

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(PY) -m mypy

format: $(VENV)/.installed-dev
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

docs: $(VENV)/.installed-docs
	$(PY) -m mkdocs build --strict

docs-serve: $(VENV)/.installed-docs
	$(PY) -m mkdocs serve

bench: $(VENV)/.installed-examples
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) site build .pytest_cache .hypothesis
