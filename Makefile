# The one-command local stack and the test suite; see README.md.
VENV := .venv
PYTHON := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install up down status test lint format

install: $(STAMP)

# PyTorch's CPU build goes in first: installed later, as a dependency of the GPU extras, it
# would be a multi-GB CUDA build. spandrel (the extras' upscalers) goes in without its
# dependencies: it names torchvision, which would replace that torch and which the workers do
# without (see diffusion/image_models.py); its other needs are in the `gpu` extra.
$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps spandrel==0.4.2
	$(PIP) install -e '.[gpu,dev]'
	touch $@

up: install
	$(PYTHON) -m deploy.local up

down:
	$(PYTHON) -m deploy.local down

status:
	$(PYTHON) -m deploy.local status

test: install
	scripts/ensure_rabbitmq.sh
	$(PYTHON) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
