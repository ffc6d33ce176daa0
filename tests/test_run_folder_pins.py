"""run.json pins the base a run trained on and the adapter it started from (resolved path and fingerprint): eval,
merge and export use exactly those from any directory, and refuse once their weights changed."""
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import CONFIGS, recipe_dict, write_recipe
from lora_tuner import AdapterPool, load_recipe, merge, run
from lora_tuner.errors import UserError
from lora_tuner.eval.evaluate import evaluate

pytestmark = pytest.mark.slow  # trains tiny runs


def scaled(folder: Path, factor: float) -> Path:
    """The adapter in folder with every B scaled: another adapter of the same shapes."""
    path = folder / "adapter_model.safetensors"
    save_file({k: v * factor if "lora_B" in k else v for k, v in load_file(path).items()}, path)
    return folder


@pytest.fixture
def started(tmp_path, tiny_run, alpaca_file, monkeypatch):
    """(tmp, run B trained from the adapter ./start, named by a relative path from tmp)."""
    shutil.copytree(tiny_run, tmp_path / "start")
    monkeypatch.chdir(tmp_path)
    recipe = recipe_dict(load_recipe(tiny_run / "recipe.yaml").model.name_or_path, alpaca_file,
                         init={"adapter": "start"}, train={"max_steps": 2, "save_steps": 100, "eval_steps": 100})
    folder = run(load_recipe(write_recipe(tmp_path, recipe)), output="b").folder
    return tmp_path, folder


def test_eval_measures_against_the_pinned_start_from_any_directory(started, monkeypatch):
    tmp, b = started
    elsewhere = tmp / "elsewhere"
    shutil.copytree(tmp / "start", elsewhere / "start")
    scaled(elsewhere / "start", 3.0)  # another adapter under the same relative name
    monkeypatch.chdir(elsewhere)
    report = evaluate(b)
    start = next(m for m in report.models if m.name.startswith("start"))
    pool = AdapterPool(str(tmp / "start"))
    pool.add("start", tmp / "start")
    from lora_tuner.verify.scoring import batches, loss, tokenized_rows
    from lora_tuner.run_folder import RunFolder

    rows = batches(tokenized_rows(pool.tokenizer, RunFolder(b).validation()[0], 256), pool.tokenizer.pad_token_id)
    with pool.use("start") as model:
        assert abs(start.loss - loss(model, rows)) < 1e-6


def test_a_start_adapter_changed_since_is_refused(started):
    tmp, b = started
    scaled(tmp / "start", 2.0)
    with pytest.raises(UserError, match="start adapter in .* is not the one this run trained on"):
        evaluate(b)
    shutil.rmtree(tmp / "start")
    with pytest.raises(UserError, match="start adapter this run trained on, .* is not there any more"):
        evaluate(b)


def test_a_base_changed_since_is_refused_unless_given_explicitly(tmp_path, tiny_base, alpaca_file):
    base = Path(shutil.copytree(tiny_base("llama"), tmp_path / "base"))
    recipe = recipe_dict(str(base), alpaca_file, train={"max_steps": 2, "save_steps": 100, "eval_steps": 100})
    folder = run(load_recipe(write_recipe(tmp_path, recipe)), output=str(tmp_path / "run")).folder
    weights = load_file(base / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, base / "model.safetensors", metadata={"format": "pt"})
    for call in (lambda: merge(folder, tmp_path / "merged", verify=False), lambda: evaluate(folder)):
        with pytest.raises(UserError, match="base in .* is not the one this run trained on .* pass --base"):
            call()
    assert not (tmp_path / "merged").exists()
    assert merge(folder, tmp_path / "merged", base=str(base), verify=False).files  # the user's explicit choice


def test_a_moved_run_keeps_its_own_random_base(tmp_path, alpaca_file):
    recipe = recipe_dict(None, alpaca_file, model={"init": "random", "config": CONFIGS["llama"], "tokenizer": "bytes",
                                                   "name_or_path": None},
                         train={"max_steps": 2, "save_steps": 100, "eval_steps": 100})
    folder = run(load_recipe(write_recipe(tmp_path, recipe)), output=str(tmp_path / "run")).folder
    moved = Path(shutil.move(folder, tmp_path / "moved"))
    report = merge(moved, tmp_path / "merged", dtype="fp32")
    assert report.verification.passed and Path(report.base) == (moved / "base-model").resolve()
    assert torch.equal(load_file(tmp_path / "merged/model.safetensors")["model.norm.weight"],
                       load_file(moved / "base-model/model.safetensors")["model.norm.weight"])
