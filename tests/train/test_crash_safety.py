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

from helpers import RECIPES, recipe_dict, write_recipe
from lora_tuner import load_recipe, run
from lora_tuner.cli import main
from lora_tuner.run_folder import RunFolder

pytestmark = pytest.mark.slow  # trains or merges models: the full tier

DEMO = str(RECIPES / "demo-tiny-cpu.yaml")
SHORT = ["--set", "train.max_steps=50", "--set", "train.save_steps=10", "--set", "train.save_total_limit=10"]


def adapter(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def as_from_a_shell() -> None:
    """In the child before it runs: SIGINT at its default and unblocked, as a shell starts a command, whatever this
    pytest process carries (a child inherits ignored and blocked signals; a Python started with SIGINT ignored never
    raises KeyboardInterrupt, which made the Ctrl-C tests fail only inside the full suite)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def start_run(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lora_tuner.cli", "run", DEMO, "--output", str(out), *SHORT],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_shell)


def signal_masks(pid: int) -> str:
    """The child's ignored / blocked / caught signal masks (/proc), for a failure message."""
    status = Path(f"/proc/{pid}/status").read_text()
    return " ".join(line for line in status.splitlines() if line.startswith(("SigIgn", "SigBlk", "SigCgt")))


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
    _, stderr = process.communicate(timeout=600)  # a hang guard only
    assert process.returncode == code, stderr[-2000:]
    assert f"stopped by {signum.name}" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert "stopping after this step" in stderr  # acknowledged at once
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


def test_killed_while_saving_after_the_last_checkpoint_finishes_without_training_again(tmp_path, uninterrupted):
    """As if killed in the final save: its last checkpoint sealed, the adapter and run.json not yet written.
    --resume finishes from that checkpoint: no step 51, the uninterrupted run's adapter."""
    out = tmp_path / "run"
    assert CliRunner().invoke(main, ["run", DEMO, "--output", str(out), *SHORT]).exit_code == 0
    partial = tmp_path / ".run.partial"
    out.rename(partial)
    for name in ("adapter_model.safetensors", "adapter_config.json", "run.json", "loss.png"):
        (partial / name).unlink()
    result = resume(out)
    assert result.exit_code == 0, result.output[-2000:]
    steps = [row["step"] for row in RunFolder(out).metrics()]
    assert max(steps) == 50 and RunFolder(out).manifest().train.steps == 50
    assert max_diff(adapter(out), uninterrupted) == 0


def test_ctrl_c_while_the_model_loads_exits_130_and_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    process = start_run(out)
    partial = tmp_path / ".run.partial"
    while not partial.exists():  # the run folder is created after the data is checked, before the model loads
        assert process.poll() is None, process.stderr.read()[-2000:]  # waits on the run, however busy the machine
        time.sleep(0.01)
    masks = signal_masks(process.pid)
    process.send_signal(signal.SIGINT)  # often lands while the recipe and rows are written into the new folder
    _, stderr = process.communicate(timeout=600)  # a hang guard only
    assert process.returncode == 130, f"{masks} (parent: SIGINT {signal.getsignal(signal.SIGINT)}, blocked " \
        f"{signal.pthread_sigmask(signal.SIG_BLOCK, [])})\n{stderr[-2000:]}"
    assert "Traceback" not in stderr and "Aborted" not in stderr
    assert not partial.exists() and not out.exists()


def test_a_stop_while_the_new_run_folder_is_filled_leaves_nothing(tmp_path, monkeypatch):
    """The window the test above often hits, made certain: Ctrl-C while the recipe and rows are being written."""
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunFolder, "write_validation", stopped)
    with pytest.raises(KeyboardInterrupt):
        run(load_recipe(DEMO), output=str(tmp_path / "run"))
    assert not list(tmp_path.iterdir())


def test_a_second_ctrl_c_stops_at_once_and_the_run_still_resumes(tmp_path, uninterrupted):
    out = tmp_path / "run"
    process = start_run(out)
    wait_for_checkpoint(process, out, 10)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=600)  # a hang guard only
    # a tiny step can finish, save and exit within those 50 ms: then the second Ctrl-C meets the interpreter's
    # shutdown, which has handed SIGINT back to the OS (-2; a shell shows 130 for both)
    assert process.returncode in (130, -signal.SIGINT) and "Traceback" not in stderr, stderr[-2000:]
    assert "stopping after this step" in stderr and "--resume" in stderr  # acknowledged, and how to go on
    result = resume(out)
    assert result.exit_code == 0, result.output[-2000:]
    assert max_diff(adapter(out), uninterrupted) <= 1e-6


def test_an_unfinished_run_with_nothing_sealed_does_not_block_a_rerun(tmp_path):
    partial = tmp_path / ".run.partial"
    (partial / "checkpoints" / "checkpoint-3").mkdir(parents=True)  # cut off before it was sealed
    result = CliRunner().invoke(main, ["run", DEMO, "--output", str(tmp_path / "run"), "--set", "train.max_steps=2"])
    assert result.exit_code == 0, result.output[-2000:]
    assert not partial.exists() and (tmp_path / "run" / "adapter_model.safetensors").is_file()
