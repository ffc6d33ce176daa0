"""Does an adapter fit a base? Checked before loading, so a mismatch is an error, never a silent wrong answer."""
import re
from pathlib import Path

import torch

from ..errors import fail
from ..export.lora_deltas import PEFT_PREFIX
from ..run_folder import RunFolder
from ..safe_files import open_safetensors

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def adapter_name(folder: str | Path) -> str:
    """The name an adapter folder is served or switched to by: its folder name as an identifier."""
    return re.sub(r"\W", "_", Path(folder).expanduser().resolve().name)


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
    if config.get("peft_type") != "LORA":
        raise fail(source, "adapter_config.json", f"peft_type {config.get('peft_type')!r} is not supported",
                   "only LoRA adapters can be pooled")
    trained_on = run.manifest().base_model.name_or_path if run.is_run else None
    if trained_on and base_id and not _same_base(trained_on, base_id):
        raise fail(source, "base", f"the adapter was trained on {trained_on!r}, the pool holds {base_id!r}",
                   "load the pool on the adapter's base (its run.json says which)")
    modules = dict(model.named_modules())
    with open_safetensors(weights, source, "adapter") as tensors:
        for key in tensors.keys():
            _check_weight(key, tensors.get_slice(key).get_shape(), modules, source, base_id)


def _check_weight(key: str, shape: list[int], modules: dict, source: str, base_id: str | None) -> None:
    if ".lora_A." not in key and ".lora_B." not in key:
        return
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


def _same_base(a: str, b: str) -> bool:
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b
