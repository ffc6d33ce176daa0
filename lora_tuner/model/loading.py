"""Load a base model the safe way: safetensors only unless allowed, no remote code unless asked for."""
import json
from pathlib import Path

import torch
from transformers import __version__ as transformers_version
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ..config.schema import ModelSection, QuantizationSection
from ..errors import fail, show
from ..safe_files import open_safetensors
from .dtypes import torch_dtype
from .packed_attention import register as register_packed_sdpa
from .quantization import bnb_config, keep_4bit_weights_unpacked

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_base_source(model: ModelSection, source: str) -> None:
    """What can be checked without loading weights: the folder exists, holds a config and safe weights."""
    if model.init == "random":
        random_config(model, source)
        return
    if not _is_local(model.name_or_path):
        return
    folder = Path(model.name_or_path)
    if not (folder / "config.json").is_file():
        raise fail(source, "model.name_or_path", f"{model.name_or_path!r} is not a model folder (no config.json)",
                   "point it at a folder saved with save_pretrained, or a hub id")
    _check_config(folder, model, source)
    names = [p.name for p in folder.iterdir()]
    if any(n.endswith(".safetensors") for n in names):
        for weights in folder.glob("*.safetensors"):
            with open_safetensors(weights, source, "model.name_or_path"):
                pass  # the header parses and the file is as long as it says
        return
    if any(n.endswith(PICKLE_SUFFIXES) for n in names) and not model.allow_pickle:
        raise fail(source, "model.allow_pickle", f"{model.name_or_path!r} has only pickled weights, which can run "
                   "code when loaded", "convert them to safetensors, or set model.allow_pickle: true if you trust them")
    if not model.allow_pickle:
        raise fail(source, "model.name_or_path", f"{model.name_or_path!r} holds no .safetensors weights",
                   "save the model with save_pretrained (safetensors is the default)")


def _check_config(folder: Path, model: ModelSection, source: str) -> None:
    """config.json parses, names a model type transformers knows, and needs no code from the folder (unless the
    recipe trusts it)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise fail(source, "model.name_or_path", f"{str(folder / 'config.json')!r} is not valid JSON "
                   f"({str(exc).splitlines()[0][:80]})", "re-save the model with save_pretrained") from None
    if not isinstance(config, dict):
        raise fail(source, "model.name_or_path", f"{str(folder / 'config.json')!r} is not a config object",
                   "re-save the model with save_pretrained")
    known = config.get("model_type") in CONFIG_MAPPING
    if "auto_map" in config and not known and not model.trust_remote_code:
        raise fail(source, "model.trust_remote_code", f"{model.name_or_path!r} needs Python code shipped with the "
                   f"model (auto_map {sorted(config['auto_map'])})",
                   "read that code, then set model.trust_remote_code: true if you trust it")
    if not known and "auto_map" not in config:
        raise fail(source, "model.name_or_path", f"model_type {show(config.get('model_type'))} in "
                   f"{str(folder / 'config.json')!r} is not one transformers {transformers_version} knows",
                   "upgrade transformers, or point at a causal LM it supports")


def random_config(model: ModelSection, source: str) -> PretrainedConfig:
    try:
        return AutoConfig.for_model(**model.config)
    except Exception as exc:  # ValueError, TypeError, and config classes' own validation errors
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        reason = lines[-1].removeprefix("ValueError: ")[:140]  # the last line says what is wrong, not where
        raise fail(source, "model.config", f"transformers refuses it: {reason}",
                   "fix those fields; model_type must be a causal LM type such as llama or gptj") from None


def build_random_base(model: ModelSection, seed: int, folder: Path, source: str) -> str:
    """Save a randomly initialised model of the recipe's config, to be loaded like any real base."""
    config = random_config(model, source)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch_dtype(model.dtype)).save_pretrained(folder)
    return str(folder)


def load_base(model: ModelSection, quantization: QuantizationSection, path: str,
              source: str = "recipe", sharded: bool = False) -> PreTrainedModel:
    """sharded: FSDP / ZeRO-3 will split the weights across ranks, so they are not placed on a device here."""
    try:
        base = AutoModelForCausalLM.from_pretrained(
            path,
            revision=model.revision,
            dtype=torch_dtype(model.dtype),
            attn_implementation=attention_for(model, path),
            quantization_config=bnb_config(quantization, model.dtype, sharded),
            trust_remote_code=model.trust_remote_code,
            use_safetensors=None if model.allow_pickle else True,
            device_map=None if sharded else _device_map(quantization),
        )
    except ValueError as exc:
        if "attention implementation" not in str(exc) and "attn_implementation" not in str(exc):
            raise
        raise fail(source, "model.attn_implementation", f"{model.attn_implementation!r} is not supported by "
                   f"this model ({str(exc).splitlines()[0][:100]})", "use auto or eager") from None
    if quantization.mode == "4bit":
        keep_4bit_weights_unpacked(base)
    return base


def attention_for(model: ModelSection, path: str) -> str | None:
    """auto: per-example packed SDPA (model/packed_attention.py) for architectures built on transformers' attention
    interface, else transformers' own choice (None)."""
    if model.attn_implementation != "auto":
        return model.attn_implementation
    config = AutoConfig.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    architecture = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return register_packed_sdpa() if getattr(architecture, "_supports_attention_backend", False) else None


def _device_map(quantization: QuantizationSection):
    # Quantized weights are created on their final device; everything else moves with the Trainer.
    if quantization.mode == "none":
        return None
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}


def _is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()
