"""Does an adapter fit a base? Checked before loading, so a mismatch is an error, never a silent wrong answer."""
import re
from pathlib import Path

import torch

from ..errors import fail
from ..export.lora_deltas import PEFT_PREFIX
from ..run_folder import RunFolder
from ..safe_files import open_safetensors

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def adapter_folder(path: str | Path) -> Path:
    """The adapter folder, resolved; a path that cannot be (a loop of symbolic links) is one line."""
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # Python raises RuntimeError for a symlink loop
        raise fail(str(path), "adapter", f"cannot resolve the path ({exc})", "point at a real adapter folder") from None


def adapter_name(folder: str | Path) -> str:
    """The name an adapter folder is served or switched to by: its folder name as an identifier."""
    return re.sub(r"\W", "_", adapter_folder(folder).name)


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or name == "__base__":  # peft reserves __base__ for "no adapter" rows
        raise fail("adapter", "name", f"{name!r} is not a plain identifier",
                   "use letters, digits and '_', e.g. support_v2")
    return name


def check_adapter(folder: Path, model: torch.nn.Module, base_id: str | None) -> None:
    """The folder holds a safetensors LoRA adapter whose every weight matches a module of this base."""
    source = str(folder)
    run = RunFolder(folder)
    weights = run / RunFolder.ADAPTER_WEIGHTS
    if not run.has_adapter:
        pickled = " (a pickled adapter_model.bin is never read)" if (folder / "adapter_model.bin").exists() else ""
        raise fail(source, "adapter", f"no adapter_config.json + adapter_model.safetensors{pickled}",
                   "point at a lora-tune run folder or a PEFT adapter saved as safetensors")
    config = run.adapter_config()
    _check_config(config, source)
    trained_on = run.manifest().base_model.name_or_path if run.is_run else None
    if trained_on and base_id and not same_base(trained_on, base_id):
        raise fail(source, "base", f"the adapter was trained on {trained_on!r}, the pool holds {base_id!r}",
                   "load the pool on the adapter's base (its run.json says which)")
    modules = dict(model.named_modules())
    with open_safetensors(weights, source, "adapter") as tensors:
        keys = list(tensors.keys())
        if not any(".lora_A." in key for key in keys):
            raise fail(source, "adapter", "adapter_model.safetensors holds no LoRA weights (lora_A/lora_B)",
                       "re-save the adapter with peft's save_pretrained")
        ranks = {}
        for key in keys:
            _check_weight(key, tensors.get_slice(key).get_shape(), modules, source, base_id)
            if not torch.isfinite(tensors.get_tensor(key)).all():
                raise fail(source, "adapter", f"{key!r} holds NaN or infinite values", "retrain or re-save the adapter")
            stem, _, _ = key.partition(".lora_")
            shape = tensors.get_slice(key).get_shape()
            ranks.setdefault(stem, {})["A" if ".lora_A." in key else "B"] = shape[0] if ".lora_A." in key else shape[1]
    _check_ranks(ranks, config, source)


def _check_config(config: dict, source: str) -> None:
    """What peft would load but the pool cannot serve, or an r that is not a rank."""
    if config.get("peft_type") != "LORA":
        raise fail(source, "adapter_config.json", f"peft_type {config.get('peft_type')!r} is not supported",
                   "only LoRA adapters can be pooled")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise fail(source, "adapter_config.json", f"r is {rank!r}, not a positive whole number", "re-save the adapter")
    for feature in ("use_dora", "modules_to_save", "layer_replication"):
        if config.get(feature):
            raise fail(source, "adapter_config.json", f"{feature} is set: per-row adapter batches do not support it",
                       "serve it alone with peft, or train without it")


def _check_ranks(ranks: dict, config: dict, source: str) -> None:
    """Each module's lora_A and lora_B form one pair of the configured rank (or its rank_pattern entry)."""
    pattern = config.get("rank_pattern") or {}
    for stem, found in ranks.items():
        if set(found) != {"A", "B"} or found["A"] != found["B"]:
            raise fail(source, "adapter", f"{stem}: lora_A and lora_B are not one low-rank pair ({found})",
                       "re-save the adapter")
        module = stem.removeprefix(PEFT_PREFIX)
        wanted = next((r for name, r in pattern.items() if module == name or module.endswith("." + name)),
                      config["r"])
        if found["A"] != wanted:
            raise fail(source, "adapter_config.json", f"r is {wanted} but {stem} has rank {found['A']}",
                       "re-save the adapter so its config matches its weights")


def _check_weight(key: str, shape: list[int], modules: dict, source: str, base_id: str | None) -> None:
    if ".lora_A." not in key and ".lora_B." not in key:
        raise fail(source, "adapter", f"{key!r} is not a LoRA weight (lora_A/lora_B): embeddings, magnitudes and "
                   "full modules are not served here", "serve it alone with peft, or train LoRA on linear layers")
    module_name = key.removeprefix(PEFT_PREFIX).split(".lora_")[0]
    module = modules.get(module_name)
    if module is None:
        raise fail(source, "adapter", f"targets {module_name!r}, which base {base_id!r} does not have",
                   "this adapter belongs to another architecture; load it on its own base")
    base_layer = getattr(module, "base_layer", module)
    in_features, out_features = base_layer.in_features, base_layer.out_features
    fits = shape[1] == in_features if ".lora_A." in key else shape[0] == out_features
    if not fits:
        raise fail(source, "adapter", f"{key!r} has shape {list(shape)}, base {base_id!r} has {module_name} "
                   f"{in_features}->{out_features}", "this adapter belongs to a base of another size")


def same_base(a: str | None, b: str) -> bool:
    """Two names of one base: the same folder, or the same hub id."""
    if a is None:
        return False
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b
