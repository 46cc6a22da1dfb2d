# The two commands of the quick start. Both create .venv and install orch on first use.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.orch-installed

.PHONY: demo test test-fast bench toy-clip clean-cache

demo: $(STAMP)  ## fine-tune the toy CLIP, sweep WiSE-FT alpha, log to MLflow
	$(VENV)/bin/orch sweep sweeps/wise_alpha.yaml

test: $(STAMP)  ## the whole suite; first unpacks the shipped toy CLIP and renders the toy world if missing
	$(PY) -m trainers.toyworld.pretrain
	$(PY) -m pytest -q

# The edit loop: every test but those marked e2e (they start Ray, or run `orch` or Python
# in a subprocess); conftest.py refuses a test that starts Ray without that mark.
test-fast: $(STAMP)  ## the suite without the e2e tests: no Ray, no subprocesses
	$(PY) -m trainers.toyworld.pretrain
	$(PY) -m pytest -q -m "not e2e"

# Never part of `make test`: minutes of work, and speed belongs here, not in tests. The
# CPU benchmarks (bench/knn.py uses a GPU when there is one), then bench/gpu.py only
# where torch sees a GPU. Record what they print in bench/RESULTS.md.
# Each script also writes its figures into $(BENCH_SUMMARY); the last step prints them as
# one table with the machine (what bench/RESULTS.md keeps). About 40 minutes on 2 cores.
# The ImageNet-shaped job runs at 10 % and 30 % of its size here; at full size it takes
# over half an hour of a 2-core CPU (its kNN alone grows with the square of the size):
# `bench/ensemble_stage.py --sizes 1.0` on a bigger machine.
BENCH_SUMMARY ?= $(or $(TMPDIR),/tmp)/orch-bench-summary.jsonl
bench: $(STAMP)  ## the benchmarks (bench/RESULTS.md): ratios against plain loops, side by side
	$(PY) -m trainers.toyworld.pretrain
	rm -f $(BENCH_SUMMARY)
	export ORCH_BENCH_SUMMARY=$(BENCH_SUMMARY); \
	$(PY) bench/knn.py && \
	$(PY) bench/ensemble_sweep.py --no-ts --baseline-points 5 && \
	$(PY) bench/ensemble_stage.py --sizes 0.1 0.3 && \
	$(PY) bench/input_feed.py && \
	$(PY) bench/feature_cache.py --jpegs 6000 && \
	$(PY) bench/feature_cache.py --models 10 && \
	$(PY) bench/wise_sweep.py && \
	$(PY) bench/driver_overhead.py --trials 10 200 && \
	if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) bench/gpu.py; \
	else \
		echo "bench: no GPU here, bench/gpu.py skipped"; \
	fi
	$(PY) bench/summary.py $(BENCH_SUMMARY)

toy-clip: $(STAMP)  ## pre-train the toy CLIP from scratch (5-9 min on 2 cores) and rewrite its shipped weights
	$(PY) -m trainers.toyworld.pretrain --rebuild

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch/torchvision first and on their own: pinned builds that pip takes from local disk
# where they lie there; then the project with its test extras.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

clean-cache:  ## forget the cached toy world and toy CLIP (rebuilt on next use)
	rm -rf "$${ORCH_CACHE_DIR:-$$HOME/.cache/orch}"
