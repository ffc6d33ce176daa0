"""What can be refused before any weight is loaded: everything transformers, peft, torch or TRL would reject at run
time, checked against the model's config (when it is local, known or given) and the installed packages. `lora-tune
validate` runs all of it; `lora-tune run` runs the same checks before it creates the run folder.

torch and transformers are imported inside the checks that need them (a local model, tokenizer or config): importing
them takes about 3 s, and a recipe with a hub model, tokenizer and data is checked without them."""
import importlib.util
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from .config import Recipe
from .data.prepare import prepare_data
from .data.reading import is_local
from .errors import UserError, about, fail, show
from .model.source import check_base_source
from .plan.known_configs import KNOWN, KNOWN_LINEARS, known_positions

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def check_recipe(recipe: Recipe) -> list[str]:
    """Raise UserError on the first broken input; return notes on what could only be checked when run."""
    with about(recipe.file):
        return _check(recipe)


def _check(recipe: Recipe) -> list[str]:
    notes = []
    check_base_source(recipe.model)
    check_environment(recipe)
    if recipe.init.adapter is not None and not Path(recipe.init.adapter).expanduser().exists():
        notes.append(f"init.adapter {recipe.init.adapter!r} is not there yet: train it before this run")
    else:
        check_init_adapter(recipe)
    tokenizer_name = recipe.model.tokenizer or recipe.model.name_or_path
    tokenizer = None
    if tokenizer_name == "bytes" or is_local(tokenizer_name):
        from .model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(recipe.model)
    else:
        notes.append(f"tokenizer {tokenizer_name!r} is on the hub: token lengths are checked when the run starts")
    notes += check_model_fit(recipe, tokenizer)
    if is_local(recipe.data.path):
        data = prepare_data(recipe, tokenizer)
        notes.append(f"data: {len(data.train)} train / {len(data.eval)} validation rows"
                     + (f"; would drop {data.dropped_summary()}" if data.dropped else ""))
    else:
        notes.append(f"data {recipe.data.path!r} is on the hub: its rows are checked when the run starts")
    return notes


def check_init_adapter(recipe: Recipe) -> None:
    """init.adapter is an accepted adapter (weights/adapter.py) that the recipe's lora section describes (merge and
    export read the recipe), and fits a local base's weights, compared by their headers before anything loads (a hub
    base: once it is loaded, model/lora.py)."""
    if recipe.init.adapter is None:
        return
    from .weights.adapter import LoraAdapter, has_adapter, read_config

    folder = Path(recipe.init.adapter).expanduser()
    if not has_adapter(folder):
        raise fail("init.adapter", f"{recipe.init.adapter!r} holds no adapter_config.json + "
                   "adapter_model.safetensors", "point at a finished run folder (adapters/<run>) or a PEFT adapter")
    config, lora = read_config(folder), recipe.lora
    for field, key, wanted in (("rank", "r", lora.rank), ("alpha", "lora_alpha", lora.alpha),
                               ("rslora", "use_rslora", lora.rslora), ("dora", "use_dora", lora.dora)):
        if config.get(key, False) != wanted:
            raise fail(f"lora.{field}", f"{wanted!r}, but init.adapter {recipe.init.adapter!r} has "
                       f"{config.get(key)!r}", f"set lora.{field}: {config.get(key)} (the adapter's own)")
    adapter = LoraAdapter(folder)
    base = recipe.model.name_or_path
    if recipe.model.init == "pretrained" and is_local(base) and (Path(base) / "config.json").is_file():
        adapter.check_fits(header_shapes(Path(base)), base, "init.adapter")


def header_shapes(folder: Path) -> dict[str, list[int]]:
    """Every tensor's shape in a model folder's safetensors, from their headers (nothing loaded)."""
    from .weights.safetensors import read_header
    from .weights.shards import base_shards

    try:
        shards = base_shards(folder, "model.name_or_path")
    except UserError:  # pickled weights (allowed by the recipe): not readable without loading them
        return {}
    return {name: info["shape"] for shard in shards for name, info in read_header(shard)[1].items()}


def check_environment(recipe: Recipe) -> None:
    """Optional packages and devices the recipe asks for."""
    for tracker in recipe.train.report_to:
        if importlib.util.find_spec(TRACKER_PACKAGES[tracker]) is None:
            raise fail("train.report_to", f"{tracker!r} is not installed",
                       f"pip install {TRACKER_PACKAGES[tracker]}, or remove it from train.report_to")
    if recipe.model.attn_implementation == "flash_attention_2" or recipe.train.liger is True:
        import torch
    if recipe.model.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
            raise fail("model.attn_implementation", "'flash_attention_2' needs the flash-attn package and a "
                       "CUDA GPU", "use auto (per-example SDPA on packed rows), or pip install flash-attn on a GPU")
    if recipe.train.liger is True and (importlib.util.find_spec("liger_kernel") is None or not torch.cuda.is_available()):
        raise fail("train.liger", "true, but Liger's kernels need the liger-kernel package and a CUDA GPU",
                   "set train.liger: auto, or pip install liger-kernel on a GPU")
    if recipe.distributed.strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise fail("distributed.strategy", f"{recipe.distributed.strategy!r} needs the deepspeed package",
                   "pip install deepspeed, or use ddp or fsdp")


def check_model_fit(recipe: Recipe, tokenizer) -> list[str]:
    """The recipe against the model's config: heads, LoRA target names, positions, vocabulary."""
    name = recipe.model.name_or_path
    if recipe.model.init == "pretrained" and not is_local(name):
        if name in KNOWN and tokenizer is None:
            # a bundled recipe's hub base: its public config is sound; only the recipe's length and target names can
            # disagree with it, and both are known without building it (KNOWN_LINEARS is tested against transformers)
            _check_positions(recipe, known_positions(name))
            _check_targets(recipe, set(KNOWN_LINEARS[name]), name)
            return []
        if name not in KNOWN and not isinstance(try_to_load_from_cache(name, "config.json", recipe.model.revision), str):
            return [f"model {name!r} is not on this machine: its config is checked when the run starts"]
    from .model.anatomy import meta_model
    from .plan.estimate import model_config

    config = model_config(recipe)
    text = config.get_text_config()
    heads, kv_heads = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
    if heads and text.hidden_size % heads:
        raise fail("model.config", f"hidden_size {text.hidden_size} is not divisible by num_attention_heads "
                   f"{heads}", "make hidden_size a multiple of num_attention_heads")
    if heads and kv_heads and heads % kv_heads:
        raise fail("model.config", f"num_attention_heads {heads} is not a multiple of num_key_value_heads "
                   f"{kv_heads}", "use a num_key_value_heads that divides num_attention_heads")
    _check_positions(recipe, getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None))
    if tokenizer is not None and len(tokenizer) > text.vocab_size:
        raise fail("model.tokenizer", f"the tokenizer has {len(tokenizer):,} tokens, the model's embedding "
                   f"{text.vocab_size:,}", "use the model's own tokenizer, or one no larger than its vocabulary")
    local_weights = recipe.model.init == "pretrained" and is_local(recipe.model.name_or_path)
    if not local_weights and recipe.lora.target_modules == "all-linear":
        return []  # nothing left that needs the model's layers (building them imports the model's code: ~2 s)
    model = meta_model(config)
    if local_weights:
        _weights_fit(model, Path(recipe.model.name_or_path))
    _check_targets(recipe, linear_names(model), type(model).__name__)
    return []


def linear_names(model) -> set[str]:
    """The last part of the name of every linear layer, as lora.target_modules names them (q_proj, fc_in, ...)."""
    import torch

    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)) or type(module).__name__ == "Conv1D"}


def _check_targets(recipe: Recipe, names: set[str], model_name: str) -> None:
    if recipe.lora.target_modules == "all-linear":
        return
    missing = [t for t in recipe.lora.target_modules if t.rsplit(".", 1)[-1] not in names]
    if missing:
        raise fail("lora.target_modules", f"{show(missing)} name no linear layer of {model_name}",
                   f"use all-linear or some of {sorted(names)}")


def _check_positions(recipe: Recipe, positions: int | None) -> None:
    if positions and recipe.data.max_length > positions:
        raise fail("data.max_length", f"{recipe.data.max_length} is longer than the model's {positions} "
                   "positions", f"set data.max_length to at most {positions}")


def _weights_fit(model, folder: Path) -> None:
    """The saved tensors have the shapes the config describes (transformers would stop on a size mismatch)."""
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    for name, shape in header_shapes(folder).items():
        if name in expected and shape != expected[name]:
            raise fail("model.name_or_path", f"{name!r} has shape {shape}, config.json says {expected[name]}",
                       "the weights and config.json belong to different models: re-save the model with save_pretrained")
