# Two commands do all set-up on a fresh machine:
#   make run    serve the API and one worker on the embedded default (http://127.0.0.1:8000)
#   make test   run the whole suite (needs PostgreSQL and Redis on 127.0.0.1, see README)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch, installed before anything else so no dependency pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run test worker migrate clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# Debian's Chromium for the browser tests (never a browser download); root only.
	if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	HF_HUB_OFFLINE=1 $(PY) -m app.serve

worker: install
	HF_HUB_OFFLINE=1 $(PY) -m celery -A worker.celery_app worker --loglevel=INFO --concurrency=1

migrate: install
	$(PY) -m alembic upgrade head

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf var test-output .pytest_cache
