"""Plain helpers the tests share (fixtures are in conftest.py): tiny models and adapters made on disk, recipes, the
places of the checkout, a CLI server on loopback."""
import copy
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from lora_tuner import load_recipe, run
from lora_tuner.model.tokenizer import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]  # the checkout
RECIPES = ROOT / "recipes"
SHARED = ROOT.parent / "shared"
IDS = dict(vocab_size=288, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, **IDS),
    "gptj": dict(model_type="gptj", n_embd=64, n_inner=128, n_layer=2, n_head=4, rotary_dim=8, n_positions=512,
                 **IDS),
}


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


PROMPTS = ["Reverse the word: apple", "Add 2 and 3", "Sort the letters: pear", "Say hello"]
QUESTION_TEMPLATE = {"with_input": "Q: {instruction}\n{input}\nA:", "without_input": "Q: {instruction}\nA:"}


def trained_run(tmp_path, base, alpaca_file, name, seed, **data) -> str:
    """A real run folder (recipe, training prompt), its LoRA weights then replaced by large random ones so that
    each adapter's greedy answers differ visibly from the others' and the base's."""
    recipe = recipe_dict(base, alpaca_file, train={"max_steps": 1, "save_steps": 100, "eval_steps": 100},
                         data={"validation_size": 0, **data}, output={"name": name})
    folder = run(load_recipe(write_recipe(tmp_path, recipe, f"{name}.yaml")), output=str(tmp_path / name)).folder
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
    torch.manual_seed(seed)
    for parameter_name, parameter in model.named_parameters():
        if "lora_" in parameter_name:
            parameter.data.normal_(0, 0.3)
    model.save_pretrained(tmp_path / f"{name}-weights")
    shutil.copy(tmp_path / f"{name}-weights/adapter_model.safetensors", folder / "adapter_model.safetensors")
    return str(folder)


def make_adapter(base_folder, folder, seed, **lora):
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    torch.manual_seed(seed)
    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "init_lora_weights": False,
                           **lora})
    get_peft_model(base, config).save_pretrained(folder)
    return str(folder)


def poison(pool, name):
    """The loaded adapter's weights turned NaN in memory (as a bad checkpoint would be, had it got in)."""
    with torch.no_grad():
        for parameter_name, parameter in pool.model.named_parameters():
            if f".{name}." in parameter_name:
                parameter.fill_(float("nan"))


def nan_weights(folder: Path) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, folder / "adapter_model.safetensors")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def cli_server(args: list[str], port: int, ready: str = "/health"):
    """`lora-tune ARGS` serving on loopback in a child process, once it answers `ready`; stopped after the block."""
    server = subprocess.Popen([sys.executable, "-m", "lora_tuner.cli", *args, "--port", str(port)],
                              stderr=subprocess.PIPE, text=True)
    try:
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}{ready}")
                break
            except httpx.ConnectError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.1)
        yield server
    finally:
        server.terminate()
        server.wait(timeout=60)
