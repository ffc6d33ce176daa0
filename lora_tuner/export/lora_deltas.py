"""The adapter as weight deltas: each targeted base weight gets scale * B @ A added, row block by row block, in fp32."""
from pathlib import Path

import torch

from ..weights.adapter import LoraAdapter

CHECK_STRIDE = 16  # check_rows checks every 16th row of a chunk


class LoraDeltas:
    """An accepted adapter (weights/adapter.py) as the deltas merge and the LoRA GGUF apply, in fp32."""

    def __init__(self, folder: Path):
        self.adapter = LoraAdapter(folder)
        self._factors = {name: (pair.a.T, pair.b.T, pair.scale) if self.adapter.fan_in_fan_out else
                         (pair.b, pair.a, pair.scale) for name, pair in self.adapter.pairs.items()}
        # scale * each row's largest |A| entry, for check_rows' bound: once, not per chunk
        self._peaks = {key: right.abs().amax(dim=1, keepdim=True).mul_(scale)
                       for key, (_, right, scale) in self._factors.items()}

    @property
    def targets(self) -> set[str]:
        return self.adapter.targets

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

    def factors(self, base_key: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(left, right, scale): the delta of the weight `base_key` is scale * left @ right, in its layout, fp32."""
        return self._factors[base_key]

    @property
    def params(self) -> int:
        """The adapter's LoRA weights, counted."""
        return self.adapter.params

    def delta_shape(self, base_key: str) -> list[int]:
        """The shape of B @ A (as the base stores the weight), without computing it."""
        return self.adapter.delta_shape(base_key)
