"""Hostile or broken input to run, merge and generate: one clear line, exit code 2, the output left untouched."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import CONFIGS, recipe_dict, write_recipe
from lora_tuner.cli import main


def copy_base(tiny_base, tmp: Path, name="base") -> Path:
    return Path(shutil.copytree(tiny_base("llama"), tmp / name))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def adapter_for(base_folder, out: Path, **lora) -> Path:
    torch.manual_seed(0)
    config = LoraConfig(**{"r": 4, "target_modules": "all-linear", "init_lora_weights": False, **lora})
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder), config).save_pretrained(out)
    return out


def other_size_base(tmp: Path) -> Path:
    model = AutoModelForCausalLM.from_config(
        __import__("transformers").AutoConfig.for_model(**{**CONFIGS["llama"], "hidden_size": 96}))
    model.save_pretrained(tmp / "wide")
    return tmp / "wide"


def run_args(tmp, tiny_base, alpaca, base=None, **sections):
    recipe = recipe_dict(str(base or tiny_base("llama")), alpaca, **sections)
    return ["run", write_recipe(tmp, recipe), "--output", str(tmp / "out")]


def merge_args(tmp, tiny_base, adapter, base=None, *extra):
    return ["merge", str(adapter), "--out", str(tmp / "out"), "--base", str(base or tiny_base("llama")), *extra]


def remote_code_base(tiny_base, tmp):
    base = copy_base(tiny_base, tmp)
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="custom_thing", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (base / "config.json").write_text(json.dumps(config))
    return base


def pickled_base(tiny_base, tmp):
    base = copy_base(tiny_base, tmp)
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    return base


def fp8_base(tiny_base, tmp):
    base = copy_base(tiny_base, tmp)
    tensors = load_file(base / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    return base


def pickled_adapter(tiny_base, tmp):
    folder = adapter_for(tiny_base("llama"), tmp / "adapter")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    return folder


def unfinished(tmp, args, recipe_text="model: {}\n"):
    """An unfinished run with a sealed checkpoint to continue from."""
    partial = tmp / ".out.partial"
    (partial / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (partial / "checkpoints" / "checkpoint-5" / "COMPLETE").write_text("ok\n")
    (partial / "recipe.yaml").write_text(recipe_text)
    return args


# id -> (build argv, fragments of the one error line)
CASES = {
    "truncated-base": (lambda t, b, a: run_args(t, b, a, base=(lambda p: (truncate(p / "model.safetensors"), p)[1])(
        copy_base(b, t))), ["model.name_or_path", "truncated or not a safetensors file"]),
    "garbage-base": (lambda t, b, a: run_args(t, b, a, base=(lambda p: ((p / "model.safetensors").write_bytes(
        b"\x00" * 64), p)[1])(copy_base(b, t))), ["model.name_or_path", "truncated or not a safetensors file"]),
    "pickled-base": (lambda t, b, a: run_args(t, b, a, base=pickled_base(b, t)), ["model.allow_pickle", "pickled"]),
    "remote-code": (lambda t, b, a: run_args(t, b, a, base=remote_code_base(b, t)),
                    ["model.trust_remote_code", "auto_map", "trust_remote_code: true"]),
    "escaping-name": (lambda t, b, a: run_args(t, b, a, output={"name": "../../etc"}), ["output.name", "../../etc"]),
    "absurd-rank": (lambda t, b, a: run_args(t, b, a, lora={"rank": 10**6}), ["lora.rank", "1000000"]),
    "absurd-length": (lambda t, b, a: run_args(t, b, a, data={"max_length": 10**9}),
                      ["data.max_length", "1000000000"]),
    "not-utf8-data": (lambda t, b, a: run_args(t, b, a, data={"path": (lambda p: (p.write_bytes(b"\xff\xfe[]"), str(p))[
        1])(t / "latin.json")}), ["data.path", "not UTF-8"]),
    "finished-run": (lambda t, b, a: ((t / "out").mkdir(), (t / "out" / "run.json").write_text("{}"),
                                      run_args(t, b, a))[2], ["output", "already holds a run", "--force"]),
    "unfinished-run": (lambda t, b, a: unfinished(t, run_args(t, b, a)),
                       ["an unfinished run", "--resume", "--force"]),
    "resume-nothing": (lambda t, b, a: run_args(t, b, a) + ["--resume"], ["--resume", "no unfinished run"]),
    "resume-other-recipe": (lambda t, b, a: unfinished(t, run_args(t, b, a) + ["--resume"]),
                            ["--resume", "another recipe"]),
    "deepspeed-missing": (lambda t, b, a: run_args(t, b, a, distributed={"strategy": "deepspeed-zero3"}),
                          ["distributed.strategy", "pip install deepspeed"]),
    "truncated-adapter": (lambda t, b, a: merge_args(t, b, (lambda p: (truncate(p / "adapter_model.safetensors"), p)[1])(
        adapter_for(b("llama"), t / "adapter"))), ["adapter", "truncated or not a safetensors file"]),
    "pickled-adapter": (lambda t, b, a: merge_args(t, b, pickled_adapter(b, t)), ["adapter", "adapter_model.bin"]),
    "adapter-other-size": (lambda t, b, a: merge_args(t, b, adapter_for(other_size_base(t), t / "adapter")),
                           ["adapter", "in the adapter but", "--base"]),
    "adapter-other-arch": (lambda t, b, a: merge_args(t, b, adapter_for(b("gptj"), t / "adapter")),
                           ["adapter", "transformer.h.0", "does not have"]),
    "merge-out-exists": (lambda t, b, a: ((t / "out").mkdir(), (t / "out" / "mine.txt").write_text("x"),
                                          merge_args(t, b, adapter_for(b("llama"), t / "adapter")))[2],
                         ["--out", "already holds a model export", "--force"]),
    "truncated-base-shard": (lambda t, b, a: merge_args(t, b, adapter_for(b("llama"), t / "adapter"), (lambda p: (
        truncate(p / "model.safetensors"), p)[1])(copy_base(b, t))), ["--base", "truncated"]),
    "fp8-base-tensor": (lambda t, b, a: merge_args(t, b, adapter_for(b("llama"), t / "adapter"), fp8_base(b, t)),
                        ["--base", "model.norm.weight", "F8_E4M3", "convert the base"]),
    "bad-shard-size": (lambda t, b, a: merge_args(t, b, adapter_for(b("llama"), t / "adapter"), None,
                                                  "--shard-size", "lots"), ["--shard-size", "'lots'"]),
    "dora-adapter": (lambda t, b, a: merge_args(t, b, adapter_for(b("llama"), t / "adapter", use_dora=True)),
                     ["adapter_config.json", "DoRA"]),
    "generate-other-arch": (lambda t, b, a: ["generate", "--adapter", str(adapter_for(b("gptj"), t / "adapter")),
                                             "--base", b("llama"), "--prompt", "hi"], ["adapter", "does not have"]),
    "generate-pickled-adapter": (lambda t, b, a: ["generate", "--adapter", str(pickled_adapter(b, t)), "--base",
                                                  b("llama"), "--prompt", "hi"], ["adapter", "never read"]),
}


def snapshot(folder: Path) -> dict:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_refused_cleanly(tmp_path, tiny_base, alpaca_file, case):
    build, fragments = CASES[case]
    args = build(tmp_path, tiny_base, alpaca_file)
    outputs = [tmp_path / "out", tmp_path / ".out.partial"]
    before = [snapshot(p) for p in outputs]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert [snapshot(p) for p in outputs] == before
