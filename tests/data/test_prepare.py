"""Data: the exact Alpaca template, loss only on response + EOS, and every bad row accounted for."""
import json

import pytest

from helpers import SHARED, make_trainer, recipe_dict, write_recipe
from lora_tuner import load_recipe
from lora_tuner.data.prepare import prepare_data
from lora_tuner.formats.templates import ALPACA, render
from lora_tuner.model.loading import load_base
from lora_tuner.model.lora import attach_lora
from lora_tuner.model.tokenizer import load_tokenizer

WITH_INPUT = {"instruction": "Add the two numbers.", "input": "2 + 3", "output": "5 is the answer."}
WITHOUT_INPUT = {"instruction": "Name a colour.", "input": "", "output": "Blue, like the sky."}


def test_alpaca_template_is_stanford_alpacas():
    assert render(ALPACA, "Sort {x}.", "b a") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSort {x}.\n\n### Input:\nb a\n\n### Response:")
    assert render(ALPACA, "Say hi.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:")


def prepared_trainer(tmp_path, tiny_base, rows, **sections):
    data_path = tmp_path / "rows.json"
    data_path.write_text(json.dumps(rows), encoding="utf-8")
    recipe = load_recipe(write_recipe(tmp_path, recipe_dict(
        tiny_base("llama"), str(data_path), data={"packing": False, "validation_size": 0, **sections.pop("data", {})},
        **sections)))
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe, tokenizer)
    model = attach_lora(load_base(recipe.model, recipe.quantization, recipe.model.name_or_path), recipe)
    return make_trainer(recipe, model, tokenizer, data, tmp_path), tokenizer


def trained_text(trainer, tokenizer) -> list[str]:
    return [tokenizer.decode([t for t in row["labels"] if t != -100]) for row in trainer.train_dataset]


@pytest.mark.parametrize("tokenizer", ["bytes", "llama"])
def test_only_response_and_eos_are_trained(tmp_path, tiny_base, tokenizer):
    model = {}
    if tokenizer == "llama":
        if not (SHARED / "tokenizers/llama/tokenizer.model").is_file():
            pytest.skip("../shared/tokenizers/llama is not here")
        model = {"tokenizer": str(SHARED / "tokenizers/llama/tokenizer.model")}
    trainer, tok = prepared_trainer(tmp_path, tiny_base, [WITH_INPUT, WITHOUT_INPUT], model=model)
    assert trained_text(trainer, tok) == [WITH_INPUT["output"] + tok.eos_token, WITHOUT_INPUT["output"] + tok.eos_token]
    first = trainer.train_dataset[0]["input_ids"]
    assert first[0] == tok.bos_token_id and tok.decode(first[1:]).startswith("Below is an instruction")


def test_train_on_inputs_trains_the_prompt_too(tmp_path, tiny_base):
    trainer, tok = prepared_trainer(tmp_path, tiny_base, [WITH_INPUT], data={"train_on_inputs": True})
    assert trained_text(trainer, tok)[0].endswith("### Response:5 is the answer." + tok.eos_token)


def test_dolly_and_chat_rows_train_on_the_reply_only(tmp_path, tiny_base):
    dolly = {"instruction": "Summarise.", "context": "A long text.", "response": "Short."}
    trainer, tok = prepared_trainer(tmp_path, tiny_base, [dolly], data={"format": "dolly"})
    assert trained_text(trainer, tok) == ["Short." + tok.eos_token]
    assert "### Input:\nA long text.\n\n### Response:" in tok.decode(trainer.train_dataset[0]["input_ids"])

    chat = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
                         {"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Goodbye."}]}
    (tmp_path / "chat").mkdir()
    trainer, tok = prepared_trainer(tmp_path / "chat", tiny_base, [chat], data={"format": "chat"})
    assert trained_text(trainer, tok) == ["Goodbye." + tok.eos_token]


def test_bad_rows_are_counted_reported_and_dropped(tmp_path, tiny_base):
    good = {"instruction": "x", "input": "", "output": "y"}
    rows = [good, {"instruction": "x"}, good, {"instruction": "x", "output": 5}, {"instruction": "x", "output": " "},
            "not a row", {"instruction": "x", "input": "", "output": "y" * 300}] + [{"instruction": "x"}] * 6 + [good]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    recipe = load_recipe(write_recipe(tmp_path, recipe_dict(tiny_base("llama"), str(path),
                                                            data={"validation_size": 0, "max_length": 256})))
    data = prepare_data(recipe, load_tokenizer(recipe.model))
    assert len(data.train) == 3 and data.rows_read == 14
    assert data.dropped == {
        "missing 'output'": [2, 8, 9, 10, 11, 12, 13],
        "'output' is not a string": [4],
        "empty 'output'": [5],
        "not an object (str)": [6],
        "longer than data.max_length=256 tokens": [7],
    }
    summary = data.dropped_summary()
    assert summary.startswith("11 of 14 rows unusable: missing 'output': 7 (rows 2, 8, 9, 10, 11, ...)")
    assert "longer than data.max_length=256 tokens: 1 (rows 7)" in summary
