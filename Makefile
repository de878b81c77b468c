# The verbs a user types. Each creates .venv and installs the project when it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DATASET ?= synthetic
MODELS ?= pop sasrec gru4rec mamba4rec
EPOCHS ?=
RAW_DIR ?=
SET ?=
MODEL_URI ?=
BUNDLE ?=
# NPROC=N runs make eval as N ranks of one torchrun job on this machine (docs/scaling.md); THREADS: threads per rank
NPROC ?=
THREADS ?=
# ENGINE=spark builds a missing dataset on Apache Spark (installs the [spark] extra; docs/pipelines-at-scale.md)
# SEEDS="42 43 44" trains each model once per seed (mean ± sd, paired bootstrap tests); RESUME=1 reuses finished runs
ENGINE ?=
SPARK_MASTER ?=
RECSYS_JOB = $(if $(NPROC),$(VENV)/bin/torchrun --nproc-per-node $(NPROC) -m recsys,$(VENV)/bin/recsys)

.PHONY: setup test test-slow test-triton test-spark test-browser test-tracking test-chaos eval serve mlflow-ui bench bench-kernels \
	bench-kernels-gpu bench-serving bench-serving-load bench-generative bench-bsarec lint clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so nothing pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Triton kernels' parity tests on the CPU through Triton's interpreter (installs the optional triton extra).
test-triton: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,triton]'
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton

# The Spark engine against the in-process one (installs the [spark] extra; needs Java 17, skips without it).
test-spark: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,spark]'
	$(PY) -m pytest -q -m spark

# The MLflow UI of a small report and its report.html in headless Chromium (installs the [browser] extra; Debian's
# chromium and chromium-driver are apt-installed when missing; Selenium never downloads a driver). Screenshots go to
# reports/browser/.
test-browser: $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
	$(PY) -m pip install --quiet -e '.[dev,browser]'
	SE_OFFLINE=1 $(PY) -m pytest -q -m browser

# Two `recsys report` at once into one MLflow store, 10 times on SQLite and 10 times through an `mlflow server` on a
# real PostgreSQL that the test starts and stops as the postgres user (docs/operations.md). Installs the [postgres]
# extra, and Debian's postgresql when initdb is neither on PATH nor in /usr/lib/postgresql/*/bin.
SUDO = $(if $(filter 0,$(shell id -u)),,sudo)
test-tracking: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,postgres]'
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		echo "installing Debian's postgresql"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -rP -m tracking

# SIGKILL at 40 seeded random moments of `recsys data build` (in-process and Spark engines) and `recsys train` (one
# process and torchrun), and just before each rename of a rebuild and a retrain: nothing half-written looks complete,
# no previous dataset or bundle is lost, every resumed run ends as the uninterrupted one. Installs the [spark] extra
# (needs Java 17); CHAOS_SEED=N draws other moments (default 27); the tally goes to reports/chaos.json.
test-chaos: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,spark]'
	CHAOS_REPORT=reports/chaos.json $(PY) -m pytest -q -s -m chaos

eval: $(STAMP)
	$(if $(filter spark,$(ENGINE)),$(PY) -m pip install --quiet -e '.[spark]')
	$(RECSYS_JOB) report --dataset $(DATASET) --models $(MODELS) $(if $(THREADS),--threads $(THREADS)) \
		$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(RAW_DIR),--raw-dir $(RAW_DIR)) $(foreach s,$(SET),--set $(s)) \
		$(if $(SEEDS),--seeds $(SEEDS)) $(if $(RESUME),--resume) \
		$(if $(ENGINE),--engine $(ENGINE)) $(if $(SPARK_MASTER),--spark-master $(SPARK_MASTER))

serve: $(STAMP)
	$(VENV)/bin/recsys serve $(if $(MODEL_URI),--model-uri $(MODEL_URI)) $(if $(BUNDLE),--bundle $(BUNDLE))

mlflow-ui: $(STAMP)
	$(VENV)/bin/recsys mlflow-ui

bench: $(STAMP)
	$(PY) tests/benchmarks/pipeline.py

# Kernels against their baselines (about 6 minutes on 2 cores).
bench-kernels: $(STAMP)
	$(PY) tests/benchmarks/kernels.py

# Triton kernels against the torch path and the measured copy bandwidth, on a CUDA device (needs a CUDA build of
# torch in .venv; on a machine whose python3 already has torch and triton: python3 tests/benchmarks/kernels_gpu.py).
bench-kernels-gpu: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,triton]'
	$(PY) tests/benchmarks/kernels_gpu.py

# The REST service under load (SASRec on Amazon Beauty, trained first if runs/amazon-beauty/sasrec is missing)
# and a synthetic 1,000,000-item catalogue; about 5 minutes on 2 cores.
bench-serving: $(STAMP)
	$(PY) tests/benchmarks/serving.py $(if $(BUNDLE),--bundle $(BUNDLE))

# The service under wrk (Debian's, installed when missing): load against the in-run baseline, overload (503 +
# Retry-After), slow clients, and a 200,000-request soak with hot reloads; about 12 minutes on 2 cores.
bench-serving-load: $(STAMP)
	command -v wrk >/dev/null || apt-get install -y -q wrk
	$(PY) tests/benchmarks/serving_load.py $(if $(BUNDLE),--bundle $(BUNDLE))

# TIGER's beam search per request (k = 10) beside SASRec's scoring, on a Beauty-sized catalogue; about 2 minutes.
# TEXT_CACHE: Beauty's cached MiniLM item embeddings (.npy), for the real trie; random unit vectors without it.
bench-generative: $(STAMP)
	$(PY) tests/benchmarks/generative.py $(if $(TEXT_CACHE),--text-cache $(TEXT_CACHE))

# BSARec's training step on Amazon Beauty: plain, last row only, and ours (with FastDropout); about 4 minutes.
bench-bsarec: $(STAMP)
	$(PY) tests/benchmarks/bsarec_step.py

lint: $(STAMP)
	$(VENV)/bin/ruff check recsys pipelines kernels serving tests

clean:
	rm -rf $(VENV) reports mlruns data/processed
