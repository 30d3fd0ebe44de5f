# Every target works on a fresh machine: the venv is (re)built when pyproject.toml changes.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Local Ray must bind loopback only (see README "Network").
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv demo test lint bench clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/zfatlas demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The viewer's browser test drives Debian's chromium (Playwright is only the driver: never
# `playwright install`). Installed here when missing on a Debian machine (CI runs as root).
browser:
	command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		(apt-get update && apt-get install -y chromium)

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

# Every benchmark, one after another (never beside other work: they print the load average and
# mark ratios taken above load 1 as not quotable). decode.py makes 5,000 JPEGs on its first run.
bench: $(STAMP)
	for b in scan atlas occlusion train s3_write decode any_cnn; do $(BIN)/python benchmarks/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) artifacts .pytest_cache
