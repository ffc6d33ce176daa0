"""What LoRA adapter lora-tune accepts, decided here once for merge, every export, AdapterPool (generate, chat, serve,
ui) and a recipe's init.adapter: a standard PEFT folder (adapter_config.json + adapter_model.safetensors) holding
only lora_A/lora_B pairs, each pair one low rank that its config (r, or its rank_pattern entry) states, finite,
and, against a base, every adapted weight present in it with the adapter's shape. Anything else is refused in one
line before any library sees the pair: peft would load a mismatched adapter with a warning, llama.cpp would crash.

DoRA (magnitudes), modules_to_save (full weights) and layer_replication change the model beyond W + scale * B @ A,
which is all that merge, the LoRA GGUF and per-row adapter batches apply."""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import about, fail, show
from .safetensors import open_safetensors

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's prefix of every saved key
UNSUPPORTED = {"use_dora": "DoRA's magnitude vectors", "modules_to_save": "full copies of whole modules",
               "layer_replication": "replicated layers"}


def has_adapter(folder: Path) -> bool:
    return (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()


def read_config(folder: Path) -> dict:
    """adapter_config.json as a dict, or one line naming the folder and saying why it cannot be read."""
    path, source = folder / CONFIG, str(folder)
    if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
        raise fail(CONFIG, "is a link to a file outside the adapter folder", "replace the link with the "
                   "adapter's own file", source=source)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise fail(CONFIG, f"is not valid JSON ({str(exc).splitlines()[0][:80]})",
                   "re-save the adapter with save_pretrained", source=source) from None
    if not isinstance(config, dict) or not isinstance(config.get("lora_alpha", 0), (int, float)):
        raise fail(CONFIG, "is not a PEFT adapter config", "re-save the adapter with save_pretrained", source=source)
    return config


@dataclass
class Pair:
    """One adapted weight: delta = scale * B @ A in the base's layout ([out, in]), or transposed (fan_in_fan_out)."""
    a: torch.Tensor  # [rank, in]
    b: torch.Tensor  # [out, rank]
    scale: float


class LoraAdapter:
    """An accepted adapter: its config and its pairs by base weight name ('model.layers.0.self_attn.q_proj.weight').

    Args:
        folder: the adapter folder (a run folder or a PEFT adapter folder), named in error lines.
    """

    def __init__(self, folder: Path):
        self.folder, self.source = Path(folder), str(folder)
        if not has_adapter(self.folder):
            pickled = " (a pickled adapter_model.bin is never read)" if (self.folder / "adapter_model.bin").exists() \
                else ""
            raise fail("adapter", f"{str(folder)!r} has no adapter_config.json + adapter_model.safetensors"
                       f"{pickled}", "point at a run folder or a PEFT adapter saved as safetensors", source=self.source)
        self.config = read_config(self.folder)
        self._check_config()
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        with about(self.source), open_safetensors(self.folder / WEIGHTS, "adapter") as tensors:
            found = {key: tensors.get_tensor(key) for key in tensors.keys()}
        self.pairs = self._pairs(found)

    def _check_config(self) -> None:
        config = self.config
        if config.get("peft_type") != "LORA":
            raise fail(CONFIG, f"peft_type {show(config.get('peft_type'))} is not LoRA",
                       "only LoRA adapters are merged, exported and served", source=self.source)
        rank = config.get("r")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise fail(CONFIG, f"r is {show(rank)}, not a positive whole number", "re-save the adapter", source=self.source)
        if not isinstance(config.get("lora_alpha"), (int, float)) or isinstance(config["lora_alpha"], bool):
            raise fail(CONFIG, f"lora_alpha is {show(config.get('lora_alpha'))}, not a number",
                       "re-save the adapter", source=self.source)
        for feature, what in UNSUPPORTED.items():
            if config.get(feature):
                raise fail(CONFIG, f"{feature} is set: the adapter holds {what}, beyond W + B @ A",
                           "use it unmerged with peft, or train without it", source=self.source)

    def _pairs(self, tensors: dict[str, torch.Tensor]) -> dict[str, Pair]:
        if not any(".lora_A." in key for key in tensors):
            raise fail("adapter", "adapter_model.safetensors holds no LoRA weights (lora_A/lora_B)",
                       "re-save the adapter with peft's save_pretrained", source=self.source)
        for key, tensor in tensors.items():
            if not key.endswith((".lora_A.weight", ".lora_B.weight")):
                raise fail("adapter", f"{key!r} is not a LoRA weight (lora_A/lora_B): embeddings, "
                           "magnitudes and full modules are not applied here", "use it with peft directly, or train "
                           "LoRA on linear layers only", source=self.source)
            if not torch.isfinite(tensor).all():
                raise fail("adapter", f"{key!r} holds NaN or infinite values", "retrain or re-save the "
                           "adapter", source=self.source)
        return {self._weight_name(key): self._pair(key, tensors) for key in tensors if key.endswith(".lora_A.weight")}

    @staticmethod
    def _weight_name(key: str) -> str:
        return key.removeprefix(PEFT_PREFIX).replace(".lora_A.weight", ".weight")

    def _pair(self, key: str, tensors: dict[str, torch.Tensor]) -> Pair:
        stem = key.removesuffix(".lora_A.weight")
        if f"{stem}.lora_B.weight" not in tensors:
            raise fail("adapter", f"{stem}.lora_A has no lora_B beside it", "re-save the adapter", source=self.source)
        a, b = tensors[key].float(), tensors[f"{stem}.lora_B.weight"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise fail("adapter", f"{stem}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not one "
                       "low-rank pair", "re-save the adapter", source=self.source)
        rank, alpha = self._rank_and_alpha(stem.removeprefix(PEFT_PREFIX))
        if a.shape[0] != rank:
            raise fail(CONFIG, f"r is {rank} but {stem} has rank {a.shape[0]}",
                       "re-save the adapter so its config matches its weights", source=self.source)
        return Pair(a, b, alpha / (math.sqrt(rank) if self.config.get("use_rslora") else rank))

    def _rank_and_alpha(self, module: str) -> tuple[int, float]:
        """The module's rank and alpha: rank_pattern and alpha_pattern entries override r and lora_alpha, matched by
        peft's own rule, so every module is scaled exactly as peft scales it."""
        from peft.utils.other import get_pattern_key

        ranks, alphas = self.config.get("rank_pattern") or {}, self.config.get("alpha_pattern") or {}
        rank = ranks.get(get_pattern_key(list(ranks), module), self.config["r"])
        alpha = alphas.get(get_pattern_key(list(alphas), module), self.config["lora_alpha"])
        return rank, alpha

    @property
    def targets(self) -> set[str]:
        return set(self.pairs)

    @property
    def params(self) -> int:
        return sum(pair.a.numel() + pair.b.numel() for pair in self.pairs.values())

    def delta_shape(self, name: str) -> list[int]:
        """The shape of the delta as the base stores the weight ([out, in], or [in, out] for fan_in_fan_out)."""
        pair = self.pairs[name]
        shape = [pair.b.shape[0], pair.a.shape[1]]
        return shape[::-1] if self.fan_in_fan_out else shape

    def check_fits(self, shapes: dict[str, list[int]], base: str, field: str = "adapter") -> None:
        """Every adapted weight is in the base (name -> shape as stored), with the delta's shape: the one check, for
        a base's safetensors headers, its loaded modules or its GGUF tensors alike."""
        for name in sorted(self.pairs):
            if name not in shapes:
                raise fail(field, f"targets {name!r}, which base {base!r} does not have",
                           "this adapter belongs to another model; use the base it was trained on", source=self.source)
            if list(shapes[name]) != self.delta_shape(name):
                raise fail(field, f"{name!r} is {self.delta_shape(name)} in the adapter but "
                           f"{list(shapes[name])} in base {base!r}", "this adapter belongs to a base of another size; "
                           "use the base it was trained on", source=self.source)
