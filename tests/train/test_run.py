"""The whole `lora-tune run` pipeline on tiny models: the loss falls and the saved adapter is the trained one."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from transformers import AutoTokenizer

from helpers import ROOT, recipe_dict, write_recipe
from lora_tuner import load_recipe, run
from lora_tuner.cli import main
from lora_tuner.formats.templates import ALPACA, render
from lora_tuner.model.loading import load_base
from lora_tuner.run_folder import RunFolder

pytestmark = pytest.mark.slow  # trains or merges models: the full tier

RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "recipe.yaml", "run.json", "metrics.jsonl", "loss.png")


def loss_fell(folder: Path) -> tuple[float, float]:
    losses = [row["loss"] for row in RunFolder(folder).metrics() if "loss" in row]
    fifth = max(1, len(losses) // 5)
    return sum(losses[:fifth]) / fifth, sum(losses[-fifth:]) / fifth


def test_demo_recipe_trains_offline_and_writes_the_run_folder(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["run", str(ROOT / "recipes/demo-tiny-cpu.yaml"), "--output", str(out)])
    assert result.exit_code == 0, result.output
    first, last = loss_fell(out)
    assert last < 0.8 * first, (first, last)
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    assert any(p.name.startswith("checkpoint-") for p in (out / "checkpoints").iterdir())
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["versions"]["trl"] and manifest["data"]["sha256"] and manifest["finished_at"]
    assert any("eval_loss" in row for row in RunFolder(out).metrics())
    assert "steps     300" in result.output  # the one-screen summary
    assert not list(tmp_path.glob(".*partial"))  # the temporary folder was renamed into place
    # the folder's tokenizer prompts by chat template exactly as training did
    saved = AutoTokenizer.from_pretrained(out)
    user = {"role": "user", "content": "Reverse the word.", "input": "apple"}
    assert saved.apply_chat_template([user], add_generation_prompt=True, tokenize=False) == \
        saved.bos_token + render(ALPACA, "Reverse the word.", "apple")
    examples, held_out = RunFolder(out).validation()
    assert held_out and len(examples) == manifest["data"]["eval_rows"] == 100


@pytest.mark.parametrize("kind", ["llama", "gptj"])
@pytest.mark.parametrize("mode,dtype", [("none", "bfloat16"), ("4bit", "float32")])
def test_adapter_reloads_with_plain_peft_to_the_same_logits(tmp_path, tiny_base, alpaca_file, kind, mode, dtype):
    recipe = load_recipe(write_recipe(tmp_path, recipe_dict(
        tiny_base(kind, dtype), alpaca_file, model={"dtype": dtype},
        quantization={"mode": mode, "compute_dtype": "float32"})))
    result = run(recipe, output=str(tmp_path / "run"))
    first, last = loss_fell(result.folder)
    assert last < 0.8 * first, (first, last)

    reloaded = PeftModel.from_pretrained(load_base(recipe.model, recipe.quantization, recipe.model.name_or_path),
                                         result.folder).eval()
    trained = result.model.eval()
    # TRL trains QLoRA adapters in bf16 (as the QLoRA paper does) and saves them so; peft upcasts them to fp32 on
    # load. Same values, different arithmetic: compare in the dtype they were trained in.
    trained_dtypes = {name: p.dtype for name, p in trained.named_parameters() if "lora_" in name}
    for name, param in reloaded.named_parameters():
        if name in trained_dtypes:
            param.data = param.data.to(trained_dtypes[name])
    ids = torch.tensor([[1, 70, 80, 90, 100, 110, 120, 130]])
    with torch.no_grad():
        expected, got = trained(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert torch.allclose(expected.float(), got.float(), atol=1e-5), (expected - got).abs().max()
    # and the adapter really changes the model: it is not the bare base
    with torch.no_grad(), reloaded.disable_adapter():
        assert (reloaded(input_ids=ids).logits - got).abs().max() > 1e-2


def test_finished_run_is_not_overwritten_without_force(tmp_path, tiny_base, alpaca_file):
    recipe_path = write_recipe(tmp_path, recipe_dict(tiny_base("llama"), alpaca_file, train={"max_steps": 2}))
    out = tmp_path / "run"
    first = CliRunner().invoke(main, ["run", recipe_path, "--output", str(out)])
    assert first.exit_code == 0, first.output
    adapter = (out / "adapter_model.safetensors").read_bytes()

    again = CliRunner().invoke(main, ["run", recipe_path, "--output", str(out)])
    assert again.exit_code == 2
    assert "already holds a run" in again.output and "--force" in again.output
    assert (out / "adapter_model.safetensors").read_bytes() == adapter

    forced = CliRunner().invoke(main, ["run", recipe_path, "--output", str(out), "--force",
                                       "--set", "train.seed=7"])
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "run.json").read_text())["seed"] == 7
    assert not list(tmp_path.glob(".run.*"))  # neither the partial nor the replaced folder is left behind
