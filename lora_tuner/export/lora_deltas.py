"""The adapter as weight deltas: each targeted base weight gets scale * B @ A added, on demand, in fp32."""
import json
import math
from pathlib import Path

import torch
from ..errors import fail
from ..safe_files import open_safetensors

PEFT_PREFIX = "base_model.model."
ROW_BLOCK = 256


class LoraDeltas:
    def __init__(self, folder: Path, source: str):
        config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not config_path.is_file() or not weights_path.is_file():
            hint = " (pickled adapter_model.bin is not read)" if (folder / "adapter_model.bin").exists() else ""
            raise fail(source, "adapter", f"{str(folder)!r} has no adapter_config.json + adapter_model.safetensors"
                       f"{hint}", "point at a run folder or a PEFT adapter saved as safetensors")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        _refuse_unsupported(config, source)
        self.config = config
        self.fan_in_fan_out = config.get("fan_in_fan_out", False)
        self._alpha = config["lora_alpha"]
        self._rslora = config.get("use_rslora", False)
        self._tensors = {}
        with open_safetensors(weights_path, source, "adapter") as weights:
            for key in weights.keys():
                self._tensors[key] = weights.get_tensor(key)
        self.targets = {_base_key(key) for key in self._tensors if ".lora_A." in key}

    def apply(self, base_key: str, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """weight + scale * B @ A, computed in fp32 and returned in out_dtype, for an adapted weight such as
        'model.layers.0.self_attn.q_proj.weight'; other weights are only cast."""
        if base_key not in self.targets:
            return weight.to(out_dtype) if weight.is_floating_point() else weight
        stem = PEFT_PREFIX + base_key.removesuffix(".weight")
        a = self._tensors[f"{stem}.lora_A.weight"].float()
        b = self._tensors[f"{stem}.lora_B.weight"].float()
        rank = a.shape[0]
        scale = self._alpha / (math.sqrt(rank) if self._rslora else rank)
        left, right = (a.T, b.T) if self.fan_in_fan_out else (b, a)  # fan_in_fan_out: weight stored transposed
        merged = torch.empty_like(weight, dtype=out_dtype)
        # Row blocks keep the fp32 temporaries in cache: ~5x faster than one whole-matrix addmm, same values.
        for start in range(0, weight.shape[0], ROW_BLOCK):
            rows = slice(start, start + ROW_BLOCK)
            merged[rows] = torch.addmm(weight[rows].float(), left[rows], right, alpha=scale)
        return merged

    def delta_shape(self, base_key: str) -> list[int]:
        """The shape of B @ A (as the base stores the weight), without computing it."""
        stem = PEFT_PREFIX + base_key.removesuffix(".weight")
        shape = [self._tensors[f"{stem}.lora_B.weight"].shape[0], self._tensors[f"{stem}.lora_A.weight"].shape[1]]
        return shape[::-1] if self.fan_in_fan_out else shape

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())


def _base_key(adapter_key: str) -> str:
    return adapter_key.removeprefix(PEFT_PREFIX).replace(".lora_A.weight", ".weight")


def _refuse_unsupported(config: dict, source: str) -> None:
    if config.get("peft_type") != "LORA":
        raise fail(source, "adapter_config.json", f"peft_type {config.get('peft_type')!r} is not LoRA",
                   "only LoRA adapters can be merged")
    if config.get("use_dora"):
        raise fail(source, "adapter_config.json", "use_dora is true: DoRA's magnitude rescaling is not merged here",
                   "use the adapter unmerged (peft), or train with lora.dora: false")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise fail(source, "adapter_config.json", "rank_pattern/alpha_pattern are set",
                   "merge with peft's merge_and_unload for adapters with per-module ranks")
    if config.get("modules_to_save"):
        raise fail(source, "adapter_config.json", f"modules_to_save {config['modules_to_save']} holds full weights",
                   "merge with peft's merge_and_unload for such adapters")
