"""A recipe's base model source, checked without loading weights. transformers is imported only inside the checks
that need it: importing it imports torch (about 3 s), which `lora-tune validate` of a hub recipe never needs."""
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..config.schema import ModelSection
from ..data.reading import is_local
from ..errors import fail, show
from ..weights.safetensors import open_safetensors

if TYPE_CHECKING:
    from transformers import PretrainedConfig

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_base_source(model: ModelSection) -> None:
    """What can be checked without loading weights: the folder exists, holds a config and safe weights."""
    if model.init == "random":
        random_config(model)
        return
    if not is_local(model.name_or_path):
        return
    folder = Path(model.name_or_path)
    if not (folder / "config.json").is_file():
        raise fail("model.name_or_path", f"{model.name_or_path!r} is not a model folder (no config.json)",
                   "point it at a folder saved with save_pretrained, or a hub id")
    _check_config(folder, model)
    names = [p.name for p in folder.iterdir()]
    if any(n.endswith(".safetensors") for n in names):
        for weights in folder.glob("*.safetensors"):
            with open_safetensors(weights, "model.name_or_path"):
                pass  # the header parses and the file is as long as it says
        return
    if any(n.endswith(PICKLE_SUFFIXES) for n in names) and not model.allow_pickle:
        raise fail("model.allow_pickle", f"{model.name_or_path!r} has only pickled weights, which can run "
                   "code when loaded", "convert them to safetensors, or set model.allow_pickle: true if you trust them")
    if not model.allow_pickle:
        raise fail("model.name_or_path", f"{model.name_or_path!r} holds no .safetensors weights",
                   "save the model with save_pretrained (safetensors is the default)")


def _check_config(folder: Path, model: ModelSection) -> None:
    """config.json parses, names a model type transformers knows, and needs no code from the folder (unless the
    recipe trusts it)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise fail("model.name_or_path", f"{str(folder / 'config.json')!r} is not valid JSON "
                   f"({str(exc).splitlines()[0][:80]})", "re-save the model with save_pretrained") from None
    if not isinstance(config, dict):
        raise fail("model.name_or_path", f"{str(folder / 'config.json')!r} is not a config object",
                   "re-save the model with save_pretrained")
    from transformers import CONFIG_MAPPING
    from transformers import __version__ as transformers_version

    known = config.get("model_type") in CONFIG_MAPPING
    if "auto_map" in config and not known and not model.trust_remote_code:
        raise fail("model.trust_remote_code", f"{model.name_or_path!r} needs Python code shipped with the "
                   f"model (auto_map {sorted(config['auto_map'])})",
                   "read that code, then set model.trust_remote_code: true if you trust it")
    if not known and "auto_map" not in config:
        raise fail("model.name_or_path", f"model_type {show(config.get('model_type'))} in "
                   f"{str(folder / 'config.json')!r} is not one transformers {transformers_version} knows",
                   "upgrade transformers, or point at a causal LM it supports")


def random_config(model: ModelSection) -> "PretrainedConfig":
    from transformers import AutoConfig  # imports torch: only a random model's config needs it here

    try:
        return AutoConfig.for_model(**model.config)
    except Exception as exc:  # ValueError, TypeError, and config classes' own validation errors
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        reason = lines[-1].removeprefix("ValueError: ")[:140]  # the last line says what is wrong, not where
        raise fail("model.config", f"transformers refuses it: {reason}",
                   "fix those fields; model_type must be a causal LM type such as llama or gptj") from None
