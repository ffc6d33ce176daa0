"""Crash safety: a killed run resumes to the same adapter, half-written checkpoints are skipped, signals save."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import recipe_dict, write_recipe
from lora_tuner import load_recipe, run
from lora_tuner.cli import main

pytestmark = pytest.mark.slow  # trains or merges models: the full tier

DEMO = str(Path(__file__).resolve().parents[1] / "recipes/demo-tiny-cpu.yaml")
SHORT = ["--set", "train.max_steps=50", "--set", "train.save_steps=10", "--set", "train.save_total_limit=10"]


def adapter(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def start_run(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lora_tuner.cli", "run", DEMO, "--output", str(out), *SHORT],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(process: subprocess.Popen, out: Path, step: int) -> None:
    sealed = out.parent / f".{out.name}.partial" / "checkpoints" / f"checkpoint-{step}" / "COMPLETE"
    deadline = time.time() + 300
    while not sealed.exists():
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def resume(out: Path):
    return CliRunner().invoke(main, ["run", DEMO, "--output", str(out), *SHORT, "--resume"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("whole") / "run"
    result = CliRunner().invoke(main, ["run", DEMO, "--output", str(out), *SHORT])
    assert result.exit_code == 0, result.output
    return adapter(out)


def test_killed_run_resumes_to_the_same_adapter(tmp_path, uninterrupted):
    for step in (10, 30):  # an early and a late checkpoint, fixed so a failure reproduces
        out = tmp_path / f"killed-at-{step}"
        process = start_run(out)
        wait_for_checkpoint(process, out, step)
        process.kill()
        process.wait()
        assert not out.exists()  # nothing half-done is in place
        result = resume(out)
        assert result.exit_code == 0, result.output
        assert "resume: continuing from checkpoint-" in result.output
        assert max_diff(adapter(out), uninterrupted) <= 1e-6


def test_half_written_checkpoint_is_skipped(tmp_path, uninterrupted):
    out = tmp_path / "run"
    process = start_run(out)
    wait_for_checkpoint(process, out, 20)
    process.kill()
    process.wait()
    newest = out.parent / ".run.partial" / "checkpoints" / "checkpoint-20"
    (newest / "COMPLETE").unlink()  # as if the process died while writing it
    weights = newest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    result = resume(out)
    assert result.exit_code == 0, result.output
    assert "skipping checkpoint-20, it was not completely written" in result.output
    assert "continuing from checkpoint-10" in result.output
    assert max_diff(adapter(out), uninterrupted) <= 1e-6


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, signum, code):
    out = tmp_path / "run"
    process = start_run(out)
    wait_for_checkpoint(process, out, 10)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-2000:]
    assert f"stopped by {signum.name}" in stderr and "--resume" in stderr and "Traceback" not in stderr
    checkpoints = out.parent / ".run.partial" / "checkpoints"
    newest = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*") if (p / "COMPLETE").exists())
    assert newest > 10  # the stop saved its own checkpoint, after the last scheduled one


def test_same_seed_gives_the_same_adapter_bytes(tmp_path, tiny_base, alpaca_file):
    recipe = load_recipe(write_recipe(tmp_path, recipe_dict(tiny_base("llama"), alpaca_file,
                                                            train={"max_steps": 8}, lora={"dropout": 0.1})))
    first = run(recipe, output=str(tmp_path / "one")).folder / "adapter_model.safetensors"
    second = run(recipe, output=str(tmp_path / "two")).folder / "adapter_model.safetensors"
    assert first.read_bytes() == second.read_bytes()
    trained_b = [t for name, t in load_file(str(first)).items() if "lora_B" in name]  # B starts at zero
    assert trained_b and all(not torch.equal(t, torch.zeros_like(t)) for t in trained_b)


def test_full_disk_gives_one_line_and_keeps_the_last_checkpoint(small_disk):
    disk = small_disk(1500 * 1024)  # room for the tiny base and a couple of checkpoints
    out = disk / "run"
    args = ["run", DEMO, "--output", str(out), "--set", "train.max_steps=40", "--set", "train.save_steps=5",
            "--set", "train.save_total_limit=20"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if "error: " in line]
    assert len(errors) == 1 and "no space left on the device" in errors[0] and "--resume" in errors[0]
    kept = errors[0].split("while saving; ")[1].split(" is intact")[0]
    checkpoint = disk / ".run.partial" / "checkpoints" / kept
    assert (checkpoint / "COMPLETE").is_file()
    assert load_file(str(checkpoint / "adapter_model.safetensors"))  # readable, complete
