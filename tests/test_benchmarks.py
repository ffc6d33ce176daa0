"""Benchmarks that must run where no GPU is: every line of benchmarks/gpu_epoch.py runs here on the tiny shape, so
the script a GPU session runs is not dead code."""
import json
import subprocess
import sys

import pytest

from helpers import ROOT, SHARED

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (SHARED / "data/alpaca_5000.json").is_file(),
                                                   reason="../shared is not here")]
BENCHMARKS = ROOT / "benchmarks"


def test_the_gpu_epoch_benchmark_runs_end_to_end_on_the_tiny_shape(tmp_path):
    command = [sys.executable, str(BENCHMARKS / "gpu_epoch.py"), "--shape", "tiny", "--steps", "4", "--rows", "300",
               "--batch-size", "2", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("gpu-epoch-*-tiny.json")).read_text())
    assert result["device"].startswith("cpu-")  # the device is named
    for name in ("llama-7b-lora-alpaca", "llama-7b-qlora-alpaca"):
        row = result["recipes"][name]
        assert row["tokens_per_s"] > 0 and row["plan_tokens_per_s"] > 0 and row["peak_memory_gb"] > 0
        assert row["epoch_tokens"] == 52002 * 128  # one Alpaca epoch, as plan counts it
        assert row["minutes_per_epoch"] == pytest.approx(row["epoch_tokens"] / row["tokens_per_s"] / 60, rel=0.01)


def test_benchmarks_that_measure_children_keep_their_own_process_light():
    """A child's peak RSS counts the pages of the process it was forked from: merge.py, export.py, scale.py and
    verify_memory.py time `cp` and other small children, so they must not hold torch themselves (a `cp` read 231 MB)."""
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import merge, export, scale, verify_memory; "
             "print('torch' in sys.modules, merge.measure([sys.executable, '-c', 'pass'])[1])")
    done = subprocess.run([sys.executable, "-c", probe, str(BENCHMARKS)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    torch_imported, child_mb = done.stdout.split()
    assert torch_imported == "False" and float(child_mb) < 100, done.stdout
