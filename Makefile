# The two commands: `make run` (web + worker on SQLite, demo ready) and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test test-fast setup bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exactly pinned: it takes the CPU wheel; anything looser pulls CUDA.
	$(PY) -m pip install --quiet torch==2.13.0
	# these require torch (and torchvision): --no-deps keeps pip from resolving another torch build
	$(PY) -m pip install --quiet --no-deps torchvision==0.28.0 onnx2torch==1.5.15 timm==1.0.31
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput --verbosity 0
	$(PY) manage.py seed_demo

run: setup
	@echo "EdgeOpt on http://$(HOST):$(PORT)/ (web + worker; Ctrl-C stops both); log in as demo (password above)"
	$(PY) manage.py qcluster & worker=$$!; \
	trap 'kill $$worker 2>/dev/null' EXIT INT TERM; \
	$(PY) manage.py runserver --noreload $(HOST):$(PORT)

# Test files run on TEST_WORKERS processes at once (pytest-xdist; one file's tests stay on one
# process, so its fixtures are made once); TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

test: $(VENV)/.installed
	$(PYTEST) $(PYTEST_ARGS)

# Everything but the tests that start real server/worker processes or run whole experiments.
test-fast: $(VENV)/.installed
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) bench/pytorch_techniques.py
	$(PY) bench/pytorch_int4.py
	$(PY) bench/tensorflow_techniques.py
	$(PY) bench/corpus_tensorflow.py
	$(PY) bench/estimator_validation.py

clean:
	rm -rf $(VENV)
