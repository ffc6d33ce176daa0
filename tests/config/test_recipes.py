"""Malformed recipes and data: each gives the promised one-line message, exit code 2, no traceback, nothing written."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from helpers import recipe_dict, write_recipe
from lora_tuner.cli import main


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def good(tmp_path, tiny_base, alpaca_file, **sections):
    return recipe_dict(tiny_base("llama"), alpaca_file, **sections)


def rows(tmp_path, data):
    return write(tmp_path, "rows.json", json.dumps(data))


def pickled_model(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    return str(folder)


def fake_adapter(tmp_path, rank):
    """An adapter folder as far as its config goes (the rank check reads nothing else)."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 16}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return str(folder)


def dpo(tmp_path, tiny_base, alpaca_file, train=None, **sections):
    return good(tmp_path, tiny_base, alpaca_file, train={"method": "dpo", **(train or {})}, **sections)


# (case id, recipe builder, expected fragments of the single error line)
CASES = [
    ("yaml-syntax", lambda t, b, a: write(t, "r.yaml", "model:\n  name_or_path: x\n bad: [1,\n"),
     ["YAML syntax error", "line"]),
    ("unknown-key", lambda t, b, a: good(t, b, a, lora={"rnak": 8}), ["lora.rnak", "unknown key", "lora.rank"]),
    ("unknown-section", lambda t, b, a: {**good(t, b, a), "trian": {}}, ["trian", "did you mean 'train'"]),
    ("wrong-type", lambda t, b, a: good(t, b, a, lora={"rank": "sixteen"}), ["lora.rank", "'sixteen'"]),
    ("bad-enum", lambda t, b, a: good(t, b, a, quantization={"mode": "3bit"}),
     ["quantization.mode", "'3bit'", "'none'", "'8bit'", "'4bit'"]),
    ("out-of-range", lambda t, b, a: good(t, b, a, lora={"dropout": 1.5}), ["lora.dropout", "1.5"]),
    ("absurd-rank", lambda t, b, a: good(t, b, a, lora={"rank": 100000}), ["lora.rank", "100000"]),
    ("missing-required", lambda t, b, a: {k: v for k, v in good(t, b, a).items() if k != "data"},
     ["data", "required"]),
    ("bad-run-name", lambda t, b, a: good(t, b, a, output={"name": "../escape"}), ["output.name", "../escape"]),
    ("random-without-config", lambda t, b, a: good(t, b, a, model={"init": "random", "name_or_path": None}),
     ["model", "model.config"]),
    ("unknown-model-type", lambda t, b, a: good(
        t, b, a, model={"init": "random", "tokenizer": "bytes", "config": {"model_type": "nosuch"}}),
     ["model.config", "model_type"]),
    ("missing-data-file", lambda t, b, a: good(t, b, a, data={"path": str(t / "nope.json")}),
     ["data.path", "nope.json", "not found"]),
    ("data-not-utf8", lambda t, b, a: good(t, b, a, data={"path": write(t, "latin.json", b'[{"instruction": "\xe9"}]')}),
     ["data.path", "not UTF-8"]),
    ("data-bad-json", lambda t, b, a: good(t, b, a, data={"path": write(t, "broken.json", '[{"instruction": ')}),
     ["data.path", "not valid JSON", "line 1"]),
    ("data-not-a-list", lambda t, b, a: good(t, b, a, data={"path": rows(t, {"instruction": "x"})}),
     ["data.path", "not a list"]),
    ("wrong-columns", lambda t, b, a: good(t, b, a, data={"path": rows(t, [{"question": "q", "answer": "a"}] * 3)}),
     ["data.format", "'instruction'", "'output'", "'answer'"]),
    ("empty-data", lambda t, b, a: good(t, b, a, data={"path": rows(t, [])}), ["data.path", "no rows"]),
    ("all-rows-too-long", lambda t, b, a: good(t, b, a, data={"max_length": 8}),
     ["data", "no usable rows", "data.max_length=8", "raise data.max_length"]),
    ("bad-rows-fail", lambda t, b, a: good(t, b, a, data={"bad_rows": "fail", "path": rows(t, [
        {"instruction": "a", "input": "", "output": "b"}] * 20 + [{"instruction": "c", "input": "", "output": ""}])}),
     ["data.bad_rows", "1 of 21 rows", "empty 'output'", "rows 21"]),
    ("validation-too-big", lambda t, b, a: good(t, b, a, data={"validation_size": 100000}),
     ["data.validation_size", "100000"]),
    ("pickled-weights", lambda t, b, a: good(t, b, a, model={"name_or_path": pickled_model(t)}),
     ["model.allow_pickle", "pickled", "safetensors"]),
    ("not-a-model-folder", lambda t, b, a: good(t, b, a, model={"name_or_path": str(t)}),
     ["model.name_or_path", "no config.json"]),
    ("dpo-settings-for-sft", lambda t, b, a: good(t, b, a, train={"dpo": {"beta": 0.2}}),
     ["train", "train.dpo applies to method: dpo only", "'sft'"]),
    ("dpo-on-sft-rows", lambda t, b, a: dpo(t, b, a, data={"format": "alpaca"}),
     ["data.format 'alpaca'", "train.method 'dpo'", "preference, preference-chat, hh, alpaca-cut"]),
    ("dpo-packing", lambda t, b, a: dpo(t, b, a, data={"packing": True}), ["data.packing applies to method: sft only"]),
    ("dpo-negative-beta", lambda t, b, a: dpo(t, b, a, train={"dpo": {"beta": -1}}), ["train.dpo.beta", "-1"]),
    ("dpo-alpaca-columns", lambda t, b, a: dpo(t, b, a),
     ["data.format", "'preference' needs columns ['prompt', 'chosen', 'rejected']", "'instruction'"]),
    ("dpo-columns-of-another-format", lambda t, b, a: dpo(t, b, a, data={"path": rows(t, [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}] * 3)}),
     ["data.format", "'preference' needs columns", "set data.format: hh (it reads these rows)"]),
    ("init-adapter-not-an-adapter", lambda t, b, a: good(t, b, a, init={"adapter": str(t)}),
     ["init.adapter", "holds no adapter_config.json"]),
    ("init-adapter-other-rank", lambda t, b, a: good(t, b, a, init={"adapter": fake_adapter(t, 4)}),
     ["lora.rank", "8, but init.adapter", "has 4", "set lora.rank: 4"]),
]


@pytest.mark.parametrize("case_id,build,expected", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_input_gives_one_clear_line(tmp_path, tiny_base, alpaca_file, case_id, build, expected, command):
    built = build(tmp_path, tiny_base, alpaca_file)
    recipe_path = built if isinstance(built, str) else write_recipe(tmp_path, built)
    out = tmp_path / "out"
    args = [command, recipe_path] + (["--output", str(out)] if command == "run" else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {recipe_path}: ") or "--set" in lines[0], lines[0]
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_every_problem_in_a_recipe_is_reported_at_once(tmp_path, tiny_base, alpaca_file):
    recipe = good(tmp_path, tiny_base, alpaca_file, lora={"rnak": 8, "alpha": "big"}, train={"epochs": -1})
    result = CliRunner().invoke(main, ["validate", write_recipe(tmp_path, recipe)])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3 and {"lora.rnak", "lora.alpha", "train.epochs"} <= {e.split(": ")[2] for e in errors}


def test_override_with_bad_syntax_names_the_flag(tmp_path, tiny_base, alpaca_file):
    result = CliRunner().invoke(main, ["validate", write_recipe(tmp_path, good(tmp_path, tiny_base, alpaca_file)),
                                       "--set", "train.learning_rate"])
    assert result.exit_code == 2 and "error: --set: 'train.learning_rate': expected KEY=VALUE" in result.output


def test_real_process_exits_2_without_traceback(tmp_path):
    recipe = write(tmp_path, "r.yaml", "model: {name_or_path: x}\ndata: {path: d.json}\noutput: {name: r}\nlora: {rnak: 4}\n")
    done = subprocess.run([sys.executable, "-m", "lora_tuner.cli", "validate", recipe], capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"error: {recipe}: lora.rnak: unknown key (value 4); did you mean 'lora.rank'?" in done.stderr
