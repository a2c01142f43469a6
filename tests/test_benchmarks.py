"""Smoke tests of the benchmark scripts at tiny sizes: each worker runs the code path `make bench`
times and prints its JSON (no result file is written), so a change that breaks a benchmark is
caught here rather than at the next `make bench`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow


def run_worker(script: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])


def test_core_worker(tiny_synth):
    r = run_worker("bench_core.py", "--worker", "--data", str(tiny_synth), "--threads", "1",
                   "2", "--steps", "2", "--rounds", "2", "--batch", "256", "--update-rounds", "2")
    one, two = r["runs"]
    assert one["train_samples_per_s"] > 0 and two["train_samples_per_s"] > 0
    assert one["embedding_update"] == "dense"
    assert [len(two["update_rounds"][k]) for k in ("dense", "lazy")] == [2, 2]
    assert one["eval_rows_per_s"] > 0 and 0 < one["auc_1e7_seconds"] < 60
    assert r["speedup_per_round_median"]["2"] > 0


def test_pair(tiny_synth):
    r = run_worker("bench_pair.py", "--data", str(tiny_synth), "--rounds", "1", "--seconds",
                   "0.1", "--batch", "256", "--no-write")
    assert r["pair_speedup"] > 0 and r["two_thread_speedup"] > 0
    assert len(r["rounds"]) == 1 and len(r["rounds"][0]["pair"]) == 2


def test_peers_oneepoch_worker(tiny_synth):
    r = run_worker("bench_peers.py", "--oneepoch-worker", "--data", str(tiny_synth),
                   "--threads", "1", "--rows", "2000", "--batch", "256")
    assert r["rows"] == 2000 and r["samples_per_s"] > 0 and r["train_logloss"] > 0


def test_scale_worker():
    r = run_worker("bench_scale.py", "--worker", "1000", "8", "--steps", "2")
    assert r["n_items"] == 1000 and r["step_ms_cpu"] > 0


def test_pretrain_worker():
    r = run_worker("bench_pretrain.py", "--worker", "--threads", "1,2", "--rows", "5000",
                   "--batch", "256", "--negatives", "256", "--dim", "16", "--steps", "1",
                   "--eval-pairs", "8")
    for run in r["runs"]:
        assert run["pairs_per_s"] > 0 and run["fraction_of_bound"] > 0
        assert run["eval_pairs_per_s"] > 0
    assert r["speedup_per_round_median"]["2"] > 0


def test_summarize_reads_the_committed_results(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("summarize", BENCH / "summarize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    mod.RESULTS = BENCH / "results"
    written = []
    mod.atomic_write_text = lambda path, text: written.append(text)  # leave the file alone
    mod.main()
    assert "## Side by side with peers" in written[0] and "not run" not in written[0]


def test_monitor_bench(tiny_synth):
    r = run_worker("bench_monitor.py", "--data", str(tiny_synth), "--steps", "3", "--calls",
                   "2000", "--batch", "256", "--no-write")
    assert r["base_step_ms"] > 0 and r["monitor_step_us_tensor"] > 0
    assert r["overhead_pct_of_step"] < 100
