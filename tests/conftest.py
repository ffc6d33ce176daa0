"""Tiny random models (LLaMA and GPT-J shapes) saved to disk and loaded through the same path a real model takes.
Sizes are multiples of 32 so bitsandbytes 4-bit runs them on CPU."""
import copy
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from lora_tuner.config.schema import ModelSection
from lora_tuner.data.demo_tasks import demo_tasks
from lora_tuner.model.loading import build_random_base
from lora_tuner.model.tokenizer import byte_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
IDS = dict(vocab_size=288, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, **IDS),
    "gptj": dict(model_type="gptj", n_embd=64, n_inner=128, n_layer=2, n_head=4, rotary_dim=8, n_positions=512,
                 **IDS),
}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """kind -> folder with a saved random base (safetensors) and the byte tokenizer."""
    made = {}

    def make(kind: str, dtype: str = "float32") -> str:
        if (kind, dtype) not in made:
            folder = tmp_path_factory.mktemp(f"base-{kind}-{dtype}")
            section = ModelSection(init="random", config=CONFIGS[kind], tokenizer="bytes", dtype=dtype)
            build_random_base(section, seed=0, folder=folder)
            byte_tokenizer().save_pretrained(folder)
            made[kind, dtype] = str(folder)
        return made[kind, dtype]

    return make


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "tasks.json"
    path.write_text(json.dumps(demo_tasks(400, seed=1)), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_base, alpaca_file) -> Path:
    """A finished run folder of a few steps on the tiny LLaMA (tests copy it before changing anything in it)."""
    from lora_tuner import load_recipe, run

    folder = tmp_path_factory.mktemp("tiny-run")
    recipe = recipe_dict(tiny_base("llama"), alpaca_file, train={"max_steps": 4, "eval_steps": 2, "save_steps": 100},
                         output={"name": "tiny-run"})
    return run(load_recipe(write_recipe(folder, recipe)), output=str(folder / "tiny-run")).folder


def sharded_base(folder, kind, shard="100KB", **config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**CONFIGS[kind], **config}))
    model.save_pretrained(folder, max_shard_size=shard)
    byte_tokenizer().save_pretrained(folder)
    return model


def random_adapter(base_model, folder, **lora):
    """A LoRA adapter with non-zero B (as after training), saved the standard PEFT way."""
    torch.manual_seed(1)
    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "init_lora_weights": False, **lora})
    peft_model = get_peft_model(base_model, config)
    peft_model.save_pretrained(folder)
    return peft_model


def pooled_rows_match_fresh_models(base: str, folders: dict, prompt: str) -> torch.Tensor:
    """One mixed batch through an AdapterPool holding `folders` (name -> adapter folder): a row per adapter and one
    for the bare base, each asserted equal to a freshly loaded model's logits. Returns the batch's logits."""
    from peft import PeftModel

    from lora_tuner import AdapterPool

    pool = AdapterPool(str(base), dtype="float32")
    for name, folder in folders.items():
        pool.add(name, folder)
    rows = [*folders, None]
    ids = pool.tokenizer([prompt] * len(rows), return_tensors="pt")
    with torch.no_grad():
        mixed = pool.model(**ids, adapter_names=[name or "__base__" for name in rows]).logits
    for i, name in enumerate(rows):
        fresh = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        fresh = PeftModel.from_pretrained(fresh, folders[name]) if name else fresh
        with torch.no_grad():
            alone = fresh.eval()(input_ids=ids["input_ids"][i:i + 1]).logits[0]
        assert (mixed[i] - alone).abs().max() < 1e-4, name
    return mixed


def recipe_dict(base: str, data_path: str, **sections) -> dict:
    """A small, fast recipe; keyword arguments replace keys inside sections."""
    recipe = {
        "model": {"name_or_path": base, "dtype": "float32"},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": data_path, "max_length": 256, "validation_size": 8},
        "train": {"max_steps": 30, "batch_size": 4, "learning_rate": 3e-3, "warmup": 0, "logging_steps": 2,
                  "eval_steps": 15, "save_steps": 15, "report_to": []},
        "output": {"name": "test-run"},
    }
    recipe = copy.deepcopy(recipe)
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def make_trainer(recipe, model, tokenizer, data, folder: Path):
    """The trainer `lora-tune run` would build for this recipe, writing into folder."""
    from accelerate import PartialState

    from lora_tuner.run_folder import RunFolder
    from lora_tuner.train.fast_path import resolve_fast_path
    from lora_tuner.train.methods import make_trainer as make

    resolved, _ = resolve_fast_path(recipe)
    return make(resolved, model, tokenizer, data, RunFolder(folder), PartialState())[0]


def write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> str:
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return str(path)


@pytest.fixture
def small_disk(tmp_path):
    """size in bytes -> a fresh tmpfs that small, so writing past it fails with ENOSPC; read_only: a tmpfs mounted
    read-only (needs root: else skip)."""
    mounts = []

    def mount(size: int, read_only: bool = False) -> Path:
        folder = tmp_path / f"small-{len(mounts)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: this process may still hold a file open


@pytest.fixture(scope="session")
def tiny_bpe_llama(tmp_path_factory):
    """A tiny LLaMA (GQA, untied head) saved with a small byte-level BPE tokenizer trained here: the byte tokenizer
    has no merges, which GGUF readers require."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("bpe-llama")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [f"{row['instruction']} {row['input']} {row['output']}" for row in demo_tasks(2000, seed=3)]
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = {**CONFIGS["llama"], "vocab_size": 320, "num_key_value_heads": 2, "tie_word_embeddings": False}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
