"""The demo recipe under torchrun with 2 CPU processes (gloo): one run folder, the same adapter as one process."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import RECIPES
from lora_tuner.cli import main
from lora_tuner.run_folder import RunFolder

pytestmark = pytest.mark.slow  # trains or merges models: the full tier

DEMO = str(RECIPES / "demo-tiny-cpu.yaml")
SHORT = ["--set", "train.max_steps=20", "--set", "train.logging_steps=2", "--set", "train.save_steps=10"]


def test_two_processes_train_like_one(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    two = tmp_path / "two"
    done = subprocess.run([torchrun, "--nproc_per_node=2", "-m", "lora_tuner.cli", "run", DEMO, "--output",
                           str(two), *SHORT, "--set", "train.batch_size=2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("global batch 4 on 2 process(es)") == 1  # rank 0 alone speaks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]  # one folder, nothing half-done left
    manifest = json.loads((two / "run.json").read_text())
    assert manifest["world_size"] == 2 and manifest["global_batch"] == 4
    losses = [row["loss"] for row in RunFolder(two).metrics() if "loss" in row]
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2
    assert len(list((two / "tensorboard").iterdir())) == 1  # one event file: only rank 0 logs

    base = AutoModelForCausalLM.from_pretrained(two / "base-model")
    PeftModel.from_pretrained(base, two)  # loads with plain peft

    one = tmp_path / "one"
    result = CliRunner().invoke(main, ["run", DEMO, "--output", str(one), *SHORT, "--set", "train.batch_size=4"])
    assert result.exit_code == 0, result.output
    a, b = load_file(str(two / "adapter_model.safetensors")), load_file(str(one / "adapter_model.safetensors"))
    # Same global batch of the same rows in the same order, and transformers normalises the loss by the tokens of
    # the whole global batch, so the maths is identical. What differs is summation order (gloo's all-reduce vs
    # one process), ~1e-7 per step, which Adam's normalisation lets grow over 20 steps: Adam divides each gradient
    # by its own running size, so a component whose gradient is near zero moves by up to the learning rate (3e-3)
    # whatever its sign noise. Measured 2e-6 to 1.2e-5 on different CPUs; a different batch or order moves the
    # weights by the size of the update itself (~1e-2).
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)
