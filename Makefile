# grace_hf: `make demo` runs the whole pipeline on built-in data, `make test` runs the tests.
# Both create .venv on first use. TORCH_SPEC pins the torch/torchvision pair that installs on a
# CPU-only machine; on a GPU machine override it (e.g. `make TORCH_SPEC=torch demo`) or use
# `pip install -e .` directly, which takes whatever CUDA torch pip resolves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo_output

# The browser test drives Debian's Chromium through Selenium; nothing downloads a browser.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser demo test test-fast lint format clean

$(BIN)/grace-hf: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev,app]"
	# The reference OpenFlamingo modules for the parity tests; its own pins are years old.
	$(BIN)/pip install --quiet --no-deps "open-flamingo==2.0.1"
	touch $(BIN)/grace-hf

install: $(BIN)/grace-hf

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m grace_hf demo --output-dir $(DEMO_DIR)

browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: install browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The same without the `slow` tests (subprocess launches: DeepSpeed, multi-process, kills).
test-fast: install browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check grace_hf tests benchmarks recipes
	$(BIN)/ruff format --check grace_hf tests benchmarks recipes

format: install
	$(BIN)/ruff check --fix grace_hf tests benchmarks recipes
	$(BIN)/ruff format grace_hf tests benchmarks recipes

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache *.egg-info
