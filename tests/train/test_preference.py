"""Preference tuning (train.method dpo / kto) on tiny models: the demo's rule is learnt, a run started from an SFT
adapter measures rewards against that adapter, and the result merges, verifies and pools like an SFT run."""
import json
import math
import subprocess
import sys

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from helpers import pooled_rows_match_fresh_models, recipe_dict, write_recipe
from lora_tuner import load_recipe, merge, run
from lora_tuner.cli import main
from lora_tuner.config.loader import load_recipe as load
from lora_tuner.data.demo_tasks import demo_preferences
from lora_tuner.formats.registry import FORMATS
from lora_tuner.data.prepare import prepare_data
from lora_tuner.formats.templates import ALPACA
from lora_tuner.eval.evaluate import evaluate
from lora_tuner.model.tokenizer import byte_tokenizer
from lora_tuner.run_folder import RunFolder

pytestmark = pytest.mark.slow  # trains models: the full tier
LN2 = math.log(2)  # DPO's loss while the policy equals its reference


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps(demo_preferences(300)), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def sft_run(tiny_base, alpaca_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft")
    recipe = recipe_dict(tiny_base("llama"), alpaca_file, train={"max_steps": 20, "eval_steps": 100})
    return run(load(write_recipe(folder, recipe)), output=str(folder / "sft"))


def dpo_recipe(folder, base, pairs, sft_folder=None, sections=None, **train):
    recipe = recipe_dict(base, pairs, data={"validation_size": 40},
                         train={"method": "dpo", "max_steps": 30, "eval_steps": 30, "save_steps": 30, **train},
                         **({"init": {"adapter": str(sft_folder)}} if sft_folder else {}), **(sections or {}))
    return load(write_recipe(folder, recipe))


@pytest.fixture(scope="module")
def dpo_run(tiny_base, pairs_file, sft_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo")
    return run(dpo_recipe(folder, tiny_base("llama"), pairs_file, sft_run.folder), output=str(folder / "dpo"))


def first_eval_loss(result) -> float:
    return RunFolder(result.folder).metrics()[0]["eval_loss"]


def test_the_demo_learns_a_preference_its_sft_data_never_taught(tmp_path):
    """The bundled demo, by name: held-out preference accuracy from 50% (the base is its own reference) to >= 90%."""
    recipe = load_recipe("demo-tiny-dpo", [f"output.root={tmp_path}", "train.max_steps=30", "data.limit=500",
                                           "data.validation_size=50"])
    result = run(recipe)
    assert abs(result.manifest.loss.eval_start - LN2) < 1e-5  # a fresh adapter is the base: the reference
    report = evaluate(result.folder)
    scores = {m.name: m for m in report.models}
    print(report.table())
    assert scores["base"].preference_accuracy == 0.5 and scores["base"].reward_margin == 0
    assert scores["base + adapter"].preference_accuracy >= 0.9 and scores["base + adapter"].reward_margin > 0
    assert report.pairs == 50 and report.held_out
    assert any("adapters disabled" in note for note in result.manifest.fast_path)


def test_a_run_from_an_sft_adapter_is_measured_against_that_adapter(dpo_run, sft_run, tiny_base, pairs_file, tmp_path):
    # Reference = the SFT adapter as it started, so the policy equals it at step 0: DPO's loss is exactly ln 2 ...
    assert abs(first_eval_loss(dpo_run) - LN2) < 1e-5
    assert any("init.adapter as it started" in note for note in dpo_run.manifest.fast_path)
    # ... which it is not when the reference is the base (the SFT adapter moved the model away from it).
    against_base = run(dpo_recipe(tmp_path, tiny_base("llama"), pairs_file, sft_run.folder, max_steps=1,
                                  dpo={"reference": "base"}), output=str(tmp_path / "against-base"))
    assert abs(first_eval_loss(against_base) - LN2) > 1e-3

    report = evaluate(dpo_run.folder)
    print(report.table())
    scores = {m.name: m for m in report.models}
    assert scores["start (init.adapter)"].preference_accuracy == 0.5
    assert scores["base + adapter"].preference_accuracy >= 0.8
    # The saved adapter is the trained one alone (not TRL's frozen reference copy), in the SFT adapter's layout.
    with safe_open(dpo_run.folder / RunFolder.ADAPTER_WEIGHTS, "pt") as saved, \
            safe_open(sft_run.folder / RunFolder.ADAPTER_WEIGHTS, "pt") as start:
        assert set(saved.keys()) == set(start.keys())
        moved = max((saved.get_tensor(k) - start.get_tensor(k)).abs().max().item() for k in saved.keys())
    assert moved > 1e-3 and not (dpo_run.folder / "ref").exists()


def test_a_dpo_run_merges_verified_and_pools_beside_its_sft_start(dpo_run, sft_run, tiny_base, tmp_path):
    report = merge(dpo_run.folder, tmp_path / "merged")  # default settings: verified on the held-out chosen replies
    assert report.verification.passed and report.verification.held_out

    mixed = pooled_rows_match_fresh_models(tiny_base("llama"), {"sft": sft_run.folder, "dpo": dpo_run.folder},
                                           "Reverse the word.")
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3  # DPO changed the SFT adapter's answers


def test_dpo_on_a_4bit_base_measures_against_that_base_with_no_copy(tiny_base, pairs_file, tmp_path):
    """QLoRA + DPO: the reference is the 4-bit base itself, adapters disabled (loss ln 2 before the first step)."""
    recipe = dpo_recipe(tmp_path, tiny_base("llama"), pairs_file, max_steps=12, sections={"quantization": {"mode": "4bit"}})
    result = run(recipe, output=str(tmp_path / "qlora-dpo"))
    loss = result.manifest.loss
    assert abs(loss.eval_start - LN2) < 1e-5 and loss.eval < loss.eval_start - 0.1
    assert any("adapters disabled" in note for note in result.manifest.fast_path)
    assert result.manifest.base_model.quantization.mode == "4bit"


def test_kto_learns_from_the_pairs_as_unpaired_rows(tiny_base, pairs_file, tmp_path):
    recipe = recipe_dict(tiny_base("llama"), pairs_file, data={"validation_size": 40},
                         train={"method": "kto", "max_steps": 30, "eval_steps": 30, "save_steps": 30, "batch_size": 8})
    result = run(load(write_recipe(tmp_path, recipe)), output=str(tmp_path / "kto"))
    data = result.manifest.data
    assert data.train_rows == 2 * (data.rows_read - data.dropped_rows - data.eval_rows)  # each pair: two rows
    assert result.manifest.loss.eval < result.manifest.loss.eval_start
    scores = {m.name: m for m in evaluate(result.folder).models}
    assert scores["base"].preference_accuracy == 0.5 and scores["base + adapter"].preference_accuracy >= 0.8


def test_preference_rows_in_every_format_become_pairs():
    prompt = [{"role": "user", "content": "2+2?"}]
    chat = FORMATS["preference-chat"].to_example
    explicit = chat({"prompt": prompt, "chosen": [{"role": "assistant", "content": "4"}],
                     "rejected": [{"role": "assistant", "content": "5"}]}, ALPACA)
    implicit = chat({"chosen": prompt + [{"role": "assistant", "content": "4"}],
                     "rejected": prompt + [{"role": "assistant", "content": "5"}]}, ALPACA)
    hh = FORMATS["hh"].to_example({"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4",
                                   "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"}, ALPACA)
    assert explicit == implicit == hh == {"prompt": prompt, "chosen": [{"role": "assistant", "content": "4"}],
                                          "rejected": [{"role": "assistant", "content": "5"}]}
    plain = FORMATS["preference"].to_example({"prompt": "Add.", "input": "2+2", "chosen": "4", "rejected": "5"}, ALPACA)
    assert plain["prompt"].endswith("### Instruction:\nAdd.\n\n### Input:\n2+2\n\n### Response:")
    cut = FORMATS["alpaca-cut"].to_example({"instruction": "Say.", "output": "one two three four five"}, ALPACA)
    assert (cut["chosen"], cut["rejected"]) == ("one two three four five", "one two")
    assert FORMATS["kto"].to_example({"prompt": "x", "completion": "y", "label": "yes"}, ALPACA) == \
        "'label' is not true or false"
    assert "not a Human/Assistant transcript" in FORMATS["hh"].to_example({"chosen": "4", "rejected": "5"}, ALPACA)


def test_unusable_pairs_are_dropped_and_counted(tmp_path, tiny_base, pairs_file):
    good = {"prompt": "Upper?", "chosen": "YES", "rejected": "yes"}
    rows = [good] * 10 + [{"prompt": "Same?", "chosen": "yes", "rejected": "yes"},
                          {"prompt": "Long?", "chosen": "Y" * 400, "rejected": "y"},
                          {"prompt": "Missing?", "chosen": "YES"}]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    recipe = dpo_recipe(tmp_path, tiny_base("llama"), str(path))
    data = prepare_data(recipe.model_copy(update={"data": recipe.data.model_copy(update={"validation_size": 0})}),
                        byte_tokenizer())
    assert data.dropped == {"chosen equals rejected": [11], "longer than data.max_length=256 tokens": [12],
                            "missing 'rejected'": [13]}
    pair = data.train[0].tokens
    assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == byte_tokenizer().eos_token_id


def test_a_killed_dpo_run_resumes_to_the_same_adapter(tmp_path):
    from test_crash_safety import adapter, max_diff, wait_for_checkpoint

    short = ["--set", "train.max_steps=12", "--set", "train.save_steps=6", "--set", "train.eval_steps=100",
             "--set", "data.limit=300", "--set", "data.validation_size=16"]
    whole = CliRunner().invoke(main, ["run", "demo-tiny-dpo", "--output", str(tmp_path / "whole"), *short])
    assert whole.exit_code == 0, whole.output
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "lora_tuner.cli", "run", "demo-tiny-dpo", "--output", str(out),
                                *short], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(process, out, 6)
    process.kill()
    process.wait()
    resumed = CliRunner().invoke(main, ["run", "demo-tiny-dpo", "--output", str(out), *short, "--resume"])
    assert resumed.exit_code == 0 and "resume: continuing from checkpoint-6" in resumed.output, resumed.output
    assert max_diff(adapter(out), adapter(tmp_path / "whole")) <= 1e-6


def test_plan_counts_both_sequences_of_a_pair_and_the_reference_pass(tiny_base, alpaca_file, pairs_file, tmp_path):
    from lora_tuner.plan.estimate import make_plan

    sft = load(write_recipe(tmp_path, recipe_dict(tiny_base("llama"), alpaca_file), "sft.yaml"))
    dpo = dpo_recipe(tmp_path, tiny_base("llama"), pairs_file)
    sft_plan, dpo_plan = make_plan(sft, "cpu"), make_plan(dpo, "cpu")
    assert dpo_plan.memory["activations"] == 2 * sft_plan.memory["activations"]  # same batch and max_length
    assert dpo_plan.flops_per_token > sft_plan.flops_per_token  # the reference's forward on every token
    assert any(line.startswith("method          dpo: two sequences per pair") for line in dpo_plan.lines())
    assert dpo_plan.data.note == "30 steps of 4 rows x 2 sequence(s)"
