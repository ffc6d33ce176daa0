"""The adapter as weight deltas: each targeted base weight gets scale * B @ A added, row block by row block, in fp32."""
import math
from pathlib import Path

import torch

from ..errors import fail
from ..run_folder import RunFolder
from ..safe_files import open_safetensors

PEFT_PREFIX = "base_model.model."
CHECK_STRIDE = 16  # check_rows checks every 16th row of a chunk


class LoraDeltas:
    def __init__(self, folder: Path, source: str):
        adapter = RunFolder(folder)
        if not adapter.has_adapter:
            hint = " (pickled adapter_model.bin is not read)" if (folder / "adapter_model.bin").exists() else ""
            raise fail(source, "adapter", f"{str(folder)!r} has no adapter_config.json + adapter_model.safetensors"
                       f"{hint}", "point at a run folder or a PEFT adapter saved as safetensors")
        config = adapter.adapter_config()
        _refuse_unsupported(config, source)
        self.config = config
        self.fan_in_fan_out = config.get("fan_in_fan_out", False)
        self._alpha = config["lora_alpha"]
        self._rslora = config.get("use_rslora", False)
        with open_safetensors(adapter / RunFolder.ADAPTER_WEIGHTS, source, "adapter") as weights:
            tensors = {key: weights.get_tensor(key) for key in weights.keys()}
        self.targets = {_base_key(key) for key in tensors if ".lora_A." in key}
        self._factors = {key: self._delta_factors(key, tensors, source) for key in self.targets}
        # scale * each row's largest |A| entry, for check_rows' bound: once, not per chunk
        self._peaks = {key: right.abs().amax(dim=1, keepdim=True).mul_(scale)
                       for key, (_, right, scale) in self._factors.items()}

    def merge_rows(self, base_key: str, rows: torch.Tensor, first_row: int, out: torch.Tensor,
                   scratch: torch.Tensor) -> None:
        """out = rows + scale * (B @ A)[first_row:first_row + len(rows)] in out's dtype, for rows of an adapted
        weight such as 'model.layers.0.self_attn.q_proj.weight'; rows of other weights are only cast.
        scratch: fp32, at least one row; the sum is done in blocks of rows that fit it."""
        if base_key not in self.targets:
            out.copy_(rows)
            return
        left, right, scale = self._factors[base_key]
        cols = rows.shape[1]
        step = scratch.numel() // cols
        # A reused fp32 block that stays in cache; the sum is rounded once, into out's dtype.
        for start in range(0, len(rows), step):
            end = min(start + step, len(rows))
            block = scratch[: (end - start) * cols].view(end - start, cols)
            block.copy_(rows[start:end])
            block.addmm_(left[first_row + start:first_row + end], right, alpha=scale)
            out[start:end].copy_(block)

    def check_rows(self, base_key: str, rows: torch.Tensor, first_row: int, out: torch.Tensor) -> bool:
        """out, as merge_rows wrote it, against rows + scale * B @ A computed again (one product per row, not
        merge_rows' blocked additions) in float32: within out's rounding (one unit in its last place) plus what float32
        itself may differ by between two evaluations of the same sum. Every CHECK_STRIDE-th row of the chunk, counted
        back from its last: a wrong row, a block written twice or a buffer two threads shared shows in them, at a
        sixteenth of the cost (checking every row cost as much as the merge itself). The rows are a strided view and
        the ops few: the check's cost is mostly per-op overhead, paid while holding the GIL the other workers wait on."""
        first = (len(rows) - 1) % CHECK_STRIDE
        base, got = rows[first::CHECK_STRIDE].float(), out[first::CHECK_STRIDE].float()  # views when float32: read only
        if base_key not in self.targets:
            return torch.equal(got, base.to(out.dtype).float())
        left, right, scale = self._factors[base_key]
        part = left[first_row + first:first_row + len(rows):CHECK_STRIDE]
        exact = torch.addmm(base, part, right, alpha=scale)
        kind = torch.finfo(out.dtype)  # below its smallest normal number a dtype's spacing stops shrinking
        # terms: at least the size of what is summed, which bounds float32's own error when the sum nearly cancels;
        # each row's largest |A| entry stands for its row (a product with |A| itself cost a fifth of the merge)
        terms = base.abs().add_(part.abs() @ self._peaks[base_key]).mul_(
            (right.shape[0] + 2) * torch.finfo(torch.float32).eps)
        slack = exact.abs().clamp_min_(kind.smallest_normal).mul_(kind.eps).add_(terms)
        return bool(((got - exact).abs_() <= slack).all())

    def _delta_factors(self, base_key: str, tensors: dict, source: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(left, right, scale) with delta = scale * left @ right in the base's weight layout, in fp32."""
        stem = PEFT_PREFIX + base_key.removesuffix(".weight")
        if f"{stem}.lora_B.weight" not in tensors:
            raise fail(source, "adapter", f"{stem}.lora_A has no lora_B beside it", "re-save the adapter")
        a = tensors[f"{stem}.lora_A.weight"].float()
        b = tensors[f"{stem}.lora_B.weight"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise fail(source, "adapter", f"{stem}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not one "
                       "low-rank pair", "re-save the adapter")
        rank = a.shape[0]
        scale = self._alpha / (math.sqrt(rank) if self._rslora else rank)
        return (a.T, b.T, scale) if self.fan_in_fan_out else (b, a, scale)  # fan_in_fan_out: weight stored transposed

    def factors(self, base_key: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(left, right, scale): the delta of the weight `base_key` is scale * left @ right, in its layout, fp32."""
        return self._factors[base_key]

    @property
    def params(self) -> int:
        """The adapter's LoRA weights, counted."""
        return sum(left.numel() + right.numel() for left, right, _ in self._factors.values())

    def delta_shape(self, base_key: str) -> list[int]:
        """The shape of B @ A (as the base stores the weight), without computing it."""
        left, right, _ = self._factors[base_key]
        return [left.shape[0], right.shape[1]]


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
