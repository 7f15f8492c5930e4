# carflow — every setup step lives here, so a fresh clone needs only `make demo` / `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
# re-install when the dependency spec or the lock changes
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock 2>/dev/null | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export YOLO_OFFLINE ?= 1
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install browser demo test test-slow test-all lint bench lock gpu clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check "uv>=0.4"
	$(BIN)/uv pip install --python $(PYTHON) -r requirements.lock
	$(BIN)/uv pip install --python $(PYTHON) --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

## Debian's chromium, for the serve page's browser test (Playwright drives it: its own browser
## download cannot work offline); installed only when missing (apt-get needs root)
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

## the main job on the embedded defaults: local storage, Prefect's temporary server
demo: install
	$(PYTHON) -m flows.demo

## the default (fast) test set; CI runs exactly this
test: install browser
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-slow: install browser
	$(PYTHON) -m pytest -m slow $(PYTEST_ARGS)

test-all: install browser
	$(PYTHON) -m pytest -m "" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/uv pip install --python $(PYTHON) -e '.[bench]'
	$(PYTHON) bench/crawl.py
	$(PYTHON) bench/clean.py --n 2000
	$(PYTHON) bench/near_dup.py --n 1000000 --radius 8
	$(PYTHON) bench/split.py
	$(PYTHON) bench/car_filter.py
	$(PYTHON) -m bench.detect
	$(PYTHON) -m bench.dataset_read --n 1500
	$(PYTHON) -m bench.serve
	$(PYTHON) bench/orchestration.py --n 2000 --mem-small 2000 --mem-large 10000 --scale-n 2000 --shard-size 500

## regenerate requirements.lock after editing pyproject.toml dependencies
lock:
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

## GPU extra (TensorFlow's CUDA libraries) on top of the normal install
gpu: install
	$(BIN)/uv pip install --python $(PYTHON) -e '.[gpu]'

clean:
	rm -rf $(VENV) data .pytest_cache
