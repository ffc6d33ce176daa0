"""Hostile or broken input to validate, run, merge, export, eval, generate and import: one clear line naming the file
or field, the value and the fix, exit code 2, and every output left as it was. One table, one case per row."""
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from helpers import CONFIGS, SHARED, make_adapter, nan_weights, recipe_dict, write_recipe
from lora_tuner.cli import main


@dataclass
class Ctx:
    tmp: Path
    base: Callable[..., str]  # kind -> tiny base folder
    alpaca: str
    disk: Callable[..., Path]  # size, read_only -> a small tmpfs
    bpe: Path | None = None  # a tiny LLaMA with a BPE tokenizer (GGUF-exportable), no chat template
    finished: Path | None = None  # a finished tiny run (copied before anything in it changes)
    env: dict = field(default_factory=dict)  # environment of the command

    def with_env(self, name: str, value: str, args: list[str]) -> list[str]:
        self.env[name] = value
        return args

    def run_copy(self, edit: Callable[[Path], None] | None = None) -> Path:
        folder = Path(shutil.copytree(self.finished, self.tmp / "run"))
        if edit:
            edit(folder)
        return folder

    def bpe_adapter(self) -> Path:
        """A PEFT adapter on the BPE base, its config naming that base."""
        folder = adapter_for(self.bpe, self.tmp / "adapter")
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(self.bpe)}))
        return folder

    def gguf(self, folder, name: str) -> str:
        from lora_tuner.export.gguf.export import export_gguf

        return export_gguf(folder, self.tmp / name, kind="f16", verify=False).file

    def budget(self, size: str, args: list[str]) -> list[str]:
        """args, run with a memory budget of `size` (plan/memory.py)."""
        self.env["LORA_TUNE_MEMORY"] = size
        return args

    def recipe(self, base=None, **sections) -> str:
        return write_recipe(self.tmp, recipe_dict(str(base or self.base("llama")), self.alpaca, **sections))

    def run(self, base=None, *extra, **sections) -> list[str]:
        return ["run", self.recipe(base, **sections), "--output", str(self.tmp / "out"), *extra]

    def validate(self, *extra, **sections) -> list[str]:
        return ["validate", self.recipe(**sections), *extra]

    def merge(self, adapter, base=None, *extra) -> list[str]:
        return ["merge", str(adapter), "--out", str(self.tmp / "out"), "--base", str(base or self.base("llama")),
                *extra]

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)


def copy_base(c: Ctx, name="base") -> Path:
    return Path(shutil.copytree(c.base("llama"), c.tmp / name))


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def adapter_for(base_folder, out: Path, **lora) -> Path:
    torch.manual_seed(0)
    config = LoraConfig(**{"r": 4, "target_modules": "all-linear", "init_lora_weights": False, **lora})
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder), config).save_pretrained(out)
    return out


def edited_adapter(c: Ctx, edit: Callable[[Path], None]) -> Path:
    folder = adapter_for(c.base("llama"), c.tmp / "adapter")
    edit(folder)
    return folder


def drop_lora_b(folder: Path) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors[next(name for name in tensors if "lora_B" in name)]
    save_file(tensors, folder / "adapter_model.safetensors")


def no_lora_keys(folder: Path) -> None:
    save_file({"base_model.model.model.norm.weight": torch.ones(64)}, folder / "adapter_model.safetensors")


def adapter_config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return edit


def mismatched_rank(folder: Path) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    name = next(name for name in tensors if "lora_A" in name)
    tensors[name] = torch.zeros(3, tensors[name].shape[1])
    save_file(tensors, folder / "adapter_model.safetensors")


def other_size_base(c: Ctx) -> Path:
    model = AutoModelForCausalLM.from_config(
        __import__("transformers").AutoConfig.for_model(**{**CONFIGS["llama"], "hidden_size": 96}))
    model.save_pretrained(c.tmp / "wide")
    return c.tmp / "wide"


def edited_config(c: Ctx, **changes) -> Path:
    base = copy_base(c)
    config = json.loads((base / "config.json").read_text())
    config.update(changes)
    (base / "config.json").write_text(json.dumps(config))
    return base


def shapes_not_config(c: Ctx) -> Path:
    """Weights of a wider model under the tiny model's config.json."""
    base = copy_base(c)
    shutil.copy(other_size_base(c) / "model.safetensors", base / "model.safetensors")
    return base


def pickled_base(c: Ctx) -> Path:
    base = copy_base(c)
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    return base


def fp8_base(c: Ctx) -> Path:
    base = copy_base(c)
    tensors = load_file(base / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    return base


def unfinished(c: Ctx, args: list[str], recipe_text="model: {}\n") -> list[str]:
    """An unfinished run with a sealed checkpoint to continue from."""
    partial = c.tmp / ".out.partial"
    (partial / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (partial / "checkpoints" / "checkpoint-5" / "COMPLETE").write_text("ok\n")
    (partial / "recipe.yaml").write_text(recipe_text)
    return args


def alias_bomb(c: Ctx) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    return c.file("bomb.yaml", "\n".join(lines) + "\nmodel: {name_or_path: *i}\n")


def yaml_with(c: Ctx, text: str) -> str:
    base = c.base("llama")
    return c.file("r.yaml", f"model: {{name_or_path: {base}}}\ndata: {{path: {c.alpaca}}}\noutput: {{name: r}}\n" + text)


TEMPLATE = {"with_input": "I: {instruction}\nX: {input}\nA:", "without_input": "I: {instruction}\nA:"}

# id -> (argv builder, fragments the single error line must hold: the file or field, the value, the fix)
CASES = {
    # recipes: values that used to pass validate and break later
    "alpha-inf": (lambda c: c.validate(lora={"alpha": float("inf")}), ["lora.alpha", "finite", "inf"]),
    "alpha-nan": (lambda c: c.run(lora={"alpha": float("nan")}), ["lora.alpha", "finite"]),
    "warmup-inf": (lambda c: c.run(train={"warmup": float("inf")}), ["train.warmup", "finite"]),
    "validation-size-inf": (lambda c: c.run(data={"validation_size": float("inf")}), ["data.validation_size", "finite"]),
    "seed-too-large": (lambda c: c.run(train={"seed": 99999999999999}), ["train.seed", "99999999999999"]),
    "seed-negative": (lambda c: c.validate(train={"seed": -1}), ["train.seed", "-1"]),
    "wandb-missing": (lambda c: c.run(train={"report_to": ["wandb"]}),
                      ["train.report_to", "'wandb' is not installed", "pip install wandb"]),
    "flash-attn-missing": (lambda c: c.run(model={"attn_implementation": "flash_attention_2"}),
                           ["model.attn_implementation", "flash-attn", "use auto"]),
    "liger-without-gpu": (lambda c: c.validate(train={"liger": True}), ["train.liger", "liger-kernel", "auto"]),
    "no-such-target-module": (lambda c: c.run(lora={"target_modules": ["nonexistent_proj"]}),
                              ["lora.target_modules", "nonexistent_proj", "q_proj"]),
    "template-typo": (lambda c: c.run(data={"template": {**TEMPLATE, "without_input": "I: {instrucion}\nA:"}}),
                      ["data.template", "{instrucion}", "{instruction}"]),
    "template-unknown-slot": (lambda c: c.validate(data={"template": {**TEMPLATE,
                                                                      "with_input": "{bogus} {instruction} {input}"}}),
                              ["data.template", "{bogus}"]),
    "template-no-input-slot": (lambda c: c.validate(data={"template": {**TEMPLATE, "with_input": "I: {instruction}"}}),
                               ["data.template", "no {input} placeholder"]),
    "heads-do-not-divide": (lambda c: c.validate(model={"init": "random", "tokenizer": "bytes", "name_or_path": None,
                                                        "config": {**CONFIGS["llama"], "num_attention_heads": 5}}),
                            ["model.config", "attention heads (5)", "model_type"]),
    "kv-heads-do-not-divide": (lambda c: c.validate(model={"init": "random", "tokenizer": "bytes", "name_or_path": None,
                                                           "config": {**CONFIGS["llama"], "num_key_value_heads": 3}}),
                               ["model.config", "num_key_value_heads", "divides"]),
    "longer-than-positions": (lambda c: c.validate(data={"max_length": 4096}), ["data.max_length", "4096", "512"]),
    "tokenizer-larger-than-vocab": (lambda c: c.validate(model={"tokenizer": str(
        SHARED / "tokenizers/llama/tokenizer.model")}),
        ["model.tokenizer", "32,000 tokens", "288"]),
    "duplicate-section": (lambda c: ["validate", yaml_with(c, "train: {max_steps: 1}\ntrain: {max_steps: 2}\n")],
                          ["duplicate key 'train'", "line", "give each key once"]),
    "duplicate-key": (lambda c: ["validate", yaml_with(c, "lora: {rank: 4, rank: 8}\n")], ["duplicate key 'rank'"]),
    "alias-bomb": (lambda c: ["validate", alias_bomb(c)], ["expands to", "aliases", "remove the nested aliases"]),
    "set-malformed": (lambda c: c.validate("--set", "train.max_steps=[1,"),
                      ["--set", "train.max_steps", "'[1,'", "quote it"]),
    "set-no-equals": (lambda c: c.validate("--set", "train.max_steps"), ["--set", "expected KEY=VALUE"]),
    "set-inside-a-value": (lambda c: c.validate("--set", "train.seed=1", "--set", "train.seed.x=1"),
                           ["train.seed.x", "cannot set inside"]),
    "no-such-bundled-recipe": (lambda c: ["validate", "no-such-recipe"],
                               ["no-such-recipe", "no bundled recipe", "demo-tiny-cpu"]),
    "escaping-name": (lambda c: c.run(output={"name": "../../etc"}), ["output.name", "../../etc"]),
    "absurd-rank": (lambda c: c.run(lora={"rank": 10**6}), ["lora.rank", "1000000"]),
    "absurd-length": (lambda c: c.run(data={"max_length": 10**9}), ["data.max_length", "1000000000"]),
    # data files
    "not-utf8-data": (lambda c: c.run(data={"path": c.file("latin.json", b"\xff\xfe[]")}), ["data.path", "not UTF-8"]),
    "data-is-a-folder": (lambda c: c.run(data={"path": str(Path(c.tmp / "rows").mkdir() or c.tmp / "rows")}),
                         ["data.path", "is a folder", "check the path"]),
    "empty-json-file": (lambda c: c.run(data={"path": c.file("empty.json", "")}), ["data.path", "not valid JSON"]),
    "jsonl-bad-line": (lambda c: c.validate(data={"path": c.file("rows.jsonl",
                                                                 '{"instruction": "a", "output": "b"}\n{\n')}),
                       ["data.path", "line 2", "not valid JSON"]),
    "parquet-garbage": (lambda c: c.validate(data={"path": c.file("rows.parquet", b"not parquet at all")}),
                        ["data.path", "not a readable parquet file", ".jsonl"]),
    "chat-rows-not-lists": (lambda c: c.validate(data={"format": "chat", "path": c.file(
        "chat.json", json.dumps([{"messages": "hi"}] * 3))}), ["data", "no usable rows", "'messages' is not a list"]),
    # model folders
    "truncated-base": (lambda c: c.run(base=(lambda p: (truncate(p / "model.safetensors"), p)[1])(copy_base(c))),
                       ["model.name_or_path", "truncated or not a safetensors file"]),
    "garbage-base": (lambda c: c.run(base=(lambda p: ((p / "model.safetensors").write_bytes(b"\x00" * 64), p)[1])(
        copy_base(c))), ["model.name_or_path", "truncated or not a safetensors file"]),
    "config-not-json": (lambda c: c.run(base=(lambda p: ((p / "config.json").write_text("{nope"), p)[1])(copy_base(c))),
                        ["config.json", "not valid JSON", "save_pretrained"]),
    "unknown-model-type": (lambda c: c.run(base=edited_config(c, model_type="no_such_arch")),
                           ["model.name_or_path", "'no_such_arch'", "upgrade transformers"]),
    "weights-of-another-config": (lambda c: c.run(base=shapes_not_config(c)),
                                  ["model.name_or_path", "has shape", "config.json says", "re-save"]),
    "pickled-base": (lambda c: c.run(base=pickled_base(c)), ["model.allow_pickle", "pickled"]),
    "remote-code": (lambda c: c.run(base=edited_config(c, model_type="custom_thing", auto_map={
        "AutoModelForCausalLM": "modeling_custom.CustomModel"})), ["model.trust_remote_code", "auto_map",
                                                                   "trust_remote_code: true"]),
    "model-path-is-a-file": (lambda c: c.run(base=c.alpaca), ["model.name_or_path", "not a model folder"]),
    "tokenizer-missing": (lambda c: c.run(model={"tokenizer": str(c.tmp / "nowhere")}),
                          ["model.tokenizer", "nowhere", "not found", "check the path"]),
    # output paths and unfinished runs
    "finished-run": (lambda c: ((c.tmp / "out").mkdir(), (c.tmp / "out" / "run.json").write_text("{}"), c.run())[2],
                     ["output", "already holds a run", "--force"]),
    "unfinished-run": (lambda c: unfinished(c, c.run()), ["an unfinished run", "--resume", "--force"]),
    "resume-nothing": (lambda c: c.run(None, "--resume"), ["--resume", "no unfinished run"]),
    "resume-other-recipe": (lambda c: unfinished(c, c.run(None, "--resume")), ["--resume", "another recipe"]),
    "read-only-output": (lambda c: ["run", c.recipe(), "--output", str(c.disk(2**20, read_only=True) / "run")],
                         ["output", "cannot write", "Read-only file system", "writable"]),
    "deepspeed-missing": (lambda c: c.run(distributed={"strategy": "deepspeed-zero3"}),
                          ["distributed.strategy", "pip install deepspeed"]),
    # adapters: merge, generate, export
    "truncated-adapter": (lambda c: c.merge(edited_adapter(c, lambda p: truncate(p / "adapter_model.safetensors"))),
                          ["adapter", "truncated or not a safetensors file"]),
    "adapter-config-not-json": (lambda c: c.merge(edited_adapter(c, lambda p: (p / "adapter_config.json").write_text(
        "{"))), ["adapter_config.json", "not valid JSON", "re-save"]),
    "adapter-missing-lora-b": (lambda c: c.merge(edited_adapter(c, drop_lora_b)), ["adapter", "no lora_B", "re-save"]),
    "adapter-rank-mismatch": (lambda c: c.merge(edited_adapter(c, mismatched_rank)),
                              ["adapter", "not one low-rank pair", "re-save"]),
    "pickled-adapter": (lambda c: c.merge(edited_adapter(c, lambda p: (p / "adapter_model.safetensors").rename(
        p / "adapter_model.bin"))), ["adapter", "adapter_model.bin"]),
    "adapter-other-size": (lambda c: c.merge(adapter_for(other_size_base(c), c.tmp / "adapter")),
                           ["adapter", "in the adapter but", "--base"]),
    "adapter-other-arch": (lambda c: c.merge(adapter_for(c.base("gptj"), c.tmp / "adapter")),
                           ["adapter", "transformer.h.0", "does not have"]),
    "merge-out-exists": (lambda c: ((c.tmp / "out").mkdir(), (c.tmp / "out" / "mine.txt").write_text("x"),
                                    c.merge(adapter_for(c.base("llama"), c.tmp / "adapter")))[2],
                         ["--out", "already holds a model export", "--force"]),
    "merge-disk-too-small": (lambda c: ["merge", str(adapter_for(c.base("llama"), c.tmp / "adapter")), "--out",
                                        str(c.disk(64 * 1024) / "out"), "--base", c.base("llama")],
                             ["--out", "needs", "KB", "free some space"]),
    "truncated-base-shard": (lambda c: c.merge(adapter_for(c.base("llama"), c.tmp / "adapter"), (lambda p: (
        truncate(p / "model.safetensors"), p)[1])(copy_base(c))), ["--base", "truncated"]),
    "fp8-base-tensor": (lambda c: c.merge(adapter_for(c.base("llama"), c.tmp / "adapter"), fp8_base(c)),
                        ["--base", "model.norm.weight", "F8_E4M3", "convert the base"]),
    "base-without-tokenizer": (lambda c: c.merge(adapter_for(c.base("llama"), c.tmp / "adapter"), (lambda p: (
        [f.unlink() for f in p.glob("tokenizer*")], p)[1])(copy_base(c))),
        ["--base", "no tokenizer files", "--no-verify"]),
    "bad-shard-size": (lambda c: c.merge(adapter_for(c.base("llama"), c.tmp / "adapter"), None, "--shard-size", "lots"),
                       ["--shard-size", "'lots'"]),
    "dora-adapter": (lambda c: c.merge(adapter_for(c.base("llama"), c.tmp / "adapter", use_dora=True)),
                     ["adapter_config.json", "DoRA"]),
    "into-dequantized-16-bit": (lambda c: c.merge(adapter_for(c.base("llama"), c.tmp / "adapter"), None, "--into",
                                                  "dequantized"), ["--into", "'dequantized' is not available"]),
    "generate-other-arch": (lambda c: ["generate", "--adapter", str(adapter_for(c.base("gptj"), c.tmp / "adapter")),
                                       "--base", c.base("llama"), "--prompt", "hi"], ["adapter", "does not have"]),
    "generate-nan-adapter": (lambda c: ["generate", "--adapter", str(edited_adapter(c, nan_weights)), "--base",
                                        c.base("llama"), "--prompt", "hi"], ["adapter", "NaN or infinite", "retrain"]),
    "generate-rank-as-text": (lambda c: ["generate", "--adapter", str(edited_adapter(c, adapter_config(r="sixteen"))),
                                         "--base", c.base("llama"), "--prompt", "hi"], ["adapter_config.json", "'sixteen'"]),
    "chat-rank-not-its-tensors": (lambda c: ["chat", "--adapter", str(edited_adapter(c, adapter_config(r=2))), "--base",
                                             c.base("llama")], ["adapter_config.json", "r is 2", "re-save"]),
    "serve-dora-adapter": (lambda c: ["serve", "--adapter", str(edited_adapter(c, adapter_config(use_dora=True))),
                                      "--base", c.base("llama"), "--port", "0"], ["adapter_config.json", "use_dora"]),
    "serve-adapter-without-lora-keys": (lambda c: ["serve", "--adapter", str(edited_adapter(c, no_lora_keys)), "--base",
                                                   c.base("llama"), "--port", "0"], ["adapter", "no LoRA"]),
    "generate-pickled-adapter": (lambda c: ["generate", "--adapter", str(edited_adapter(c, lambda p: (
        p / "adapter_model.safetensors").rename(p / "adapter_model.bin"))), "--base", c.base("llama"), "--prompt", "hi"],
        ["adapter", "never read"]),
    "export-other-arch": (lambda c: ["export", c.base("gptj"), "--out", str(c.tmp / "out.gguf")],
                          ["--format", "GPTJForCausalLM", "LLaMA-family"]),
    "gguf-lora-without-a-base-gguf": (lambda c: ["export", str(adapter_for(c.base("llama"), c.tmp / "adapter")),
                                                 "--format", "gguf-lora", "--out", str(c.tmp / "a.gguf")],
                                      ["--base-gguf", "none was given", "lora-tune export BASE"]),
    "gguf-lora-base-not-gguf": (lambda c: ["export", str(adapter_for(c.base("llama"), c.tmp / "adapter")), "--format",
                                           "gguf-lora", "--base-gguf", c.alpaca, "--out", str(c.tmp / "a.gguf")],
                                ["--base-gguf", "not a GGUF file"]),
    "gguf-lora-quantized": (lambda c: ["export", str(adapter_for(c.base("llama"), c.tmp / "adapter")), "--format",
                                       "gguf-lora", "--type", "q4_0", "--out", str(c.tmp / "a.gguf")],
                            ["--type", "'q4_0'", "writes f16"]),
    "base-gguf-for-a-full-export": (lambda c: ["export", c.base("llama"), "--base-gguf", c.alpaca, "--out",
                                               str(c.tmp / "a.gguf")], ["--base-gguf", "--format gguf-lora"]),
    "export-into-missing-folder": (lambda c: ["export", c.base("llama"), "--out", str(c.tmp / "no" / "x.gguf")],
                                   ["--out", "does not exist", "create it"]),
    "export-not-a-model": (lambda c: ["export", str(c.tmp), "--out", str(c.tmp / "x.gguf")],
                           ["SOURCE", "neither a run folder nor a merged model"]),
    "eval-not-a-run": (lambda c: ["eval", str(c.tmp)], ["folder", "not a lora-tune run folder"]),
    "import-not-gguf": (lambda c: ["import-gguf", c.alpaca, "--out", str(c.tmp / "out")], ["FILE", "not a GGUF file"]),
    # --force replaces outputs, never the command's inputs
    "merge-out-is-the-adapter": (lambda c: ["merge", str(adapter_for(c.base("llama"), c.tmp / "out")), "--out",
                                            str(c.tmp / "out"), "--base", c.base("llama"), "--force"],
                                 ["--out", "is the adapter", "outside it"]),
    "merge-out-holds-the-adapter": (lambda c: ["merge", str(adapter_for(c.base("llama"), c.tmp / "out" / "run")),
                                               "--out", str(c.tmp / "out"), "--base", c.base("llama"), "--force"],
                                    ["--out", "holds the adapter", "outside it"]),
    "merge-out-inside-the-base": (lambda c: (lambda base: ["merge", str(adapter_for(base, c.tmp / "adapter")),
                                                           "--out", str(base / "merged"), "--base", str(base),
                                                           "--force"])(copy_base(c, "out")),
                                  ["--out", "is inside the base", "outside it"]),
    "import-out-holds-the-gguf": (lambda c: ["import-gguf", c.file("m.gguf", b"GGUF" + bytes(300)), "--out", str(c.tmp),
                                             "--force"], ["--out", "holds the GGUF file", "outside it"]),
    "import-truncated-gguf": (lambda c: ["import-gguf", c.file("cut.gguf", b"GGUF\x03\x00\x00\x00" + bytes(192)),
                                         "--out", str(c.tmp / "out")], ["FILE", "cannot read this GGUF"]),
    "export-out-inside-source": (lambda c: (lambda base: ["export", str(base), "--out", str(base / "x.gguf"),
                                                          "--force"])(copy_base(c, "out")),
                                 ["--out", "is inside the SOURCE", "outside it"]),
    "generate-adapter-symlink-loop": (lambda c: ((c.tmp / "loop").symlink_to(c.tmp / "loop"), ["generate", "--adapter",
                                      str(c.tmp / "loop"), "--base", c.base("llama"), "--prompt", "hi"])[1],
                                      ["adapter", "cannot resolve the path", "real adapter folder"]),
    "eval-merged-pickle-only": (lambda c: ["eval", str(adapter_for(c.base("llama"), c.tmp / "adapter")), "--merged",
                                           str(pickled_base(c))], ["--merged", "pickled weights are never read"]),
    "eval-merged-not-a-model": (lambda c: ["eval", str(adapter_for(c.base("llama"), c.tmp / "adapter")), "--merged",
                                           str(c.tmp)], ["--merged", "not a merged model folder"]),
    "eval-merged-is-the-run": (lambda c: (lambda a: ["eval", str(a), "--merged", str(a)])(
        adapter_for(c.base("llama"), c.tmp / "adapter")), ["--merged", "not a merged model folder"]),
    # memory known up front: refused before anything is written
    "merge-does-not-fit": (lambda c: c.budget("100MB", c.merge(adapter_for(c.base("llama"), c.tmp / "adapter"))),
                           ["memory", "merge with verification needs about", "LORA_TUNE_MEMORY is 100.0 MB",
                            "--verify-rows", "--no-verify"]),
    "export-does-not-fit": (lambda c: c.budget("100MB", ["export", c.base("llama"), "--out", str(c.tmp / "x.gguf")]),
                            ["memory", "gguf q8_0 with verification needs about", "--no-verify"]),
    "generate-does-not-fit": (lambda c: c.budget("100MB", ["generate", "--adapter", str(adapter_for(
        c.base("llama"), c.tmp / "adapter")), "--base", c.base("llama"), "--prompt", "hi"]),
        ["memory", "in memory needs about", "4-bit"]),
    "memory-budget-not-a-size": (lambda c: c.budget("lots", c.merge(adapter_for(c.base("llama"), c.tmp / "adapter"))),
                                 ["LORA_TUNE_MEMORY", "'lots' is not a size"]),
    # lora-tune ui
    "ui-root-not-a-folder": (lambda c: ["ui", c.alpaca, "--port", "0"], ["ROOT", "is not a folder", "adapters/"]),
    "ui-nothing-finished": (lambda c: ["ui", str(c.tmp), "--port", "0"], ["ROOT", "no finished run", "--base"]),
    "ui-empty-key": (lambda c: ["ui", str(c.tmp), "--port", "0", "--api-key", " "], ["--api-key", "empty"]),
    # round 2 (issue 32): recipes
    "beta-true": (lambda c: c.validate(train={"method": "dpo", "dpo": {"beta": True}}, data={"format": "alpaca-cut"}),
                  ["train.dpo.beta", "True", "yes/no value"]),
    "rank-false": (lambda c: c.validate(lora={"rank": False}), ["lora.rank", "False", "yes/no value"]),
    "limit-true": (lambda c: c.run(data={"limit": True}), ["data.limit", "yes/no value"]),
    # data that used to end in a traceback
    "lone-surrogate-in-a-pair": (lambda c: c.validate(train={"method": "dpo"}, data={"format": "preference", "path": c.file(
        "pairs.jsonl", '{"prompt": "a\\ud800b", "chosen": "x", "rejected": "y"}\n' * 4)}),
        ["data", "not valid Unicode", "lone surrogate"]),
    "lone-surrogate-in-alpaca": (lambda c: c.run(data={"path": c.file(
        "rows.json", '[' + ','.join(['{"instruction": "a\\udc00", "output": "b"}'] * 4) + ']')}),
        ["data", "not valid Unicode"]),
    "deeply-nested-json": (lambda c: c.validate(data={"path": c.file("deep.json", "[" * 100_000 + "]" * 100_000)}),
                           ["data.path", "nests", "too deeply"]),
    "deeply-nested-jsonl": (lambda c: c.validate(data={"path": c.file("deep.jsonl", "[" * 100_000 + "]" * 100_000)}),
                            ["data.path", "line 1", "too deeply"]),
    "pairs-chat-without-a-chat-template": (lambda c: c.run(c.bpe, train={"method": "dpo"}, data={
        "format": "preference-chat", "path": c.file("chat.jsonl", CHAT_PAIR * 4)}),
        ["data.format", "'preference-chat'", "chat template", "text format"]),
    "hh-without-a-chat-template": (lambda c: c.run(c.bpe, train={"method": "dpo"}, data={
        "format": "hh", "path": c.file("hh.jsonl", HH_PAIR * 4)}), ["data.format", "'hh'", "chat template"]),
    "kto-chat-rows-without-a-chat-template": (lambda c: c.run(c.bpe, train={"method": "kto"}, data={
        "format": "preference-chat", "path": c.file("chat.jsonl", CHAT_PAIR * 4)}),
        ["data.format", "chat template"]),
    # empty values from flags and from the environment
    "empty-output-flag": (lambda c: ["merge", str(adapter_for(c.base("llama"), c.tmp / "adapter")), "--out", "",
                                     "--base", c.base("llama")], ["--out", "is empty"]),
    "empty-base-flag": (lambda c: ["merge", str(adapter_for(c.base("llama"), c.tmp / "adapter")), "--out",
                                   str(c.tmp / "out"), "--base", " "], ["--base", "is empty"]),
    "empty-host-flag": (lambda c: ["serve", "--base", c.base("llama"), "--host", "", "--port", "0"],
                        ["--host", "is empty"]),
    "empty-base-name": (lambda c: ["serve", "--base", c.base("llama"), "--base-name", "", "--port", "0"],
                        ["--base-name", "is empty"]),
    "empty-memory-variable": (lambda c: c.with_env("LORA_TUNE_MEMORY", "", c.merge(adapter_for(
        c.base("llama"), c.tmp / "adapter"))), ["LORA_TUNE_MEMORY", "set but empty", "unset"]),
    "empty-key-variable-serve": (lambda c: c.with_env("LORA_TUNE_API_KEY", "", ["serve", "--base", c.base("llama"),
                                                                                "--port", "0"]),
                                 ["LORA_TUNE_API_KEY", "empty", "anyone"]),
    "empty-key-variable-ui": (lambda c: c.with_env("LORA_TUNE_API_KEY", " ", ["ui", str(c.tmp), "--base",
                                                                              c.base("llama"), "--port", "0"]),
                              ["LORA_TUNE_API_KEY", "empty"]),
    "shard-size-zero": (lambda c: c.merge(adapter_for(c.base("llama"), c.tmp / "adapter"), None, "--shard-size", "0"),
                        ["--shard-size", "less than one byte"]),
    "max-body-zero": (lambda c: ["serve", "--base", c.base("llama"), "--max-body", "0MB", "--port", "0"],
                      ["--max-body", "less than one byte"]),
    "empty-text-in-a-recipe": (lambda c: c.run(output={"root": " "}), ["output.root", "is empty", "default"]),
    "run-name-too-long": (lambda c: c.run(output={"name": "a" * 300}), ["output.name", "at most 200"]),
    "output-name-too-long": (lambda c: ["run", c.recipe(), "--output", str(c.tmp / ("b" * 300))],
                             ["output", "cannot be used as a path", "File name too long"]),
    "merge-out-name-too-long": (lambda c: ["merge", str(make_adapter(c.base("llama"), c.tmp / "adapter", 0)), "--out",
                                           str(c.tmp / ("b" * 300)), "--base", c.base("llama")],
                                ["--out", "cannot be used as a path"]),
    "generate-zero-new-tokens": (lambda c: ["generate", "--adapter", str(make_adapter(c.base("llama"), c.tmp / "a", 0)),
                                            "--base", c.base("llama"), "--prompt", "hi", "--max-new-tokens", "0"],
                                 ["--max-new-tokens", "0 is not in the range"]),
    # servers beyond loopback
    "serve-every-interface-without-a-key": (lambda c: ["serve", "--base", c.base("llama"), "--host", "0.0.0.0",
                                                       "--port", "0"], ["--host", "'0.0.0.0'", "--insecure"]),
    "ui-every-interface-without-a-key": (lambda c: ["ui", str(c.tmp), "--base", c.base("llama"), "--host", "::",
                                                    "--port", "0"], ["--host", "'::'", "--api-key"]),
    "serve-base-name-is-an-adapters": (lambda c: ["serve", "--adapter", str(adapter_for(c.base("llama"), c.tmp / "legal")),
                                                  "--base", c.base("llama"), "--base-name", "legal", "--port", "0"],
                                       ["--base-name", "'legal' is also an adapter's name"]),
    # outputs of the wrong kind
    "merge-out-is-a-file": (lambda c: ["merge", str(adapter_for(c.base("llama"), c.tmp / "adapter")), "--out", c.file(
        "out", "mine"), "--base", c.base("llama"), "--force"], ["--out", "is a file", "folder path"]),
    "export-out-is-a-folder": (lambda c: ["export", str(c.bpe_adapter()), "--out", str(c.tmp / "out"), "--force"]
                               if (c.tmp / "out").mkdir() is None else None, ["--out", "is a folder", "file path"]),
    # a pair that does not fit: refused before llama.cpp (which ends the process) sees it
    "gguf-lora-base-of-another-shape": (lambda c: ["export", str(c.bpe_adapter()), "--format", "gguf-lora",
                                                   "--base-gguf", c.gguf(wider(c.bpe, c.tmp / "wide"), "wide.gguf"),
                                                   "--out", str(c.tmp / "out")],
                                        ["--base-gguf", "in the adapter but", "wide.gguf", "trained on"]),
    "gguf-lora-base-of-another-shape-unverified": (lambda c: ["export", str(c.bpe_adapter()), "--format", "gguf-lora",
                                                              "--base-gguf", c.gguf(wider(c.bpe, c.tmp / "wide"),
                                                                                    "wide.gguf"), "--no-verify",
                                                              "--out", str(c.tmp / "out")],
                                                   ["--base-gguf", "in the adapter but"]),
    "gguf-lora-base-with-fewer-layers": (lambda c: ["export", str(c.bpe_adapter()), "--format", "gguf-lora",
                                                    "--base-gguf", c.gguf(wider(c.bpe, c.tmp / "short", 1, hidden=64),
                                                                          "short.gguf"), "--out", str(c.tmp / "out")],
                                         ["--base-gguf", "model.layers.1.", "does not have"]),
    "gguf-lora-torn-base-gguf": (lambda c: ["export", str(c.bpe_adapter()), "--format", "gguf-lora", "--base-gguf",
                                            str(truncate(Path(c.gguf(c.bpe, "base.gguf")))), "--out",
                                            str(c.tmp / "out")], ["--base-gguf", "not a GGUF file"]),
    # run folders damaged or used in ways they cannot be
    "eval-nothing-desirable-to-score": (lambda c: ["eval", str(c.run_copy(kto_rows_all_undesirable))],
                                        ["validation.jsonl", "no response tokens"]),
    "eval-validation-rows-of-another-shape": (lambda c: ["eval", str(c.run_copy(rows_without_chosen))],
                                              ["validation.jsonl", "line 1", "not a prepared example"]),
    "eval-validation-not-json": (lambda c: ["eval", str(c.run_copy(lambda r: (r / "validation.jsonl").write_text(
        '{"row": 1\n{"row": 2}\n')))], ["validation.jsonl", "line 1", "not valid JSON"]),
    "eval-run-json-torn": (lambda c: ["eval", str(c.run_copy(lambda r: truncate(r / "run.json")))],
                           ["run.json", "not a run manifest"]),
    "eval-run-json-a-link-out": (lambda c: ["eval", str(c.run_copy(lambda r: ((r / "run.json").unlink(), (
        r / "run.json").symlink_to(c.file("secret.json", "{}")))))], ["run.json", "link to a file outside"]),
    "eval-empty-data-file": (lambda c: ["eval", str(c.run_copy()), "--data", c.file("none.json", "[]")],
                             ["data.path", "holds no rows"]),
    "merge-tokenizer-encodes-nothing": (lambda c: c.merge(adapter_for(c.base("llama"), c.tmp / "adapter"),
                                                          null_tokenizer(copy_base(c))),
                                        ["verification", "no response tokens", "--no-verify"]),
    "eval-merged-of-another-model": (lambda c: ["eval", str(c.run_copy()), "--merged", str(wider(
        c.bpe, c.tmp / "wide"))], ["--merged", "vocab_size 320", "288", "this run"]),
    "merge-run-recipe-torn": (lambda c: ["merge", str(c.run_copy(lambda r: (r / "recipe.yaml").write_text(
        "model: {name_or_path: ["))), "--out", str(c.tmp / "out")], ["recipe.yaml", "YAML syntax error"]),
}
CHAT_PAIR = json.dumps({"chosen": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}],
                        "rejected": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "No."}]}) \
    + "\n"
HH_PAIR = json.dumps({"chosen": "\n\nHuman: Say hi.\n\nAssistant: Hi.",
                      "rejected": "\n\nHuman: Say hi.\n\nAssistant: No."}) + "\n"


def wider(base: Path, out: Path, layers: int = 2, hidden: int = 96) -> Path:
    """A model of another shape with the same tokenizer."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    config.update({"hidden_size": hidden, "num_hidden_layers": layers})
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, out)
    return out


def null_tokenizer(base: Path) -> Path:
    """base with a tokenizer that encodes every text to nothing (BPE without merges or unknown token)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    for old in base.glob("tokenizer*"):
        old.unlink()
    backend = Tokenizer(models.BPE(vocab={"<pad>": 0, "<s>": 1, "</s>": 2}, merges=[]))
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>") \
        .save_pretrained(base)
    return base


def kto_rows_all_undesirable(run: Path) -> None:
    rows = [{"row": i, "held_out": True, "prompt": "Say hi.", "completion": "No.", "label": False} for i in range(4)]
    (run / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def rows_without_chosen(run: Path) -> None:
    rows = [{"row": i, "held_out": True, "prompt": "Say hi.", "rejected": "No."} for i in range(4)]
    (run / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def snapshot(folder: Path) -> dict:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_refused_cleanly(tmp_path, tiny_base, alpaca_file, small_disk, tiny_bpe_llama, tiny_run,
                                          case):
    build, fragments = CASES[case]
    context = Ctx(tmp_path, tiny_base, alpaca_file, small_disk, tiny_bpe_llama, tiny_run)
    args = build(context)
    outputs = [tmp_path / "out", tmp_path / ".out.partial"]
    before = [snapshot(p) for p in outputs]
    result = CliRunner().invoke(main, args, env=context.env)
    assert result.exit_code == 2, result.output[-3000:]
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert len(errors[0]) < 400  # one readable line, whatever the value
    assert [snapshot(p) for p in outputs] == before
    assert not list(tmp_path.glob(".out*.partial*")) or before[1]  # a refused run leaves nothing behind


def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path):
    """The 'billion laughs' recipe: refused with its count in well under a second and a few MB, not 3.5 GB."""
    import subprocess
    import sys

    bomb = alias_bomb(Ctx(tmp_path, None, "", None))
    # VmHWM is this process's own peak; ru_maxrss would carry over the forking pytest process's size
    script = ("import re, sys; from lora_tuner.config import load_recipe\ntry: load_recipe(sys.argv[1])\n"
              "except Exception as e: print(type(e).__name__)\n"
              "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024)")
    done = subprocess.run([sys.executable, "-c", script, bomb], capture_output=True, text=True, timeout=60)
    kind, peak_mb = done.stdout.split()
    assert kind == "UserError" and int(peak_mb) < 256, done.stdout
