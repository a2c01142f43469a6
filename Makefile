# The README's commands. Each target creates/reuses .venv and installs what it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench lint install install-distributed clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# The distributed extra on a CPU machine (TorchRec's own fbgemm-gpu dependency is the GPU
# build, which does not load beside torch 2.13; see docs/distributed.md): torchrec and the
# CPU build of FBGEMM without their declared dependencies, then TorchRec's other ones.
DIST_STAMP := $(VENV)/.distributed
$(DIST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps "torchrec==1.8.0" "fbgemm-gpu-cpu==1.8.0"
	$(BIN)/python -m pip install -q pyre-extensions tensordict "torchmetrics==1.0.3" tqdm
	$(BIN)/python -c "from oneepoch.distributed.plan import require_torchrec; require_torchrec()"
	@touch $(DIST_STAMP)

install-distributed: $(DIST_STAMP)

demo: $(STAMP)
	$(BIN)/oneepoch demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_pair.py
	$(BIN)/python benchmarks/bench_limit.py
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_pretrain.py
	$(BIN)/python benchmarks/bench_monitor.py
	$(BIN)/python benchmarks/bench_dist.py
	$(BIN)/python benchmarks/bench_peers.py
	$(BIN)/python benchmarks/bench_risk.py
	$(BIN)/python benchmarks/summarize.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
