"""Tiny random models (LLaMA and GPT-J shapes) saved to disk and loaded through the same path a real model takes.
Sizes are multiples of 32 so bitsandbytes 4-bit runs them on CPU."""
import json
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import CONFIGS, recipe_dict, write_recipe
from lora_tuner.config.schema import ModelSection
from lora_tuner.data.demo_tasks import demo_tasks
from lora_tuner.model.loading import build_random_base
from lora_tuner.model.tokenizer import byte_tokenizer


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
